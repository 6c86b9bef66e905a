"""Model loaders: diffusers directories, OSEDiff's osediff.pkl (via peft), safety of pickles."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from harness.errors import ModelError
from harness.loaders import load_diffusers_dir, load_model, load_osediff, parse_model_spec
from harness.lora import OSEDIFF_PKL_KEYS, add_osediff_adapters, merge_lora_inplace, osediff_state
from harness.tiny import arch
from tests.conftest import make_random_model


def _save_base(tmp_path, seed=0):
    model = make_random_model(seed)
    root = tmp_path / "sd"
    model.vae.save_pretrained(root / "vae")
    arch.save_unet(model.unet, root / "unet")
    arch.build_scheduler().save_pretrained(root / "scheduler")
    save_file(
        {"prompt_embeds": model.prompt_embeds.contiguous()}, root / "prompt_embeds.safetensors"
    )
    return model, root


def test_diffusers_dir_round_trip(tmp_path):
    model, root = _save_base(tmp_path)
    loaded = load_diffusers_dir(root)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # weights are identical; conv kernels may pick another memory layout after loading (~1e-6)
    assert torch.allclose(model.super_resolve(lr), loaded.super_resolve(lr), atol=1e-5)
    assert loaded.identity["weights_sha256"]
    assert parse_model_spec(str(root)) == {"kind": "diffusers-dir", "path": str(root)}
    # the tiny UNet has no output GroupNorm; qbench_unet.json carries that through the round trip
    assert model.unet.conv_norm_out is None and loaded.unet.conv_norm_out is None


def test_bad_unet_arch_file_is_named(tmp_path):
    _, root = _save_base(tmp_path)
    arch_file = root / "unet" / arch.UNET_ARCH_FILE
    arch_file.write_text('{"conv_norm_out": "no"}')
    with pytest.raises(ModelError, match="qbench_unet.json"):
        load_diffusers_dir(root)
    arch_file.write_text("{not json")
    with pytest.raises(ModelError, match="qbench_unet.json.*not valid JSON"):
        load_diffusers_dir(root)


def test_missing_parts_are_named(tmp_path):
    _, root = _save_base(tmp_path)
    (root / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match="unet/config.json"):
        load_diffusers_dir(root)
    with pytest.raises(ModelError, match="does not exist"):
        load_diffusers_dir(tmp_path / "nowhere")


def _trained_lora(model):
    """Attach OSEDiff adapters to a copy of the base and give them non-zero weights."""
    targets = add_osediff_adapters(model.vae, model.unet, rank_unet=4, rank_vae=2)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in [*model.unet.named_parameters(), *model.vae.named_parameters()]:
            if "lora_B" in name:  # gaussian init leaves B = 0: make the adapters do something
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for name, p in model.unet.named_parameters():
            if "conv_in" in name and "base_layer" in name:  # OSEDiff trains conv_in fully
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return targets


def test_osediff_pkl_loader_matches_in_memory_merge(tmp_path):
    base, root = _save_base(tmp_path)
    trained = make_random_model(0)
    targets = _trained_lora(trained)
    assert targets["unet_lora_encoder_modules"] and targets["unet_lora_decoder_modules"]
    assert "quant_conv" in targets["vae_lora_encoder_modules"]
    assert not any("decoder" in n for n in targets["vae_lora_encoder_modules"])
    state = osediff_state(trained.vae, trained.unet, targets, 4, 2)
    assert set(OSEDIFF_PKL_KEYS) <= set(state)
    assert any("conv_in" in k for k in state["state_dict_unet"])
    pkl = tmp_path / "osediff.pkl"
    torch.save(state, pkl)

    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_unadapted = base.super_resolve(lr)
        merge_lora_inplace(trained.unet)
        merge_lora_inplace(trained.vae)
        expected = trained.super_resolve(lr)
    assert not torch.equal(expected, expected_unadapted), "the LoRA must change the output"
    loaded = load_osediff(root, pkl)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(loaded.super_resolve(lr), expected, atol=1e-5)
    spec = f"osediff:sd={root},pkl={pkl}"
    assert torch.allclose(load_model(spec).super_resolve(lr), expected, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    _, root = _save_base(tmp_path)
    bad = tmp_path / "osediff.pkl"
    with bad.open("wb") as fh:
        pickle.dump({"state_dict_unet": _Evil()}, fh)
    with pytest.raises(ModelError, match="refused"):
        load_osediff(root, bad)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_truncated_and_wrong_pkl(tmp_path):
    _, root = _save_base(tmp_path)
    pkl = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4}, pkl)
    with pytest.raises(ModelError, match="missing keys"):
        load_osediff(root, pkl)
    torch.save({k: [] for k in OSEDIFF_PKL_KEYS}, pkl)
    data = pkl.read_bytes()
    pkl.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="osediff.pkl"):
        load_osediff(root, pkl)


def test_empty_prompt_embedding_from_a_tiny_clip(tmp_path, monkeypatch):
    """PassionSR-FP: the CLIP output of "" computed from the SD directory and cached."""
    from transformers import CLIPTextConfig, CLIPTextModel

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    _, root = _save_base(tmp_path)
    (root / "prompt_embeds.safetensors").unlink()
    tok = root / "tokenizer"
    tok.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "!": 3}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "!", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }))  # fmt: skip
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=4, hidden_size=arch.CONTEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=3,
    ))  # fmt: skip
    encoder.save_pretrained(root / "text_encoder")
    base = make_random_model(0)
    targets = add_osediff_adapters(base.vae, base.unet, 2, 2)
    pkl = tmp_path / "osediff.pkl"
    torch.save(osediff_state(base.vae, base.unet, targets, 2, 2), pkl)
    model = load_osediff(root, pkl)
    assert model.prompt_embeds.shape == (1, 77, arch.CONTEXT_DIM)
    ids = torch.tensor([[0, 1] + [3] * 75])
    with torch.no_grad():
        expected = encoder(ids)[0]
    assert torch.allclose(model.prompt_embeds, expected, atol=1e-5)
    assert list((tmp_path / "cache").glob("empty_prompt_*.safetensors"))


@pytest.mark.slow
def test_sd21_sized_unet_constructs_and_runs():
    """An SD-2.1-base-sized UNet (random weights, ~866 M parameters) runs one small forward on CPU."""
    from diffusers import UNet2DConditionModel

    from harness.paths import repo_root

    config = json.loads((repo_root() / "harness" / "configs" / "sd21_base_unet.json").read_text())
    config.pop("_comment")
    unet = UNet2DConditionModel(**config).eval()
    params = sum(p.numel() for p in unet.parameters())
    assert 860e6 < params < 870e6, params
    with torch.no_grad():
        out = unet(
            torch.randn(1, 4, 16, 16),
            torch.tensor([999]),
            encoder_hidden_states=torch.randn(1, 77, 1024),
        ).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_a_model_directory_brings_its_inference_settings(tmp_path):
    """``inference.json`` next to the weights sets the tiles the model was made for; a bad one is an
    error naming the file."""
    import json
    import shutil

    from harness.errors import ModelError
    from harness.loaders import TINY_DIR, load_diffusers_dir

    if not (TINY_DIR / "unet" / "config.json").is_file():
        pytest.skip("the embedded tiny model is not installed")
    copy = tmp_path / "model"
    shutil.copytree(TINY_DIR, copy)
    recorded = json.loads((copy / "inference.json").read_text())
    assert load_diffusers_dir(copy).settings.to_dict() == recorded
    (copy / "inference.json").write_text(json.dumps({**recorded, "tile_size": 3}))
    with pytest.raises(ModelError, match="inference.json"):
        load_diffusers_dir(copy)

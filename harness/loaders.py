"""Loading one-step SR models: the embedded tiny model, diffusers directories, and the real OSEDiff.

Model specs (used by the CLI and run configs):

- ``tiny``: the embedded model shipped in ``harness/assets/tiny`` (trained by ``qbench train-tiny``);
- ``bicubic``: PIL bicubic upsampling, the reference row of every table (no network);
- a path to a diffusers-format directory holding ``vae/``, ``unet/``, ``scheduler/`` and
  ``prompt_embeds.safetensors`` (key ``prompt_embeds``, shape [1, L, D]);
- ``osediff:sd=SD21_DIR,pkl=OSEDIFF_PKL``: a local Stable Diffusion 2.1-base diffusers directory plus
  OSEDiff's released ``osediff.pkl``. The pkl's LoRA adapters are attached with peft exactly as OSEDiff
  does and merged before use (PassionSR's ``merge_lora: True``). The prompt embedding is the CLIP text
  encoder's output for the empty prompt (PassionSR-FP), computed once from ``SD21_DIR/text_encoder``
  and ``tokenizer`` and cached under ``harness.paths.cache_dir()``.

Security: ``osediff.pkl`` is a pickle. It is loaded with ``torch.load(weights_only=True)``, which only
rebuilds tensors and plain containers and refuses any pickle that tries to run code; qbench never
falls back to an unsafe load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from harness.errors import ConfigError, ModelError
from harness.model import InferenceSettings, OneStepSR, pil_bicubic_upsample
from harness.paths import cache_dir, repo_root

TINY_DIR = repo_root() / "harness" / "assets" / "tiny"
DIFFUSERS_PARTS = ("vae", "unet", "scheduler")


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def safe_torch_load(path: Path):
    """``torch.load`` with ``weights_only=True``; a pickle that tries to run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except Exception as exc:  # UnpicklingError, RuntimeError for truncated archives, ...
        raise ModelError(
            f"{path}: refused or unreadable as a weights-only checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). qbench never unpickles code."
        ) from None


def _load_prompt_embeds(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    if "prompt_embeds" not in tensors:
        raise ModelError(
            f"{path}: expected a tensor named 'prompt_embeds', found {sorted(tensors)}"
        )
    embeds = tensors["prompt_embeds"]
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ModelError(
            f"{path}: prompt_embeds must have shape [1, L, D], got {tuple(embeds.shape)}"
        )
    return embeds


def _check_parts(directory: Path, parts: tuple[str, ...]) -> None:
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    required = {
        "vae": "vae/config.json",
        "unet": "unet/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    missing = [required[p] for p in parts if not (directory / required[p]).is_file()]
    if missing:
        raise ModelError(
            f"{directory}: missing {', '.join(missing)}; a diffusers-format "
            "model directory holds vae/, unet/, scheduler/ and prompt_embeds.safetensors"
        )


def load_unet(unet_dir: Path):
    """``UNet2DConditionModel.from_pretrained``, honouring ``qbench_unet.json`` if present.

    The tiny model's UNet has no output GroupNorm (:data:`harness.tiny.arch.UNET_OUTPUT_NORM`), which
    diffusers' config cannot express; ``train-tiny`` records it in ``unet/qbench_unet.json`` and the
    UNet is then built from its config, stripped, and loaded strictly (every tensor must match).
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from harness.tiny.arch import UNET_ARCH_FILE, drop_output_norm

    arch_path = unet_dir / UNET_ARCH_FILE
    if not arch_path.is_file():
        return UNet2DConditionModel.from_pretrained(unet_dir)
    try:
        record = json.loads(arch_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{arch_path}: not valid JSON ({exc})") from None
    unknown = set(record) - {"conv_norm_out"}
    if unknown or not isinstance(record.get("conv_norm_out", True), bool):
        raise ModelError(f'{arch_path}: expected {{"conv_norm_out": true|false}}, got {record}')
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    if not record.get("conv_norm_out", True):
        drop_output_norm(unet)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{unet_dir}: missing diffusion_pytorch_model.safetensors")
    unet.load_state_dict(load_file(str(weights)), strict=True)
    return unet.eval()


def _load_components(directory: Path):
    from diffusers import AutoencoderKL, DDPMScheduler

    try:
        vae = AutoencoderKL.from_pretrained(directory / "vae")
        unet = load_unet(directory / "unet")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{directory}: cannot load the diffusers components ({exc})") from None
    return vae, unet, scheduler


def load_diffusers_dir(
    directory: str | Path, settings: InferenceSettings | None = None
) -> OneStepSR:
    """Load a diffusers-format OneStepSR directory (the embedded tiny model uses this format).

    Without ``settings``, an ``inference.json`` in the directory (written by ``train-tiny`` with the
    tile sizes the model was made for) gives them; otherwise :class:`InferenceSettings` defaults.
    """
    directory = Path(directory)
    _check_parts(directory, DIFFUSERS_PARTS)
    if settings is None and (directory / "inference.json").is_file():
        settings = _read_inference_settings(directory / "inference.json")
    embeds_path = directory / "prompt_embeds.safetensors"
    if not embeds_path.is_file():
        raise ModelError(f"{directory}: missing prompt_embeds.safetensors")
    vae, unet, scheduler = _load_components(directory)
    weights = sorted(directory.rglob("*.safetensors"))
    identity = {
        "kind": "diffusers-dir",
        "path": str(directory),
        "weights_sha256": _files_digest(weights),
    }
    model = OneStepSR(
        vae, unet, scheduler.alphas_cumprod, _load_prompt_embeds(embeds_path), settings, identity
    )
    return model.eval().requires_grad_(False)


def empty_prompt_embedding(sd_dir: Path) -> torch.Tensor:
    """CLIP text-encoder output (last hidden state) of the empty prompt, cached on disk (PassionSR-FP)."""
    from safetensors.torch import load_file, save_file

    text_dir, tok_dir = sd_dir / "text_encoder", sd_dir / "tokenizer"
    for part in (text_dir, tok_dir):
        if not part.is_dir():
            raise ModelError(
                f"{sd_dir}: missing {part.name}/ (needed once to compute the empty-prompt embedding)"
            )
    key = _files_digest(sorted(p for p in [*text_dir.iterdir(), *tok_dir.iterdir()] if p.is_file()))
    cached = cache_dir() / f"empty_prompt_{key[:16]}.safetensors"
    if cached.is_file():
        return load_file(str(cached))["prompt_embeds"]
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    encoder = CLIPTextModel.from_pretrained(text_dir).eval()
    ids = tokenizer(
        "",
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = encoder(ids)[0].float()
    save_file({"prompt_embeds": embeds.contiguous()}, str(cached))
    return embeds


def load_osediff(
    sd_dir: str | Path, pkl_path: str | Path, settings: InferenceSettings | None = None
) -> OneStepSR:
    """SD-2.1-base directory + OSEDiff ``osediff.pkl`` → merged OneStepSR (methods.md §2.1)."""
    from harness.lora import (
        OSEDIFF_PKL_KEYS,
        add_osediff_adapters,
        load_osediff_state,
        merge_lora_inplace,
    )

    sd_dir, pkl_path = Path(sd_dir), Path(pkl_path)
    _check_parts(sd_dir, DIFFUSERS_PARTS)
    state = safe_torch_load(pkl_path)
    if not isinstance(state, dict):
        raise ModelError(f"{pkl_path}: expected a dict, got {type(state).__name__}")
    missing = [k for k in OSEDIFF_PKL_KEYS if k not in state]
    if missing:
        raise ModelError(f"{pkl_path}: not an osediff.pkl: missing keys {', '.join(missing)}")
    vae, unet, scheduler = _load_components(sd_dir)
    targets = {k: list(state[k]) for k in OSEDIFF_PKL_KEYS[:4]}
    try:
        add_osediff_adapters(vae, unet, int(state["rank_unet"]), int(state["rank_vae"]), targets)
        load_osediff_state(vae, unet, state)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{pkl_path}: does not fit the model in {sd_dir}: {exc}") from None
    merge_lora_inplace(unet)
    merge_lora_inplace(vae)
    embeds_path = sd_dir / "prompt_embeds.safetensors"
    embeds = (
        _load_prompt_embeds(embeds_path)
        if embeds_path.is_file()
        else empty_prompt_embedding(sd_dir)
    )
    identity = {
        "kind": "osediff",
        "sd_dir": str(sd_dir),
        "pkl": str(pkl_path),
        "weights_sha256": _files_digest(
            [
                pkl_path,
                *sorted((sd_dir / "unet").glob("*.safetensors")),
                *sorted((sd_dir / "vae").glob("*.safetensors")),
            ]
        ),  # fmt: skip
    }
    model = OneStepSR(vae, unet, scheduler.alphas_cumprod, embeds, settings, identity)
    return model.eval().requires_grad_(False)


class BicubicSR(torch.nn.Module):
    """PIL bicubic ×scale: the reference row (no network, nothing to quantize)."""

    def __init__(self, settings: InferenceSettings | None = None):
        super().__init__()
        self.settings = settings or InferenceSettings()
        self.identity = {"kind": "bicubic", "weights_sha256": "none"}

    @torch.no_grad()
    def super_resolve(self, lr01: torch.Tensor, *, return_stages: bool = False):
        sr = pil_bicubic_upsample(lr01, self.settings.upscale)
        return (sr, {"lr_up": sr}) if return_stages else sr


def parse_model_spec(spec: str) -> dict:
    """``tiny`` | ``bicubic`` | ``PATH`` | ``osediff:sd=DIR,pkl=FILE`` → a dict describing the model."""
    if spec in ("tiny", "bicubic"):
        return {"kind": spec}
    if spec.startswith("osediff:"):
        fields = dict(
            item.split("=", 1) for item in spec[len("osediff:") :].split(",") if "=" in item
        )
        if set(fields) != {"sd", "pkl"}:
            raise ModelError(f"model spec {spec!r}: expected 'osediff:sd=SD21_DIR,pkl=OSEDIFF_PKL'")
        return {"kind": "osediff", **fields}
    return {"kind": "diffusers-dir", "path": spec}


def load_model(spec: str, settings: InferenceSettings | None = None):
    """Load a model from a spec string (see the module docstring)."""
    parsed = parse_model_spec(spec)
    if parsed["kind"] == "bicubic":
        return BicubicSR(settings)
    if parsed["kind"] == "tiny":
        if not (TINY_DIR / "unet" / "config.json").is_file():
            raise ModelError(
                f"the embedded tiny model is missing from {TINY_DIR}; run `qbench train-tiny`"
            )
        return load_diffusers_dir(TINY_DIR, settings or tiny_default_settings())
    if parsed["kind"] == "osediff":
        return load_osediff(parsed["sd"], parsed["pkl"], settings)
    return load_diffusers_dir(parsed["path"], settings)


def tiny_default_settings() -> InferenceSettings:
    """Inference settings recorded next to the tiny model (tiles scaled to its VAE factor)."""
    path = TINY_DIR / "inference.json"
    if path.is_file():
        return _read_inference_settings(path)
    return InferenceSettings()


def _read_inference_settings(path: Path) -> InferenceSettings:
    try:
        return InferenceSettings.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, ConfigError) as exc:
        raise ModelError(f"{path}: not valid inference settings ({exc})") from exc

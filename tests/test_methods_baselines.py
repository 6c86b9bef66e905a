"""The fp, minmax and ptq4dm methods, and `qbench quantize` (run_quantize) end to end on a toy model."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.commands.quant import parse_set_options, run_quantize
from harness.errors import ConfigError, DivergedError
from harness.quant import (
    CalibrationSettings,
    build_calibration_set,
    load_quantized,
    pipeline_forward,
    quantize,
)
from harness.registry import get_method, register_method
from methods.minmax import MinMax, MinMaxConfig
from methods.ptq4dm import PTQ4DMConfig, literal_timesteps
from tests.conftest import build_toy_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-images")
    rng = np.random.default_rng(1)
    for i in range(3):
        small = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((96, 80), Image.BICUBIC).save(root / f"photo{i}.png")
    return root


@pytest.fixture(scope="module")
def toy(images):
    model = build_toy_model()
    paths = sorted(images.glob("*.png"))
    settings = CalibrationSettings(n=8, lr_crop=8, seed=3, teacher_batch_size=4)
    calibration = build_calibration_set(model, hr_images=paths, settings=settings, cache=False)
    return model, calibration


def psnr_fp(qmodel, calibration) -> float:
    batch = calibration.batch(range(len(calibration)))
    with torch.no_grad():
        image = pipeline_forward(qmodel.model, batch.x)["image"]
    mse = float(((image - batch.image) ** 2).mean())  # images in [-1, 1]: peak-to-peak 2
    return 10 * np.log10(4.0 / mse)


def test_calibration_set_protocol_records_and_batches(toy, images):
    model, calibration = toy
    assert len(calibration) == 8
    record = calibration.record()
    crop = record["crops"][0]
    assert crop["hr_box"] == [4 * v for v in crop["lr_box"][:2]] + [32, 32]
    assert crop["lr_file"] is None and any("bicubic" in n for n in crop["notes"])
    assert record["timestep"] == 999 and record["settings"]["seed"] == 3
    batch = calibration.batch([0, 1])
    assert batch.x.shape == (2, 3, 32, 32) and batch.hr.shape == (2, 3, 32, 32)
    # the teacher tensors are the FP pipeline's, with each crop's own seeded posterior noise
    with torch.no_grad():
        single = pipeline_forward(model, batch.x[1:2])
    assert torch.allclose(single["z_l"], batch.z_l[1:2], atol=1e-5)
    assert torch.allclose(single["image"], batch.image[1:2], atol=1e-5)
    # HR crop aligned with the LR crop: bicubic /4 of the HR crop is close to the LR crop
    hr = Image.fromarray((batch.hr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    down = np.asarray(hr.resize((8, 8), Image.BICUBIC), dtype=np.float32) / 255
    assert np.abs(down - batch.lr[0].permute(1, 2, 0).numpy()).mean() < 0.05
    again = build_calibration_set(
        model, hr_images=sorted(images.glob("*.png")),
        settings=CalibrationSettings(n=8, lr_crop=8, seed=3, teacher_batch_size=4), cache=False,
    )  # fmt: skip
    assert again.crops_hash == calibration.crops_hash


def test_fp_method_is_the_identity_through_the_same_path(toy):
    model, calibration = toy
    fresh = copy.deepcopy(model)
    config = get_method("fp").make_config()
    assert config.bits == "FP"
    with pytest.raises(ConfigError, match="does not quantize"):
        get_method("fp").make_config(bits="W4A4")
    qmodel = quantize(fresh, config, None)
    assert qmodel.targets == {} and qmodel.summary()["bits"] == "FP"
    assert psnr_fp(qmodel, calibration) > 100


def test_minmax_ranges_and_psnr_fp_falls_with_bits(toy):
    model, calibration = toy
    scores = {}
    for bits in ("W8A8", "W4A4", "W2A2"):
        qmodel = quantize(
            copy.deepcopy(model), get_method("minmax").make_config(bits=bits), calibration
        )
        scores[bits] = psnr_fp(qmodel, calibration)
        if bits == "W4A4":
            layer = qmodel.model.vae.encoder.conv_in
            xs = calibration.batch(range(len(calibration))).x
            # the first layer sees the raw inputs: running min/max over the whole calibration set
            assert float(layer.act_quantizers[0].x_min) == pytest.approx(float(xs.min()))
            assert float(layer.act_quantizers[0].x_max) == pytest.approx(float(xs.max()))
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            assert torch.allclose(layer.weight_quantizers[0].x_min, w.amin(1))
            assert layer.bias_quantizer is not None  # PassionSR's framework quantizes biases
            record = qmodel.calibration_record["method"]
            assert record["calibration_batches"] == 2 and record["activation_quantizers"] > 50
    assert scores["W8A8"] >= 30.0
    assert scores["W8A8"] > scores["W4A4"] > scores["W2A2"]


def test_ptq4dm_search_ranges_and_literal_timesteps(toy):
    model, calibration = toy
    config = get_method("ptq4dm").make_config(bits="W4A4", scope="U", calib_batch_size=8)
    qmodel = quantize(copy.deepcopy(model), config, calibration)
    layers = qmodel.quant_layers()
    conv = layers["unet.down_blocks.0.resnets.0.conv1"]
    wq = conv.weight_quantizers[0]
    assert torch.allclose(wq.x_min, -wq.x_max)  # symmetric clipping range per channel
    assert bool(
        (
            wq.x_max <= conv.weight.detach().reshape(conv.weight.shape[0], -1).abs().amax(1) + 1e-6
        ).all()
    )
    assert conv.bias_quantizer is None and wq.spec.rounding == "half_even"
    attn = qmodel.attention_quantizers()["unet.mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert float(attn.probs.x_min) == 0.0  # softmax output: one-sided 1-D search
    assert qmodel.layer_bits()["unet.conv_out"] == "W8A8"
    assert not any(name.startswith("vae.") for name in layers)
    assert psnr_fp(qmodel, calibration) > 10

    steps = literal_timesteps(1000, 0.4, 0.4, 1000, seed=0)
    assert min(steps) == 0 and max(steps) <= 999
    assert 350 < np.mean(steps) < 480  # N(400, 400) clamped to [0, 999]
    calls = []
    literal = copy.deepcopy(model)
    literal.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    lit_config = dataclasses.replace(
        config, timestep_calibration="literal", include=("unet.mid_block",)
    )
    lit = quantize(literal, lit_config, calibration)
    assert sum(calls) == 2 * len(calibration)  # the crops + one noisy latent per crop
    assert len(lit.calibration_record["method"]["literal"]["timesteps"]) == len(calibration)
    with pytest.raises(ConfigError, match="timestep_calibration"):
        PTQ4DMConfig(timestep_calibration="uniform")


@dataclasses.dataclass(frozen=True)
class NaNConfig(MinMaxConfig):
    method: str = "nan-weights-test"


@register_method("nan-weights-test", config_cls=NaNConfig)
class NaNWeights(MinMax):
    """MinMax whose weight range of one decoder layer becomes NaN (as a broken low-bit run would)."""

    def calibrate(self, qmodel, calibration, config, progress=None):
        layer = qmodel.model.vae.decoder.conv_in
        original = layer.init_weight_ranges

        def poisoned(setter):
            original(setter)
            q = layer.weight_quantizers[0]
            q.set_range(q.x_min, torch.full_like(q.x_max, float("nan")))

        layer.init_weight_ranges = poisoned
        return super().calibrate(qmodel, calibration, config, progress)


def test_run_quantize_writes_a_loadable_model_and_records_divergence(toy, images, tmp_path):
    model, calibration = toy
    assert parse_set_options(["calib_batch_size=8", "activation_observer=ema"]) == {
        "calib_batch_size": 8, "activation_observer": "ema",
    }  # fmt: skip
    common = dict(
        model="toy", calib_n=4, calib_crop=8, calib_source=f"hr:{images}", seed=1, bops_size=32,
        cache=False,
    )  # fmt: skip
    record = run_quantize(
        method="minmax",
        bits="W4A4",
        out=tmp_path / "mm",
        loaded_model=copy.deepcopy(model),
        **common,
    )
    assert record["status"] == "ok"
    for name in (
        "quantized.json",
        "quant_params.safetensors",
        "packed_weights.safetensors",
        "size_report.json",
    ):
        assert (tmp_path / "mm" / name).is_file()
    report = json.loads((tmp_path / "mm" / "size_report.json").read_text())
    assert (
        report["size"]["quantized_layers_packed_bytes"]
        < report["size"]["quantized_layers_fp32_bytes"]
    )
    assert report["bops"]["image_size"] == 32 and "simulated" in report["bops"]["label"]
    loaded = load_quantized(tmp_path / "mm", copy.deepcopy(model))
    assert loaded.layer_bits()["unet.conv_in"] == "W4A4"

    diverged = run_quantize(
        method="nan-weights-test",
        bits="W2A2",
        out=tmp_path / "nan",
        loaded_model=copy.deepcopy(model),
        **common,
    )
    assert diverged["status"] == "diverged"
    assert "vae.decoder.conv_in" in diverged["cause"]
    stored = json.loads((tmp_path / "nan" / "quantize_record.json").read_text())
    assert stored["status"] == "diverged" and stored["cause"] == diverged["cause"]
    assert not (tmp_path / "nan" / "quantized.json").exists()
    with pytest.raises(DivergedError):
        quantize(
            copy.deepcopy(model),
            get_method("nan-weights-test").make_config(bits="W2A2"),
            calibration,
        )

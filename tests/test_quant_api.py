"""quantize() targeting, configs, the registry, SQNR on a toy conv net and divergence handling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harness.errors import ConfigError, DivergedError, ModelError, UnknownNameError
from harness.quant import (
    CalibrationSettings,
    MethodConfig,
    QuantConv2d,
    QuantLinear,
    build_calibration_set,
    calibration_passes,
    parse_bits,
    quantize,
    resolve_targets,
)
from harness.quant.api import apply_targets, skip_split_points
from harness.quant.quantizer import MinMaxObserver, observed_min_max
from harness.quant.state import attach_observers, detach_observers, iter_quant_layers
from harness.registry import get_method, list_methods, register_method, register_variant
from methods.minmax import MinMax, MinMaxConfig
from tests.conftest import build_toy_model

torch.set_num_threads(1)


def write_images(directory, n=3, size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        path = directory / f"img{i}.png"
        Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def toy_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    model = build_toy_model()
    paths = write_images(tmp_path)
    settings = CalibrationSettings(n=4, lr_crop=8, seed=1, teacher_batch_size=4)
    return model, build_calibration_set(model, hr_images=paths, settings=settings)


# ----------------------------------------------------------------------------- config


def test_bits_parsing_and_rejection_names_the_value():
    assert parse_bits("W4A4") == parse_bits("w4a4")
    assert (parse_bits("W8A6").weights, parse_bits("W8A6").activations) == (8, 6)
    for bad in ("W1A1", "W16A16", "W4A1", "4bit"):
        with pytest.raises(ConfigError, match=bad):
            MinMaxConfig(bits=bad)


def test_config_round_trips_through_json_with_version():
    config = get_method("minmax").make_config(
        bits="W6A6", scope="U", exclude=["unet.mid_block"], overrides={"unet.conv_in": "W8A8"}
    )
    data = config.to_dict()
    assert data["config_version"] == MinMaxConfig.config_version
    import json

    again = MethodConfig.from_dict(json.loads(json.dumps(data)))
    assert again == config and isinstance(again, MinMaxConfig)
    with pytest.raises(ConfigError, match="config_version"):
        MethodConfig.from_dict({**data, "config_version": 99})
    with pytest.raises(ConfigError, match="bogus"):
        MethodConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ConfigError, match="scope"):
        MinMaxConfig(scope="V")
    with pytest.raises(ConfigError, match="calib_batch_size"):
        MinMaxConfig(calib_batch_size="4")


def test_registry_lazy_lookup_did_you_mean_and_variants():
    assert {"fp", "minmax", "ptq4dm"} <= set(list_methods())
    with pytest.raises(UnknownNameError, match="minmax"):
        get_method("minmx")
    entry = register_variant("minmax-ema-test", base="minmax", activation_observer="ema")
    config = entry.make_config(bits="W8A8")
    assert isinstance(config, MinMaxConfig) and config.activation_observer == "ema"
    assert config.method == "minmax-ema-test"
    assert MethodConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="activation_observer"):
        register_variant("minmax-bad-test", base="minmax", activation_observer="nope")


# ----------------------------------------------------------------------------- targeting


def _targets(model, **fields):
    config = get_method("minmax").make_config(**fields)
    return resolve_targets(model, config, MinMax())


def test_scope_default_8bit_list_and_diffusers_names():
    model = build_toy_model()
    uv = _targets(model, bits="W4A4")
    eight = {n for n, t in uv.items() if t.kind != "attention" and t.w_bits == 8}
    assert eight == {
        "unet.time_embedding.linear_1", "unet.conv_out", "vae.quant_conv", "vae.post_quant_conv",
        "vae.encoder.conv_out", "vae.decoder.conv_out",
    }  # fmt: skip
    assert all(
        t.w_bits == 4 and t.a_bits == 4
        for n, t in uv.items()
        if n not in eight and t.kind != "attention"
    )
    # VAE mid-block attention: projections quantized, matmuls (attention targets) not
    assert "vae.decoder.mid_block.attentions.0.to_q" in uv
    assert not any(t.kind == "attention" and n.startswith("vae.") for n, t in uv.items())
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1" in uv
    u = _targets(model, bits="W4A4", scope="U")
    assert all(n.startswith("unet.") for n in u)
    assert {n for n, t in u.items() if t.w_bits == 8} == {
        "unet.time_embedding.linear_1",
        "unet.conv_out",
    }


def test_include_exclude_overrides_and_patterns_that_match_nothing():
    model = build_toy_model()
    t = _targets(model, exclude=["unet.mid_block", "re:vae\\.decoder\\.up_blocks\\.0\\..*"])
    assert not any(n.startswith(("unet.mid_block.", "vae.decoder.up_blocks.0.")) for n in t)
    t = _targets(model, include=["unet.up_blocks.*"], overrides={"*.conv_shortcut": "W6A8"})
    assert all(n.startswith("unet.up_blocks.") for n in t)
    assert t["unet.up_blocks.1.resnets.0.conv_shortcut"].bits_label == "W6A8"
    assert (
        t["unet.up_blocks.1.resnets.0.conv1"].bits_label == "W4A4"
    )  # user overrides replace the default list
    for fields in (
        {"include": ["unet.no_such_block"]},
        {"exclude": ["vae.encoder.*"], "scope": "U"},
        {"overrides": {"vae.quant_conv": "W8A8"}, "scope": "U"},
    ):
        with pytest.raises(ConfigError, match="matches no"):
            _targets(model, **fields)
    with pytest.raises(ConfigError, match="different bits"):
        _targets(model, overrides={"unet.conv_out": "W8A8", "unet.conv_*": "W6A6"})
    with pytest.raises(ConfigError, match="regular expression"):
        _targets(model, exclude=["re:("])


def test_skip_split_points_match_the_runtime_concat_boundary():
    model = build_toy_model()
    points = skip_split_points(model)
    observed = {}

    def probe(block_name):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            width = hidden.shape[1]
            for j, resnet in enumerate(module.resnets):
                skip = skips[-(j + 1)].shape[1]
                observed[f"{block_name}.resnets.{j}.conv1"] = (width, width + skip)
                width = resnet.out_channels

        return hook

    for b, block in enumerate(model.unet.up_blocks):
        block.register_forward_pre_hook(probe(f"unet.up_blocks.{b}"), with_kwargs=True)
    with torch.no_grad():
        model.predict_eps(torch.randn(1, 4, 16, 16))
    assert observed and {k: v[0] for k, v in observed.items()} == {
        k: v for k, v in points.items() if k.endswith("conv1")
    }
    targets = _targets(model, bits="W4A4")
    layer = targets["unet.up_blocks.0.resnets.0.conv1"].layer
    assert layer.split_at == observed["unet.up_blocks.0.resnets.0.conv1"][0]
    assert targets["unet.down_blocks.0.resnets.0.conv1"].layer.split_at is None
    passion = _targets(model, bits="W4A4", split_all_unet_inputs=True)
    assert passion["unet.down_blocks.0.resnets.0.conv1"].layer.split_at == 16  # C // 2


# ----------------------------------------------------------------------------- SQNR


class ToyConvNet(nn.Module):
    """A toy conv net named like a OneStepSR UNet (so the scope/target machinery applies)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unet = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 16, 1), nn.SiLU(), nn.Flatten(2), nn.Linear(64, 64),
        )  # fmt: skip

    def forward(self, x):
        return self.unet(x)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


@pytest.mark.parametrize(("bits", "min_db", "max_db"), [("W8A8", 30.0, 99.0), ("W4A4", 5.0, 30.0)])
def test_sqnr_on_a_toy_conv_net(bits, min_db, max_db):
    model = ToyConvNet()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    config = get_method("minmax").make_config(bits=bits, scope="U", overrides={})
    method = MinMax()
    targets = resolve_targets(model, config, method)
    apply_targets(model, targets, method)
    layers = dict(iter_quant_layers(model))
    assert len(layers) == 4 and all(
        isinstance(m, (QuantConv2d, QuantLinear)) for m in layers.values()
    )
    for layer in layers.values():
        layer.init_weight_ranges(lambda q, t: q.set_range(*observed_min_max(t, q.spec)))
    attach_observers(model, lambda *_: MinMaxObserver())
    with torch.no_grad():
        model(x)
    detach_observers(model)
    with torch.no_grad():
        out = model(x)
    sqnr = _sqnr_db(reference, out)
    assert min_db <= sqnr <= max_db


# ----------------------------------------------------------------------------- quantize()


def test_quantize_records_bits_and_checks_the_calibration_model(toy_calibration):
    model, calibration = toy_calibration
    config = get_method("minmax").make_config(bits="W4A4")
    qmodel = quantize(model, config, calibration)
    bits = qmodel.layer_bits()
    assert bits["unet.conv_out"] == "W8A8" and bits["unet.conv_in"] == "W4A4"
    assert bits["unet.mid_block.attentions.0.transformer_blocks.0.attn2"] == "A4"
    summary = qmodel.summary()
    assert summary["quantized_modules"] == len(qmodel.targets)
    assert "simulated quantization" in summary["label"]
    assert qmodel.calibration_record["data"]["crops_hash"] == calibration.crops_hash
    assert isinstance(model.unet.conv_in, QuantConv2d)
    with pytest.raises(ModelError, match="already quantized"):
        quantize(model, config, calibration)
    other = build_toy_model(seed=5)
    with pytest.raises(ConfigError, match="another base model"):
        quantize(other, config, calibration)
    with pytest.raises(ConfigError, match="needs a calibration set"):
        quantize(build_toy_model(seed=5), config, None)


@dataclasses.dataclass(frozen=True)
class BrokenConfig(MinMaxConfig):
    method: str = "broken-range-test"


@register_method("broken-range-test", config_cls=BrokenConfig)
class BrokenRange(MinMax):
    """MinMax whose calibration then writes an infinite range into one UNet quantizer, so the
    quantized forward produces NaN (what a broken low-bit run looks like)."""

    def calibrate(self, qmodel, calibration, config, progress=None):
        record = super().calibrate(qmodel, calibration, config, progress)
        layer = qmodel.model.unet.mid_block.resnets[0].conv1
        layer.act_quantizers[0].set_range(torch.tensor(-1.0), torch.tensor(float("inf")))
        calibration_passes(qmodel, calibration, batch_size=4, scope=config.scope, stage="check")
        return record


def test_nan_during_calibration_raises_diverged_with_its_cause(toy_calibration):
    model, calibration = toy_calibration
    config = get_method("broken-range-test").make_config(bits="W2A2")
    with pytest.raises(DivergedError, match=r"unet\.mid_block\.resnets\.0\.conv1"):
        quantize(model, config, calibration)

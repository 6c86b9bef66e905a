"""QArtSR: the low-rank quantized layer, its merged inference form, the size report, RPQ's order and
parameter updates, resume, TRQ's timestep binding, the ET loss rule and every ablation variant."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from harness.errors import ConfigError, MetricUnavailable, ModelError
from harness.quant.api import quantize
from harness.quant.calibration import CalibrationSettings, build_calibration_set
from harness.quant.io import load_quantized, save_quantized
from harness.quant.layers import LayerQuantSpec
from harness.quant.lowrank import (
    LowRankQuantConv2d,
    LowRankQuantLinear,
    init_lowrank,
    init_smoothing,
    iter_lowrank_layers,
    lowrank_ranks,
    lowrank_size_report,
    merge_for_inference,
    merge_model_for_inference,
    smoothing_factors,
    weight_absmax_per_input,
)
from harness.quant.quantizer import QuantSpec
from harness.registry import get_method, list_methods
from tests.conftest import make_random_model

torch.set_num_threads(1)

QARTSR_VARIANTS = [
    "qartsr",
    "qartsr-no-trq",
    "qartsr-no-rpq",
    "qartsr-forward-pq",
    "qartsr-no-et",
    "qartsr-module-loss-only",
    "qartsr-image-loss-only",
    "qartsr-no-lowrank",
    "qartsr-t999",
    "qartsr-t749",
    "qartsr-t499",
    "qartsr-t249",
    "qartsr-t99",
    "qartsr-t1",
]

# the shortest meaningful budget: one step per stage, two T* candidates, no size report
SHORT = dict(
    budget="tiny",
    perceptual_substitute="ssim",
    sweep_iters=1,
    rpq_iters=1,
    et_iters=1,
    batch_size=1,
    init_crops=2,
    tstar_grid=[999, 1],
    report_size=False,
)


def _spec(bits: int = 4, split_at: int | None = None) -> LayerQuantSpec:
    return LayerQuantSpec(
        weight=QuantSpec(bits=bits, granularity="channel", axis=0),
        activation=QuantSpec(bits=bits),
        split_at=split_at,
    )


def _conv_layer(seed: int = 0, rank: int = 3, finetune_rank: int = 2, split_at=None):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = LowRankQuantConv2d(conv, _spec(split_at=split_at), rank, finetune_rank)
    return conv, layer


def _linear_layer(seed: int = 0, rank: int = 2, finetune_rank: int = 2):
    torch.manual_seed(seed)
    linear = nn.Linear(7, 4)
    layer = LowRankQuantLinear(linear, _spec(), rank, finetune_rank)
    return linear, layer


def _initialise(layer, x, alpha=0.5):
    """Smoothing from x's channel maxima, SVD of the smoothed weight, ranges from min/max."""
    axis = layer._input_channel_axis(x)
    absmax = x.abs().movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
    init_smoothing(layer, absmax, alpha)
    init_lowrank(layer, "smoothed")
    with torch.no_grad():
        for q, part in zip(
            layer.weight_quantizers,
            layer.weight_parts(layer.effective_weight().detach()),
            strict=True,
        ):
            q.set_range(
                part.amin(dim=tuple(range(1, part.dim()))),
                part.amax(dim=tuple(range(1, part.dim()))),
            )
        xs = layer.transform_input(x)
        for q in layer.act_quantizers:
            q.set_range(xs.min(), xs.max())


# ---------------------------------------------------------------------------- layer


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_layer_without_quantization_equals_float_layer(kind):
    float_module, layer = _conv_layer() if kind == "conv" else _linear_layer()
    x = torch.randn(2, 6, 9, 9) * 3 if kind == "conv" else torch.randn(2, 5, 7) * 3
    _initialise(layer, x)
    assert float(layer.finetune_down.detach().abs().max()) == 0.0  # F2 = 0, so F1F2 = 0
    assert float((layer.smooth() - 1).abs().max()) > 1e-3  # φ is not trivially 1
    layer.set_quant_state(False, False)
    with torch.no_grad():
        expected = float_module(x)
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the split is exact: L1L2 + φ ⊙ residual = W
    recombined = layer.lowrank_weight() + layer.residual_weight() * layer._weight_view(
        layer.smooth()
    )
    torch.testing.assert_close(recombined, layer.weight, rtol=1e-6, atol=1e-6)


def test_smoothing_and_svd_follow_the_documented_formulas():
    _, layer = _conv_layer(rank=2)
    act = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 0.0])
    wmax = weight_absmax_per_input(layer.weight)
    init_smoothing(layer, act, 0.5)
    phi = layer.smooth().detach()
    expected = wmax.sqrt() / act.sqrt()
    torch.testing.assert_close(phi[:5], expected[:5], rtol=1e-5, atol=0)
    assert float(phi[5]) == 1.0  # dead channel → φ = 1
    assert smoothing_factors(torch.tensor([4.0]), torch.tensor([1.0]), 1.0).item() == 0.25
    info = init_lowrank(layer, "smoothed")
    # L1L2 ⊘ φ is the best rank-2 approximation of W ⊘ φ (Eckart–Young)
    smoothed = (layer.weight / layer._weight_view(phi)).reshape(5, -1).double()
    s = torch.linalg.svdvals(smoothed)
    approx = (layer.lowrank_weight() / layer._weight_view(phi)).reshape(5, -1).double()
    err = torch.linalg.norm(smoothed - approx) ** 2
    assert math.isclose(float(err), float((s[2:] ** 2).sum()), rel_tol=1e-3)
    assert math.isclose(info["energy"], float((s[:2] ** 2).sum() / (s**2).sum()), rel_tol=1e-6)


def test_ranks_rule_and_no_lowrank():
    assert lowrank_ranks((1280, 1280, 3, 3), 32, 0.1, 8) == (32, 8)
    assert lowrank_ranks((320, 320, 3, 3), 32, 0.1, 8) == (32, 8)
    assert lowrank_ranks((64, 64, 3, 3), 32, 0.1, 8) == (6, 8)
    assert lowrank_ranks((8, 32, 3, 3), 32, 0.1, 8) == (1, 8)
    assert lowrank_ranks((64, 64), 32, 0.1, 8, lowrank=False) == (0, 8)
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ConfigError, match="groups"):
        LowRankQuantConv2d(conv, _spec(), 1, 1)


def test_adapter_init_ignores_the_global_generator():
    """F1 comes from a generator seeded by the run seed and the layer name, never from torch's global
    generator (whose seed differs per process: two identical runs once ended ±0.1 dB apart)."""
    from harness.quant.lowrank import make_lowrank_layer

    conv = nn.Conv2d(6, 5, 3, padding=1)

    def adapter(global_seed: int, name: str, seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        layer = make_lowrank_layer(
            conv, _spec(), rank=2, rank_fraction=1.0, finetune_rank=3, name=name, seed=seed
        )
        assert torch.count_nonzero(layer.finetune_down) == 0  # F1F2 = 0 at the start
        return layer.finetune_up.detach().clone()

    reference = adapter(1, "unet.conv_in", 0)
    assert torch.count_nonzero(reference) == reference.numel()
    torch.testing.assert_close(adapter(2, "unet.conv_in", 0), reference, rtol=0, atol=0)
    assert not torch.equal(adapter(1, "unet.conv_out", 0), reference)  # per layer
    assert not torch.equal(adapter(1, "unet.conv_in", 1), reference)  # per run seed


@pytest.mark.parametrize("kind", ["conv", "conv-split", "linear"])
def test_merged_inference_equals_training_form(kind):
    if kind == "linear":
        _, layer = _linear_layer(seed=3)
        x = torch.randn(2, 5, 7)
    else:
        _, layer = _conv_layer(seed=3, split_at=2 if kind == "conv-split" else None)
        x = torch.randn(2, 6, 9, 9)
    _initialise(layer, x)
    with torch.no_grad():  # a trained state: nonzero adapter, moved φ and branch
        layer.finetune_down.normal_(0, 0.05)
        layer.log_smooth.add_(0.1)
        layer.lowrank_up.mul_(1.1)
    with torch.no_grad():
        trained = layer(x)
    merged = merge_for_inference(layer)
    with torch.no_grad():
        got = merged(x)
    assert torch.equal(got, trained)
    assert not hasattr(merged, "finetune_up") and merged.weight.requires_grad is False
    assert merged.branch_up.dtype == torch.float16  # the branch is stored in 16 bit
    with pytest.raises(ModelError):
        merged.set_fp(True)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """3 crops of 8 px LR (32 px images) from seeded synthetic 64 px photos: small and fast."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("qartsr-calibration")
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(3):
        smooth = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1)
        array = np.clip(0.5 + 0.3 * smooth + 0.1 * rng.standard_normal((64, 64, 3)), 0, 1)
        path = folder / f"photo{i}.png"
        Image.fromarray((array * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return build_calibration_set(
        make_random_model(), hr_images=paths,
        settings=CalibrationSettings(n=3, lr_crop=8, seed=0), cache=False,
    )  # fmt: skip


def _quantize(name, calibration, progress=None, **fields):
    torch.manual_seed(0)
    model = make_random_model()
    config = get_method(name).make_config(**{"bits": "W4A4", **SHORT, **fields})
    return quantize(model, config, calibration, progress=progress)


def test_size_report_counts_the_branch_at_16_bits(calibration):
    qmodel = _quantize("qartsr", calibration, scope="U", timestep=999, rpq=False, et=False)
    model = qmodel.model
    fresh = make_random_model()
    seen, fp32 = set(), 0
    for t in list(fresh.parameters()) + list(fresh.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            fp32 += 4 * t.numel()
    branch = 0
    smooth = 0
    for _, layer in iter_lowrank_layers(model):
        out_dim, in_dim = layer.weight.shape[:2]
        per_in = math.prod(layer.weight.shape[1:])
        branch += 2 * layer.rank * (out_dim + per_in)
        smooth += 2 * in_dim
    report = lowrank_size_report(model)
    # the method's size hook (what `qbench quantize` writes) is this report, not the core one
    from harness.registry import get_method

    assert get_method("qartsr").create().size_report(model) == report
    assert report["model_fp32_bytes"] == fp32  # the float baseline has no QArtSR tensors
    assert report["lowrank_branch_bytes"] == branch > 0
    assert report["smoothing_bytes"] == smooth
    assert (
        report["quantized_layers_packed_bytes"] == report["residual_packed_bytes"] + branch + smooth
    )
    assert report["model_packed_bytes"] < fp32
    # merging gives the same accounting
    merge_model_for_inference(model)
    merged = lowrank_size_report(model)
    for key in (
        "lowrank_branch_bytes",
        "smoothing_bytes",
        "model_packed_bytes",
        "model_fp32_bytes",
    ):
        assert merged[key] == report[key]


# ---------------------------------------------------------------------------- RPQ


def _trainable_units(model, units):
    out = []
    for unit in units:
        flags = [
            p.requires_grad
            for layer in unit.layers.values()
            for group in layer.finetune_parameters().values()
            for p in group
        ]
        if any(flags):
            assert all(flags), f"unit {unit.name} is only partly trainable"
            out.append(unit.name)
    return out


@pytest.mark.parametrize(
    "name", ["qartsr-no-et", pytest.param("qartsr-forward-pq", marks=pytest.mark.slow)]
)
def test_rpq_order_and_exactly_the_right_parameters_update(name, calibration):
    from methods.qartsr import build_units, snapshot

    seen: list[tuple[str, list[str], dict]] = []
    holder: dict = {}

    def progress(stage, done, total):
        model = holder.get("model")
        if model is None:
            return
        if stage.startswith("qartsr init") and done == total:
            seen.append(("init", [], snapshot(model)))
        if stage.startswith("qartsr RPQ"):
            units = build_units(model, "U")
            seen.append((stage, _trainable_units(model, units), snapshot(model)))

    torch.manual_seed(0)
    model = make_random_model()
    holder["model"] = model
    config = get_method(name).make_config(
        bits="W4A4", **{**SHORT, "scope": "U", "timestep": 999, "et": False}
    )
    qmodel = quantize(model, config, calibration, progress=progress)
    units = build_units(model, "U")
    forward = [u.name for u in units]
    expected = forward[::-1] if name == "qartsr-no-et" else forward
    record = qmodel.calibration_record["method"]
    assert [m["unit"] for m in record["rpq_units"]] == expected
    rpq = [s for s in seen if s[0] != "init"]
    assert len(rpq) == len(expected)
    previous = seen[0][2]
    for k, (stage, trainable, state) in enumerate(rpq):
        assert expected[k] in stage
        assert sorted(trainable) == sorted(expected[: k + 1])
        for unit in units:
            keys = [
                key
                for key in state
                if any(key.startswith(layer + ".") for layer in unit.layers)
                and ("lowrank_" in key or "finetune_" in key or "log_smooth" in key)
            ]
            changed = any(not torch.equal(state[key], previous[key]) for key in keys)
            assert changed == (unit.name in expected[: k + 1]), (stage, unit.name)
        previous = state
    # base weights never change
    fresh = make_random_model()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_rpq_resumes_after_the_last_finished_unit(calibration, tmp_path):
    fields = dict(scope="U", timestep=999, et=False, checkpoint_dir=str(tmp_path / "ckpt"))

    def interrupt(stage, done, total):
        if stage.startswith("qartsr RPQ 3/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _quantize("qartsr", calibration, progress=interrupt, **fields)
    stages: list[str] = []
    resumed = _quantize("qartsr", calibration, progress=lambda s, d, t: stages.append(s), **fields)
    record = resumed.calibration_record["method"]
    order = [m["unit"] for m in record["rpq_units"]]
    assert record["resumed_after_units"] == order[:2]
    assert not any(s.startswith(("qartsr init", "qartsr RPQ 1/", "qartsr RPQ 2/")) for s in stages)
    straight = _quantize("qartsr", calibration, scope="U", timestep=999, et=False)
    for (key, a), b in zip(
        resumed.quant_state_dict().items(), straight.quant_state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    # a checkpoint of another config is refused
    with pytest.raises(ConfigError, match="another config"):
        _quantize("qartsr", calibration, **{**fields, "rpq_iters": 2})


# ---------------------------------------------------------------------------- TRQ / ET / variants


def test_timestep_is_bound_and_restored_after_load(calibration, tmp_path):
    from methods.qartsr import apply_retrain_timestep

    qmodel = _quantize("qartsr-t499", calibration, scope="U", rpq=False)
    assert qmodel.settings.timestep == 499
    assert qmodel.calibration_record["method"]["timestep"] == 499
    z = calibration.z_l[:1]
    with torch.no_grad():
        reference = qmodel.predict_eps(z)
        with pytest.raises(ModelError, match="T\\*=499"):
            qmodel.predict_eps(z, 999)
    save_quantized(qmodel, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", make_random_model())
    assert loaded.settings.timestep == 499  # load_quantized calls QArtSR.after_load
    assert apply_retrain_timestep(loaded) == 499  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_eps(z), reference, rtol=0, atol=0)
    term = qmodel.calibration_record["method"]["perceptual_term"]
    assert term.startswith("ssim") and "lpips" in term  # the substitute is recorded


def test_tstar_sweep_is_recorded_and_picks_the_lowest_image_loss(calibration):
    from harness.cells import extract_curves

    qmodel = _quantize(
        "qartsr", calibration, scope="U", rpq=False, tstar_grid=[999, 499, 1], et_iters=2
    )
    record = qmodel.calibration_record["method"]
    sweep = record["tstar_sweep"]
    assert sweep["timestep"] == [999, 499, 1]
    losses = sweep["image_loss"]
    assert record["timestep"] == sweep["timestep"][losses.index(min(losses))]
    assert qmodel.settings.timestep == record["timestep"]
    curves = extract_curves(record)
    assert curves["tstar_sweep"]["x"] == [999.0, 499.0, 1.0]
    assert curves["tstar_sweep"]["y"] == losses
    assert {"et", "sweep_T999", "sweep_T499", "sweep_T1"} <= set(record["curves"])


def test_et_needs_lpips_or_an_explicit_substitute(calibration):
    from harness.metrics import metric_status

    if metric_status("lpips").available:
        pytest.skip("LPIPS weights are installed here")
    with pytest.raises(MetricUnavailable, match="perceptual_substitute"):
        _quantize("qartsr", calibration, scope="U", perceptual_substitute=None)
    # without ET the LPIPS rule does not apply
    qmodel = _quantize("qartsr-t999", calibration, scope="U", rpq=False, et=False)
    assert qmodel.calibration_record["method"]["perceptual_term"].startswith("not used")


def test_ssim_loss_matches_scikit_image():
    from skimage.metrics import structural_similarity

    from methods.qartsr import ssim_loss

    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 40, 40, generator=g)
    b = (a + 0.1 * torch.randn(1, 3, 40, 40, generator=g)).clamp(0, 1)
    ours = 1 - float(ssim_loss(a, b))
    theirs = structural_similarity(
        a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(), channel_axis=2,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
    )  # fmt: skip
    assert abs(ours - theirs) < 2e-3
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_config_budget_profiles_and_validation():
    entry = get_method("qartsr")
    tiny = entry.make_config(budget="tiny")
    assert tiny.rpq_iters == 2 and tiny.batch_size == 1
    auto = entry.make_config()
    assert auto.budget == "auto" and auto.rpq_iters is None
    assert auto.resolved("tiny") == dataclasses.replace(auto, budget="tiny")
    assert auto.resolved("tiny").rpq_iters == 2
    assert auto.resolved("/models/osediff").rpq_iters == 500
    explicit = entry.make_config(budget="tiny", rpq_iters=9)
    assert explicit.rpq_iters == 9
    assert type(tiny).from_dict(tiny.to_dict()) == tiny
    assert get_method("qartsr-no-trq").make_config().trq is False
    assert get_method("qartsr-t249").make_config().timestep == 249
    for bad in (
        dict(budget="huge"),
        dict(rpq_order="sideways"),
        dict(timestep=1000),
        dict(trq=False, timestep=499),
        dict(perceptual_substitute="lpips-random"),
        dict(module_loss_weight=0.0, image_loss_weight=0.0),
        dict(bits="W1A1"),
    ):
        with pytest.raises(ConfigError):
            entry.make_config(**bad)
    assert set(QARTSR_VARIANTS) <= set(list_methods())


@pytest.mark.slow
@pytest.mark.parametrize("name", QARTSR_VARIANTS)
def test_every_variant_runs_scope_uv(name, calibration):
    qmodel = _quantize(name, calibration, scope="UV", bits="W2A2")
    record = qmodel.calibration_record["method"]
    assert record["holdout_image_loss"]["after_et"] is not None
    with torch.no_grad():
        out = qmodel(calibration.batch([0]).x)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", QARTSR_VARIANTS[:8])
def test_every_ablation_variant_runs_scope_u(name, calibration):
    qmodel = _quantize(name, calibration, scope="U")
    record = qmodel.calibration_record["method"]
    config = qmodel.config
    assert record["rpq"] == config.rpq and record["et"] == config.et
    if not config.trq:
        assert record["timestep"] == 999 and "tstar_sweep" not in record
    if not config.lowrank:
        assert all(layer.rank == 0 for _, layer in iter_lowrank_layers(qmodel.model))
    with torch.no_grad():
        out = qmodel.predict_eps(calibration.z_l[:1])
    assert torch.isfinite(out).all()

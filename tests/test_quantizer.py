"""The uniform affine fake quantizer, its rounding/zero-point conventions and the range setters."""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError
from harness.quant.quantizer import (
    EmaMinMaxObserver,
    FakeQuantizer,
    LpSearchObserver,
    MinMaxObserver,
    QuantizerNotCalibrated,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    lp_search_range,
    observed_min_max,
    round_ste,
)

torch.set_num_threads(1)


def test_spec_rejects_bits_outside_2_to_8():
    for bits in (1, 9, 16):
        with pytest.raises(ConfigError, match=str(bits)):
            QuantSpec(bits=bits)
    assert QuantSpec(bits=2).levels == 4
    assert (QuantSpec(bits=4, signed=True).qmin, QuantSpec(bits=4, signed=True).qmax) == (-8, 7)


def test_round_half_away_from_zero_and_straight_through_gradient():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49], requires_grad=True)
    away = round_ste(x, "half_away")
    assert away.tolist() == [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 0.0]
    assert round_ste(x, "half_even").tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0]
    away.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_passionsr_zero_point_convention_and_exact_grid():
    spec = QuantSpec(bits=4)
    x_min, x_max = torch.tensor(-1.0), torch.tensor(2.0)
    delta, zp = compute_qparams(x_min, x_max, spec)
    assert float(delta) == pytest.approx(3.0 / 15)
    assert float(zp) == -5.0  # Round(-1 / 0.2) = -5 <= 0
    grid = (torch.arange(16) + zp) * delta  # every representable value
    # grid points are fixed points; the range ends are representable
    assert torch.allclose(fake_quantize(grid, delta, zp, spec), grid)
    assert float(grid.min()) == pytest.approx(-1.0) and float(grid.max()) == pytest.approx(2.0)
    # values beyond the range clip to the ends; in-range error is at most delta/2
    x = torch.linspace(-3, 4, 701)
    xq = fake_quantize(x, delta, zp, spec)
    assert float(xq.min()) == pytest.approx(-1.0) and float(xq.max()) == pytest.approx(2.0)
    inside = (x >= -1) & (x <= 2)
    assert float((x - xq)[inside].abs().max()) <= float(delta) / 2 + 1e-6
    assert len(torch.unique(xq)) <= 16


def test_signed_grid_gives_the_same_values_as_unsigned():
    x = torch.randn(1000)
    lo, hi = x.min(), x.max()
    unsigned = QuantSpec(bits=3)
    signed = QuantSpec(bits=3, signed=True)
    a = fake_quantize(x, *compute_qparams(lo, hi, unsigned), unsigned)
    b = fake_quantize(x, *compute_qparams(lo, hi, signed), signed)
    assert torch.allclose(a, b, atol=1e-6)


def test_symmetric_signed_and_unsigned():
    spec = QuantSpec(bits=8, symmetric=True, signed=True)
    delta, zp = compute_qparams(torch.tensor(-3.0), torch.tensor(2.0), spec)
    assert float(delta) == pytest.approx(3.0 / 128) and float(zp) == 0.0
    x = torch.tensor([-3.0, 0.0, 3.0])
    assert fake_quantize(x, delta, zp, spec).tolist() == pytest.approx([-3.0, 0.0, 127 * 3 / 128])
    one_sided = QuantSpec(bits=4, symmetric=True)
    delta, zp = compute_qparams(torch.tensor(0.0), torch.tensor(1.5), one_sided)
    assert float(delta) == pytest.approx(0.1)
    assert fake_quantize(torch.tensor([-1.0, 1.5]), delta, zp, one_sided).tolist() == pytest.approx(
        [0, 1.5]
    )


def test_per_channel_and_per_group_ranges_round_trip():
    w = torch.randn(8, 4, 3, 3)
    q = FakeQuantizer(QuantSpec(bits=8, granularity="channel"), tuple(w.shape))
    q.set_range(*observed_min_max(w, q.spec))
    assert q.x_min.shape == (8,)
    assert torch.allclose(q.x_min, w.reshape(8, -1).amin(1))
    err = (q(w) - w).abs().reshape(8, -1).amax(1)
    delta = (q.x_max - q.x_min) / 255
    assert bool((err <= delta / 2 + 1e-6).all())

    g = FakeQuantizer(QuantSpec(bits=4, granularity="group", group_size=12), tuple(w.shape))
    g.set_range(*observed_min_max(w, g.spec))
    assert g.x_min.shape == (8, 3)
    assert torch.allclose(g.x_max, w.reshape(8, 3, 12).amax(-1))
    out = g(w)
    assert out.shape == w.shape
    # each group uses at most 16 distinct values
    assert all(len(torch.unique(v)) <= 16 for v in out.reshape(8, 3, 12).reshape(24, 12))
    with pytest.raises(ConfigError, match="group_size"):
        FakeQuantizer(QuantSpec(bits=4, granularity="group", group_size=7), tuple(w.shape))


def test_range_is_learnable_through_ste():
    q = FakeQuantizer(QuantSpec(bits=4))
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    q.make_range_learnable()
    assert isinstance(q.x_min, torch.nn.Parameter) and "x_min" in dict(q.named_parameters())
    x = torch.randn(256) * 2
    loss = ((q(x) - x) ** 2).mean()
    loss.backward()
    assert q.x_max.grad is not None and float(q.x_max.grad) != 0.0
    assert set(q.state_dict()) == {"x_min", "x_max", "initialized"}


def test_uncalibrated_quantizer_refuses_and_disabled_passes_through():
    q = FakeQuantizer(QuantSpec(bits=4))
    with pytest.raises(QuantizerNotCalibrated):
        q(torch.randn(3))
    q.enabled = False
    x = torch.randn(3)
    assert torch.equal(q(x), x)


def test_running_minmax_and_ema_observers():
    q = FakeQuantizer(QuantSpec(bits=8))
    q.observer = MinMaxObserver(running=True)
    q(torch.tensor([0.0, 1.0]))
    q(torch.tensor([-2.0, 0.5]))
    assert (float(q.x_min), float(q.x_max)) == (-2.0, 1.0)
    e = FakeQuantizer(QuantSpec(bits=8))
    e.observer = EmaMinMaxObserver(momentum=0.9)
    e(torch.tensor([0.0, 1.0]))
    e(torch.tensor([-1.0, 3.0]))
    assert float(e.x_min) == pytest.approx(-0.1) and float(e.x_max) == pytest.approx(1.2)


def _brute_force_2d(x, bits, p=2.4, num=100):
    """QDrop's perform_2D_search written out literally (reference for the vectorized search)."""
    levels = 2**bits
    x_min, x_max = float(x.min()), float(x.max())
    best, best_range = float("inf"), None
    for i in range(1, num + 1):
        delta = max((x_max - x_min) * i / num / (levels - 1), 1e-8)
        for zp in range(levels):
            q = torch.clamp(torch.round(x / delta) + zp, 0, levels - 1) - zp
            score = float(((x - q * delta).abs() ** p).mean())
            if score < best:
                best, best_range = score, (-zp * delta, (levels - 1 - zp) * delta)
    return best_range


@pytest.mark.parametrize("shift", [0.0, 1.3, -0.8])
def test_lp_2d_search_equals_qdrop_grid_search(shift):
    x = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 1.5 + shift
    lo, hi = lp_search_range(x, QuantSpec(bits=3, rounding="half_even"))
    ref = _brute_force_2d(x, 3)
    assert float(lo) == pytest.approx(ref[0], abs=1e-4) and float(hi) == pytest.approx(
        ref[1], abs=1e-4
    )


def test_lp_1d_search_for_symmetric_and_one_sided_tensors():
    w = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 20.0  # an outlier the L2.4 search should clip in channel 0
    spec = QuantSpec(bits=4, granularity="channel", rounding="half_even")
    lo, hi = lp_search_range(w, spec, symmetric_range=True)
    assert torch.allclose(lo, -hi)
    assert float(hi[0]) < 20.0  # the outlier is clipped
    # channel 0's threshold is the argmin of mean |w - Q(w)|^2.4 over the 100 thresholds
    row = w[0]
    probe = QuantSpec(bits=4, rounding="half_even")

    def score(t: torch.Tensor) -> float:
        d, z = compute_qparams(-t, t, probe)
        return float(((row - fake_quantize(row, d, z, probe)).abs() ** 2.4).mean())

    # thresholds computed in float32 like the search (symmetric ranges put x_min/Δ on a .5 tie)
    scores = [score(row.abs().max() * (i / 100)) for i in range(1, 101)]
    assert score(hi[0]) == pytest.approx(min(scores), rel=1e-6)
    absmax = w.abs().amax(1)
    # thresholds are on the grid (i/100)·max(|min|, max)
    steps = hi / absmax * 100
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    # one-sided (softmax-like) input: range [0, t]
    probs = torch.rand(1000)
    lo, hi = lp_search_range(probs, QuantSpec(bits=4))
    assert float(lo) == 0.0 and 0 < float(hi) <= 1.0


def test_lp_search_observer_emas_the_per_batch_result():
    q = FakeQuantizer(QuantSpec(bits=4, rounding="half_even"))
    q.observer = LpSearchObserver(ema_momentum=0.9)
    a, b = torch.randn(500), torch.randn(500) * 3
    q(a)
    first = (q.x_min.clone(), q.x_max.clone())
    lo_b, hi_b = lp_search_range(b, q.spec, one_side="no")
    q(b)
    assert torch.allclose(q.x_min, 0.9 * first[0] + 0.1 * lo_b)
    assert torch.allclose(q.x_max, 0.9 * first[1] + 0.1 * hi_b)
    assert q.observer.describe()["calls"] == 2


def test_capped_2d_search_keeps_the_tails_and_stays_close_to_the_full_search():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20000, generator=g)
    x[:5] = torch.tensor([25.0, -18.0, 30.0, 22.0, -20.0])  # rare outliers a plain subsample misses
    spec = QuantSpec(bits=6, rounding="half_even")
    full = lp_search_range(x, spec)
    capped = lp_search_range(x, spec, max_elements=2048, generator=torch.Generator().manual_seed(0))
    probe = QuantSpec(bits=6, rounding="half_even")

    def loss(r):
        d, z = compute_qparams(r[0], r[1], probe)
        return float(((x - fake_quantize(x, d, z, probe)).abs() ** 2.4).mean())

    assert loss(capped) <= loss(full) * 1.05  # near-optimal on ALL elements
    from harness.quant.quantizer import _stratified_sample

    data, weights = _stratified_sample(x.reshape(1, -1), 2048, torch.Generator().manual_seed(0))
    assert data.shape[1] == weights.shape[0] <= 2048
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(data.max()) == 30.0 and float(data.min()) == -20.0


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_inference_rounding_equals_the_straight_through_form_exactly(rounding):
    """The no-grad fast path of round_ste returns the same values as x + (round(x) − x)."""
    from harness.quant.quantizer import round_ste

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10000, generator=g) * 300, torch.arange(-8, 8) + 0.5])
    with torch.no_grad():
        fast = round_ste(x, rounding)
    slow = round_ste(x.clone().requires_grad_(True), rounding).detach()
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("symmetric", [False, True])
def test_inference_fake_quantize_equals_the_training_form_exactly(symmetric):
    """fake_quantize's no-grad form (one clamp with shifted bounds) gives the training form's values."""
    from harness.quant.quantizer import QuantSpec, compute_qparams, fake_quantize

    g = torch.Generator().manual_seed(1)
    spec = QuantSpec(bits=4, granularity="channel", axis=0, symmetric=symmetric)
    x = torch.randn(8, 500, generator=g) * torch.linspace(0.1, 5, 8)[:, None]
    x_min, x_max = x.amin(1) * 0.7, x.amax(1) * 0.8
    delta, zero_point = compute_qparams(x_min, x_max, spec)
    delta, zero_point = delta[:, None], zero_point[:, None]
    with torch.no_grad():
        fast = fake_quantize(x, delta, zero_point, spec)
    slow = fake_quantize(x.clone().requires_grad_(True), delta, zero_point, spec).detach()
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, x)  # it did quantize

"""The uniform affine fake quantizer and the range setters (observers) that calibrate it.

Simulated ("fake") quantization: a tensor is mapped to integer codes and straight back to floats, so
the network computes in float with quantized *values*. It measures accuracy, not speed or memory.

Conventions (methods.md §3, PassionSR ``quantization/saw/quant_layer.py``):

- A quantizer holds a clipping range ``x_min``/``x_max`` as tensors (buffers by default; a subclass or
  :meth:`FakeQuantizer.make_range_learnable` turns them into ``nn.Parameter`` for PassionSR's LBQ).
  The step and zero point are recomputed from the range on every call, so gradients reach the range.
- Asymmetric: Δ = (x_max − x_min)/(q_max − q_min), z = Round(x_min/Δ) − q_min,
  q = clamp(Round(x/Δ) − z, q_min, q_max), x̂ = (q + z)·Δ. On the unsigned grid [0, 2^b − 1]
  (q_min = 0) this is exactly PassionSR's form with z = Round(x_min/Δ) ≤ 0; on the signed grid
  [−2^(b−1), 2^(b−1) − 1] the dequantized values are the same, only the stored codes shift.
- Symmetric (PassionSR ``sym=True``): z = 0; signed grid Δ = max(|x_min|, |x_max|)/2^(b−1);
  unsigned grid Δ = max(|x_min|, |x_max|)/(2^b − 1) (a one-sided grid: negatives clip to 0).
- Rounding ``"half_away"`` is PassionSR's ``Round``: sign(x)·floor(|x| + 0.5) (half away from zero);
  ``"half_even"`` is ``torch.round`` as in PTQ4DM/QDrop's ``round_ste``. Both use a straight-through
  estimator (identity gradient).
- Δ is clamped to at least :data:`MIN_DELTA` so a constant tensor (x_min = x_max) cannot divide by 0.

PTQ4DM's "symmetric" (QDrop ``sym=True``) is *not* the signed symmetric grid above: QDrop searches a
symmetric clipping range [−t, t] and then quantizes it with the asymmetric formula on the unsigned grid
(zero point ≈ 2^(b−1)). :class:`LpSearchObserver` with ``symmetric_range=True`` reproduces that with an
asymmetric :class:`QuantSpec`.

Granularity: ``"tensor"`` (one range), ``"channel"`` (one range per index of ``axis``) or ``"group"``
(per output channel and per group of ``group_size`` consecutive elements of the flattened remaining
dims; weights only, ``axis`` 0). Range tensors are stored flat: ``[]``, ``[C]`` or ``[C, G]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from harness.errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8
MIN_DELTA = 1e-8
GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("half_away", "half_even")


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer does: bits, grid, symmetry, granularity and rounding (all validated)."""

    bits: int
    symmetric: bool = False
    signed: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 0
    rounding: str = "half_away"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"quantizer bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"quantizer bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.granularity == "group":
            if self.group_size < 1:
                raise ConfigError(f"group granularity needs group_size >= 1, got {self.group_size}")
            if self.axis != 0:
                raise ConfigError("group granularity is defined along axis 0 (output channels)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    def with_bits(self, bits: int) -> QuantSpec:
        return QuantSpec(**{**asdict(self), "bits": bits})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown quantizer spec key(s): {', '.join(sorted(unknown))}")
        return cls(**data)


# --------------------------------------------------------------------------- pure functions


def round_ste(x: torch.Tensor, rounding: str = "half_away") -> torch.Tensor:
    """Round with a straight-through gradient.

    ``half_away``: sign(x)·floor(|x| + 0.5) (PassionSR ``Round.apply``); ``half_even``: ``torch.round``
    (QDrop/PTQ4DM ``round_ste``).
    """
    if rounding == "half_away":
        rounded = torch.sign(x) * torch.floor(x.abs() + 0.5)
    else:
        rounded = torch.round(x)
    if not (x.requires_grad and torch.is_grad_enabled()):
        # Inference: the straight-through form x + (r − x) equals r exactly here (r is an integer
        # within 0.5 of x, so r − x and the sum are exact in floating point): skip its two ops.
        return rounded
    return x + (rounded - x).detach()


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step Δ and zero point z from a clipping range (module docstring). Differentiable (STE)."""
    if spec.symmetric:
        absmax = torch.maximum(x_min.abs(), x_max.abs())
        denom = 2 ** (spec.bits - 1) if spec.signed else spec.qmax
        delta = torch.clamp(absmax / denom, min=MIN_DELTA)
        return delta, torch.zeros_like(delta)
    delta = torch.clamp((x_max - x_min) / (spec.qmax - spec.qmin), min=MIN_DELTA)
    zero_point = round_ste(x_min / delta, spec.rounding) - spec.qmin
    return delta, zero_point


def fake_quantize(
    x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """x̂ = (clamp(Round(x/Δ) − z, q_min, q_max) + z)·Δ with broadcastable Δ, z."""
    if not torch.is_grad_enabled():
        # Inference: z is an integer, so clamp(r − z, q_min, q_max) + z = clamp(r, q_min + z,
        # q_max + z) exactly (integers below 2^24 in float32): two fewer full-size ops.
        r = round_ste(x / delta, spec.rounding)
        return torch.clamp(r, zero_point + spec.qmin, zero_point + spec.qmax) * delta
    q = torch.clamp(round_ste(x / delta, spec.rounding) - zero_point, spec.qmin, spec.qmax)
    return (q + zero_point) * delta


def integer_codes(
    x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """The integer codes q (in [q_min, q_max], int32) that :func:`fake_quantize` dequantizes."""
    with torch.no_grad():
        q = torch.clamp(round_ste(x / delta, spec.rounding) - zero_point, spec.qmin, spec.qmax)
    return q.to(torch.int32)


def range_shape(spec: QuantSpec, tensor_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Shape of the flat ``x_min``/``x_max`` tensors for a tensor of ``tensor_shape``."""
    if spec.granularity == "tensor":
        return ()
    if tensor_shape is None:
        raise ConfigError(f"{spec.granularity} granularity needs the tensor shape up front")
    channels = tensor_shape[spec.axis]
    if spec.granularity == "channel":
        return (channels,)
    inner = math.prod(tensor_shape) // channels
    if inner % spec.group_size:
        raise ConfigError(
            f"group_size {spec.group_size} does not divide the {inner} elements per output channel "
            f"of a tensor of shape {tuple(tensor_shape)}"
        )
    return (channels, inner // spec.group_size)


def to_range_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape ``x`` so that flat range tensors broadcast against it after :func:`expand_range`.

    tensor: unchanged; channel: unchanged (ranges are expanded along ``axis``); group: ``[C, G, gs]``.
    """
    if spec.granularity == "group":
        return x.reshape(x.shape[0], -1, spec.group_size)
    return x


def expand_range(r: torch.Tensor, spec: QuantSpec, ndim: int) -> torch.Tensor:
    """Make a flat range tensor broadcastable against the range view of an ``ndim``-D tensor."""
    if spec.granularity == "tensor":
        return r
    if spec.granularity == "group":
        return r.unsqueeze(-1)
    axis = spec.axis % ndim
    shape = [1] * ndim
    shape[axis] = r.shape[0]
    return r.reshape(shape)


def observed_min_max(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` at the spec's granularity, as flat range tensors (detached)."""
    x = x.detach()
    if spec.granularity == "tensor":
        return x.amin(), x.amax()
    if spec.granularity == "group":
        view = to_range_view(x, spec)
        return view.amin(dim=-1), view.amax(dim=-1)
    axis = spec.axis % x.dim()
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return moved.amin(dim=1), moved.amax(dim=1)


def _flatten_units(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as ``[units, elements]`` where each unit has its own range (tensor: one unit)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        return to_range_view(x, spec).reshape(-1, spec.group_size)
    axis = spec.axis % x.dim()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _unflatten_range(r: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    if spec.granularity == "tensor":
        return r.reshape(())
    return r.reshape(shape)


def lp_search_range(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    p: float = 2.4,
    num_candidates: int = 100,
    symmetric_range: bool = False,
    one_side: str | None = None,
    max_elements: int | None = None,
    evaluation_budget: int | None = None,
    min_search_elements: int = 1024,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PTQ4DM/QDrop's clipping-range search minimizing mean |x − Q(x)|^p (p = 2.4).

    Reference: PTQ4DM ``QDrop/quant/quant_layer.py`` ``get_x_min_x_max``/``perform_1D_search``/
    ``perform_2D_search`` (methods.md §5.3).

    - ``one_side`` ('pos' if min ≥ 0, 'neg' if max ≤ 0, 'no' otherwise; computed from ``x`` when None).
    - 1-D search when ``symmetric_range`` or one-sided: thresholds t_i = (i/N)·max(|min|, max),
      i = 1..N; range [−t, t] ([0, t] if 'pos', [−t, 0] if 'neg').
    - 2-D search otherwise: widths w_i = (i/N)·(max − min), Δ_i = w_i/(2^b − 1); for every zero point
      zp in 0..2^b − 1 the range is [−zp·Δ_i, w_i − zp·Δ_i] (always contains 0, as QDrop's
      ``calculate_qparams`` forces).
    - The score of a candidate is the mean over the unit's elements of |x − Q(x)|^p; the first minimum
      in search order wins (QDrop keeps a candidate only if strictly better).
    - The 2-D search evaluates only zero points that can be the first minimum (exact pruning, see
      the code comment); the result equals the full 100 × 2^b grid search on the same elements.
    - Deviation (CPU cost): the 2-D search may score candidates on E elements per unit,
      E = min(``max_elements``, max(``min_search_elements``, ``evaluation_budget`` / (100·2^b))) when
      set: the E/8 smallest and E/8 largest elements exactly plus a seeded uniform sample of the rest,
      weighted so the score is an unbiased estimate of the mean over all elements
      (:func:`_stratified_sample`); min/max (and so the candidate grid) always come from the full
      tensor. The 1-D searches use every element.

    Works per tensor, per channel and per group; returns flat ``(x_min, x_max)``.
    """
    x = x.detach().float()
    units = _flatten_units(x, spec)  # [U, E]
    shape = range_shape(spec, tuple(x.shape)) if spec.granularity != "tensor" else ()
    u_min, u_max = units.amin(dim=1), units.amax(dim=1)
    if one_side is None:
        one_side = "pos" if float(u_min.min()) >= 0 else "neg" if float(u_max.max()) <= 0 else "no"
    # candidates are scored with the spec's own grid at per-unit (flat) granularity
    probe = QuantSpec(
        bits=spec.bits, symmetric=spec.symmetric, signed=spec.signed, rounding=spec.rounding
    )

    def score(lo: torch.Tensor, hi: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        delta, zp = compute_qparams(lo, hi, probe)
        xq = fake_quantize(data, delta.unsqueeze(-1), zp.unsqueeze(-1), probe)
        return (data - xq).abs().pow(p).mean(dim=-1)

    if symmetric_range or spec.symmetric or one_side != "no":
        absmax = torch.maximum(u_min.abs(), u_max)
        best_score = torch.full_like(absmax, float("inf"))
        best_lo, best_hi = u_min.clone(), u_max.clone()
        for i in range(1, num_candidates + 1):
            thres = absmax * (i / num_candidates)
            lo = torch.zeros_like(thres) if one_side == "pos" else -thres
            hi = torch.zeros_like(thres) if one_side == "neg" else thres
            s = score(lo, hi, units)
            better = s < best_score
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
            best_score = torch.where(better, s, best_score)
        return _unflatten_range(best_lo, spec, shape), _unflatten_range(best_hi, spec, shape)

    levels = probe.levels
    budget_elements = None
    if evaluation_budget is not None:
        budget_elements = max(min_search_elements, evaluation_budget // (num_candidates * levels))
    cap = min(c for c in (max_elements, budget_elements, units.shape[1]) if c is not None)
    data, weights = _stratified_sample(units, cap, generator)
    width_full = u_max - u_min  # [U]
    device = units.device
    zps = torch.arange(levels, dtype=torch.float32, device=device)  # [L]
    scores = torch.full((units.shape[0], num_candidates, levels), float("inf"), device=device)
    # zero points per chunk so that one [U, chunk, E] temporary stays below ~16M elements
    chunk = max(1, min(levels, (1 << 24) // max(1, data.numel())))
    for i in range(1, num_candidates + 1):
        delta = torch.clamp(width_full * (i / num_candidates) / (levels - 1), min=MIN_DELTA)  # [U]
        r = round_ste(data / delta[:, None], spec.rounding)  # [U, E]
        # Exact pruning: with window [a, a + L - 1] (a = -zp), a window that leaves empty buckets
        # below the data is weakly beaten by the next higher window (earlier in search order), and
        # one that leaves empty buckets above while clipping below is strictly beaten by the next
        # lower one; only a in [min(lo, hi), max(lo, hi)] can be the first minimum.
        lo_a = r.amin(dim=1).clamp(-(levels - 1), 0)
        hi_a = (r.amax(dim=1) - (levels - 1)).clamp(-(levels - 1), 0)
        zp_first = (-torch.maximum(lo_a, hi_a)).long()  # [U]
        zp_last = (-torch.minimum(lo_a, hi_a)).long()
        z_start, z_stop = int(zp_first.min()), int(zp_last.max()) + 1
        for start in range(z_start, z_stop, chunk):
            stop = min(start + chunk, z_stop)
            # zero point zp allows the integer multiples of Δ in [−zp, levels − 1 − zp]
            low = -zps[None, start:stop, None]  # [1, c, 1]
            clipped = torch.maximum(torch.minimum(r[:, None, :], low + (levels - 1)), low)
            err = (data[:, None, :] - clipped * delta[:, None, None]).abs().pow(p)
            err = (err * weights).sum(dim=-1)
            zp_ids = torch.arange(start, stop, device=device)[None, :]
            keep = (zp_ids >= zp_first[:, None]) & (zp_ids <= zp_last[:, None])
            scores[:, i - 1, start:stop] = torch.where(
                keep, err, torch.full_like(err, float("inf"))
            )
    flat = scores.reshape(units.shape[0], -1)
    best = flat.argmin(dim=1)  # first minimum in (width, zero point) order
    i_best = best // levels + 1
    zp_best = (best % levels).float()
    delta_best = torch.clamp(
        width_full * (i_best.float() / num_candidates) / (levels - 1), min=MIN_DELTA
    )
    lo = -zp_best * delta_best
    hi = lo + delta_best * (levels - 1)
    return _unflatten_range(lo, spec, shape), _unflatten_range(hi, spec, shape)


def _stratified_sample(
    units: torch.Tensor, cap: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements to score and their weights (summing to 1 per unit) for a mean over ``units``' rows.

    Without a cap: every element, weight 1/E. With ``cap`` < E: the cap/8 smallest and cap/8 largest
    elements of each row exactly (weight 1/E: the tails decide the clipping and the L_2.4 loss is
    tail-sensitive) plus a seeded uniform sample (with replacement) of the rest, weighted so that the
    weighted sum is an unbiased estimate of the mean over all elements.
    """
    n = units.shape[1]
    if cap >= n:
        return units, torch.full((n,), 1.0 / n, device=units.device)
    tail = max(1, cap // 8)
    middle = max(1, cap - 2 * tail)
    ordered = torch.sort(units, dim=1).values
    picks = tail + torch.randint(0, n - 2 * tail, (middle,), generator=generator).to(units.device)
    data = torch.cat([ordered[:, :tail], ordered[:, picks], ordered[:, n - tail :]], dim=1)
    weights = torch.cat(
        [
            torch.full((tail,), 1.0 / n),
            torch.full((middle,), (n - 2 * tail) / (middle * n)),
            torch.full((tail,), 1.0 / n),
        ]
    ).to(units.device)
    return data, weights


# --------------------------------------------------------------------------- observers


class RangeObserver:
    """Sets a quantizer's range from the tensors it sees during calibration.

    One instance per quantizer (it may keep per-quantizer state). :meth:`observe` is called with the
    quantizer's (transformed) input before it is quantized; it must write the new range with
    :meth:`FakeQuantizer.set_range`.
    """

    name = "observer"

    def observe(self, quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"observer": self.name}


class MinMaxObserver(RangeObserver):
    """Min/max of the observed tensor; ``running=True`` keeps the running min and max over calls."""

    name = "minmax"

    def __init__(self, running: bool = True):
        self.running = running

    def observe(self, quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        lo, hi = observed_min_max(x, quantizer.spec)
        if self.running and quantizer.is_initialized:
            lo = torch.minimum(lo, quantizer.x_min.detach())
            hi = torch.maximum(hi, quantizer.x_max.detach())
        quantizer.set_range(lo, hi)

    def describe(self) -> dict:
        return {"observer": self.name, "running": self.running}


class EmaMinMaxObserver(RangeObserver):
    """EMA of per-call min/max: range ← momentum·range + (1 − momentum)·new (first call: new)."""

    name = "ema_minmax"

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def observe(self, quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        lo, hi = observed_min_max(x, quantizer.spec)
        if quantizer.is_initialized:
            m = self.momentum
            lo = m * quantizer.x_min.detach() + (1 - m) * lo
            hi = m * quantizer.x_max.detach() + (1 - m) * hi
        quantizer.set_range(lo, hi)

    def describe(self) -> dict:
        return {"observer": self.name, "momentum": self.momentum}


class LpSearchObserver(RangeObserver):
    """PTQ4DM: per-call L_p grid search (:func:`lp_search_range`), optionally EMA-averaged over calls.

    ``ema_momentum=0.9`` gives PTQ4DM's activation rule running = 0.9·old + 0.1·new; ``None`` keeps the
    last search result (used for weights, which are searched once). The one-sidedness of the
    distribution is fixed at the first call, as QDrop does.
    """

    name = "lp_search"

    def __init__(
        self,
        p: float = 2.4,
        num_candidates: int = 100,
        symmetric_range: bool = False,
        ema_momentum: float | None = None,
        max_elements: int | None = None,
        evaluation_budget: int | None = None,
        seed: int = 0,
    ):
        self.p = p
        self.num_candidates = num_candidates
        self.symmetric_range = symmetric_range
        self.ema_momentum = ema_momentum
        self.max_elements = max_elements
        self.evaluation_budget = evaluation_budget
        self.seed = seed
        self.one_side: str | None = None
        self.calls = 0
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        if self.one_side is None:
            lo, hi = float(x.min()), float(x.max())
            self.one_side = "pos" if lo >= 0 else "neg" if hi <= 0 else "no"
        lo, hi = lp_search_range(
            x,
            quantizer.spec,
            p=self.p,
            num_candidates=self.num_candidates,
            symmetric_range=self.symmetric_range,
            one_side=self.one_side,
            max_elements=self.max_elements,
            evaluation_budget=self.evaluation_budget,
            generator=self._generator,
        )
        lo, hi = lo.to(quantizer.x_min.device), hi.to(quantizer.x_min.device)
        if self.ema_momentum is not None and quantizer.is_initialized:
            m = self.ema_momentum
            lo = m * quantizer.x_min.detach() + (1 - m) * lo
            hi = m * quantizer.x_max.detach() + (1 - m) * hi
        quantizer.set_range(lo, hi)
        self.calls += 1

    def describe(self) -> dict:
        return {
            "observer": self.name,
            "p": self.p,
            "num_candidates": self.num_candidates,
            "symmetric_range": self.symmetric_range,
            "ema_momentum": self.ema_momentum,
            "max_elements": self.max_elements,
            "evaluation_budget": self.evaluation_budget,
            "seed": self.seed,
            "one_side": self.one_side,
            "calls": self.calls,
        }


# --------------------------------------------------------------------------- module


class QuantizerNotCalibrated(RuntimeError):
    """An enabled quantizer was used before its range was set (a method forgot to calibrate it)."""


class FakeQuantizer(nn.Module):
    """Uniform affine fake quantizer with its range as tensors ``x_min``/``x_max``.

    - ``enabled``: when False the input passes through unchanged.
    - ``observer``: when set, every call first updates the range from the input (calibration).
    - ``initialized`` (a persistent buffer) records whether a range has been set; an enabled,
      uninitialized quantizer without an observer raises :class:`QuantizerNotCalibrated`.

    ``tensor_shape`` is needed for channel/group granularity (weights: the weight's shape; channel-wise
    activations: any shape with the right size along ``axis``).
    """

    def __init__(self, spec: QuantSpec, tensor_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec
        shape = range_shape(spec, tensor_shape)
        self.register_buffer("x_min", torch.zeros(shape))
        self.register_buffer("x_max", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = True
        self.observer: RangeObserver | None = None

    # -- range
    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def set_range(self, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        """Write a new clipping range (keeps Parameters as Parameters)."""
        x_min = torch.as_tensor(x_min, dtype=self.x_min.dtype).to(self.x_min.device)
        x_max = torch.as_tensor(x_max, dtype=self.x_max.dtype).to(self.x_max.device)
        if x_min.shape != self.x_min.shape or x_max.shape != self.x_max.shape:
            raise ValueError(
                f"range shape {tuple(x_min.shape)} does not match the quantizer's "
                f"{tuple(self.x_min.shape)}"
            )
        with torch.no_grad():
            self.x_min.copy_(x_min)
            self.x_max.copy_(x_max)
            self.initialized.fill_(True)

    def make_range_learnable(self) -> None:
        """Turn ``x_min``/``x_max`` into ``nn.Parameter`` (PassionSR LBQ); state-dict keys stay the same."""
        for name in ("x_min", "x_max"):
            value = getattr(self, name)
            if isinstance(value, nn.Parameter):
                continue
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(value.detach().clone()))

    def qparams(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ and z broadcastable against the range view of an ``ndim``-D tensor."""
        delta, zero_point = compute_qparams(self.x_min, self.x_max, self.spec)
        return expand_range(delta, self.spec, ndim), expand_range(zero_point, self.spec, ndim)

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observer is not None:
            self.observer.observe(self, x)
        if not self.is_initialized:
            raise QuantizerNotCalibrated(
                "quantizer used before its range was set (attach an observer or call set_range)"
            )
        view = to_range_view(x, self.spec)
        delta, zero_point = self.qparams(view.dim())
        return fake_quantize(view, delta, zero_point, self.spec).reshape(x.shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (same shape as ``x``), for packing."""
        view = to_range_view(x, self.spec)
        delta, zero_point = self.qparams(view.dim())
        return integer_codes(view, delta, zero_point, self.spec).reshape(x.shape)

    def extra_repr(self) -> str:
        s = self.spec
        sym = "sym" if s.symmetric else "asym"
        grid = "signed" if s.signed else "unsigned"
        return f"{s.bits}-bit {sym} {grid} {s.granularity}, enabled={self.enabled}"

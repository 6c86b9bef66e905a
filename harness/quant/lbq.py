"""PassionSR's Learnable Boundary Quantizer (LBQ): a fake quantizer whose clipping range is learned.

Reference: Zhu et al., "PassionSR" (CVPR 2025), released code ``quantization/saw/quant_layer.py``
``Basic2DquantLayer`` and the overview figure (methods.md §6.2). Paper form::

    Q(x) = (B_u − B_l)/(2^N − 1) · round[(2^N − 1)/(B_u − B_l) · (clip(x, B_l, B_u) − B_l)] + B_l

Code form (what is implemented, through :class:`~harness.quant.quantizer.FakeQuantizer`): ``x_min``
(B_l) and ``x_max`` (B_u) are ``nn.Parameter``; every forward recomputes Δ = (x_max − x_min)/(2^b − 1)
and z = Round(x_min/Δ) (straight-through), q = clamp(Round(x/Δ) − z, 0, 2^b − 1), x̂ = (q + z)·Δ.
Gradients reach both boundaries through Δ and z (STE on both roundings). Asymmetric, unsigned grid,
rounding half away from zero (PassionSR ``Round``) unless the spec says otherwise.

Public API (small on purpose; QArtSR reuses it):

- :class:`LearnableBoundaryQuantizer` ``(spec, tensor_shape=None)``: a ``FakeQuantizer`` whose
  ``x_min``/``x_max`` are Parameters from construction. Same constructor, same state-dict keys
  (``x_min``, ``x_max``, ``initialized``), same ``set_range``/observer/``enabled`` behaviour, so any
  ``QuantLayer`` or ``AttentionQuantizers`` can hold it. Per-output-channel for weights
  (``QuantSpec(granularity="channel", axis=0)``), per-tensor for activations (the default spec); the
  split-input halves of a UNet layer are separate quantizers, each of which can be an LBQ.
  ``LearnableBoundaryQuantizer.from_quantizer(q)`` copies a quantizer (spec, range, flags, observer).
  ``enforce_order_(min_gap)`` keeps x_max ≥ x_min + min_gap after an optimizer step.
- :func:`convert_to_lbq` ``(module) -> int``: replace every plain ``FakeQuantizer`` under ``module``
  in place with an LBQ copy (ranges kept); returns how many were replaced.
- :func:`lbq_parameters` ``(module) -> list[nn.Parameter]``: every boundary Parameter under
  ``module`` (x_min, x_max of each LBQ), in module order, without duplicates.
- :func:`set_lbq_trainable` ``(module, trainable)``: ``requires_grad`` of those boundaries.
- :func:`enforce_lbq_order` ``(module, min_gap)``: ``enforce_order_`` on every LBQ under ``module``.

Deviation: :meth:`LearnableBoundaryQuantizer.enforce_order_` is a safeguard PassionSR does not have.
It only acts when a step makes the boundaries cross or touch (x_max − x_min < ``min_gap``), which with
PassionSR's lr 1e-5 never happens; with the larger learning rates of a short CPU budget it prevents a
quantizer from collapsing to one level (Δ would be clamped to its minimum and z explode).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from harness.quant.quantizer import FakeQuantizer, QuantSpec

DEFAULT_MIN_GAP = 1e-6


class LearnableBoundaryQuantizer(FakeQuantizer):
    """A :class:`FakeQuantizer` with learnable boundaries ``x_min`` (B_l) and ``x_max`` (B_u)."""

    def __init__(self, spec: QuantSpec, tensor_shape: tuple[int, ...] | None = None):
        super().__init__(spec, tensor_shape)
        self.make_range_learnable()

    @classmethod
    def from_quantizer(cls, quantizer: FakeQuantizer) -> LearnableBoundaryQuantizer:
        """An LBQ with the same spec, range, ``initialized``/``enabled`` flags and observer."""
        observer, quantizer.observer = quantizer.observer, None
        try:
            lbq = copy.deepcopy(quantizer)
        finally:
            quantizer.observer = observer
        lbq.__class__ = cls
        lbq.make_range_learnable()
        lbq.observer = observer
        return lbq

    def boundaries(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(x_min, x_max)`` as Parameters."""
        return self.x_min, self.x_max

    @torch.no_grad()
    def enforce_order_(self, min_gap: float = DEFAULT_MIN_GAP) -> int:
        """Where x_max − x_min < ``min_gap``, move both to their midpoint ± gap/2. Returns how many
        ranges were repaired (0 in normal training). An uninitialized quantizer is left alone."""
        if not self.is_initialized:
            return 0
        bad = (self.x_max - self.x_min) < min_gap
        count = int(bad.sum())
        if count:
            mid = (self.x_max + self.x_min) / 2
            self.x_min.copy_(torch.where(bad, mid - min_gap / 2, self.x_min))
            self.x_max.copy_(torch.where(bad, mid + min_gap / 2, self.x_max))
        return count

    def extra_repr(self) -> str:
        return "LBQ " + super().extra_repr()


def _replace_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    parent._modules[name] = child


def convert_to_lbq(module: nn.Module) -> int:
    """Replace every plain :class:`FakeQuantizer` under ``module`` by an LBQ copy (in place)."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantizer) and not isinstance(
                child, LearnableBoundaryQuantizer
            ):
                _replace_child(parent, name, LearnableBoundaryQuantizer.from_quantizer(child))
                count += 1
    return count


def iter_lbq(module: nn.Module):
    """Every :class:`LearnableBoundaryQuantizer` under ``module`` (module order)."""
    for child in module.modules():
        if isinstance(child, LearnableBoundaryQuantizer):
            yield child


def lbq_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The boundary Parameters (x_min, x_max) of every LBQ under ``module``, without duplicates."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for quantizer in iter_lbq(module):
        for p in quantizer.boundaries():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def set_lbq_trainable(module: nn.Module, trainable: bool) -> None:
    """Set ``requires_grad`` of every LBQ boundary under ``module``."""
    for p in lbq_parameters(module):
        p.requires_grad_(trainable)


def enforce_lbq_order(module: nn.Module, min_gap: float = DEFAULT_MIN_GAP) -> int:
    """:meth:`LearnableBoundaryQuantizer.enforce_order_` on every LBQ under ``module``."""
    return sum(q.enforce_order_(min_gap) for q in iter_lbq(module))


__all__ = [
    "DEFAULT_MIN_GAP",
    "LearnableBoundaryQuantizer",
    "convert_to_lbq",
    "enforce_lbq_order",
    "iter_lbq",
    "lbq_parameters",
    "set_lbq_trainable",
]

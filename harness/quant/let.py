"""PassionSR's Learnable Equivalent Transformation (LET) for conv, linear and attention.

Reference: Zhu et al., "PassionSR" (CVPR 2025), released code ``quantization/saw/saw_layer.py`` and
``cross_attn_forward`` (methods.md §6.3); a SmoothQuant/OmniQuant-style per-channel scale and shift.

Conv2d / Linear (:class:`LETQuantConv2d`, :class:`LETQuantLinear`), per input channel j, learnable
scale s_j (``let_scale``) and shift δ_j (``let_shift``)::

    X' = (X − δ)/s            (transform_input, before the activation quantizer)
    W' = W · s                (effective_weight, broadcast over the input channels, before Q_W)
    Y  = op(Q_A(X'), Q_W(W')) + Q_b(b) + op(δ·1, W)        (extra_output)

Before quantization W'X' = W(X − δ), so the last term makes the layer an exact identity of the float
layer. For a convolution that term is ``conv(δ·1, W)`` with the same stride, padding, dilation and
padding mode: near the borders zero padding removes part of the kernel, so it is a spatial map, not a
constant. It is computed as the single-input-channel convolution of a ones image with
W_δ = Σ_j W[:, j]·δ_j (linearity: conv(δ·1, W) = conv(1, Σ_j δ_j W[:, j])), which equals the
C_in-channel convolution of the constant image at 1/C_in of the cost; it uses the unquantized,
unscaled W (PassionSR). For Linear the term is W·δ.

Quirk Q1 (methods.md §6.7): PassionSR's *linear* layer computes X' = (X + δ)/s but still adds +W·δ,
which is exact only at δ = 0. The buffer ``let_shift_sign`` selects the sign: −1 (default, X − δ,
exact) or +1 (the released linear behaviour, set by ``faithful``). It is a persistent buffer so a saved
model reloads with the same behaviour.

Initialization (PassionSR): s_j = max|X_{:,j}|^α / max|W_{:,j}|^α with α = 0.3 (the same exponent on
both terms, unlike SmoothQuant's α/(1−α)), clamped ≥ 1e-5; δ = 0. While ``let_observing`` is on, each
forward updates s from the current input: the first observation sets s, later ones
s ← (1 − m)·s + m·s_new with m = 0.1 (PassionSR ``update_rate``). [RECON] Both maxima are clamped to
≥ 1e-5 before the power, so a dead input channel or an all-zero weight column cannot give 0/0 or ∞.

Attention (:class:`LETAttentionQuantizers`, the hooks of
:class:`~harness.quant.attention.AttentionQuantizers`):

- q ← q·s_qk, k ← k/s_qk per head-dimension channel d (``let_qk``, shape [head_dim], shared by all
  heads as in PassionSR), init s_qk = max|k_d|^α / max|q_d|^α over (batch, heads, tokens); QKᵀ is
  unchanged.
- probs ← probs·s_vw, v ← v/s_vw per *key token* j (``let_vw``), init s_vw = max|v_j|^α / max(probs_j)^α
  over (batch, heads, queries / channels); probs·V is unchanged.

Key length (quirk Q8): s_vw has one entry per key token, so its length is a property of the input.
PassionSR learns it for every attention and therefore requires inference tiles equal to the
calibration latent size. Here ``let_vw`` exists only for **cross-attention**, whose keys are the
constant text context with a fixed length (``CONTEXT_TOKENS`` = 77, CLIP's context length, which the
tiny model's stand-in context also has). **Self-attention gets no s_vw** (only s_qk): its key count is
the number of latent positions in the tile, which differs between calibration crops, full tiles and
edge tiles, and a per-position scale learned on random crops has no meaning at another position or
tile size (interpolating it would invent values; a scalar s_vw is a no-op for per-tensor quantizers
with learnable ranges). **Self-attention probabilities are quantized in units of 1/N_k** (N_k = key count): Q(p) =
Q'(N_k·p)/N_k, i.e. the probs quantizer's range is learned for N_k·p, whose scale does not depend on
the tile size. Softmax rows of N_k keys average 1/N_k, so a range calibrated on crops of one size
(e.g. 256 keys, probabilities ≈ 0.004) would clip every probability of a larger tile (1,024 keys,
≈ 0.001) up to its lower boundary and the rows would no longer sum to 1. Measured on the tiny model
with MinMax at W8A8: the probs quantizers alone cost 3 dB psnr_fp (26.9 → 23.8) when calibrated on
32-latent crops and evaluated on 64-latent tiles. In a real kernel the 1/N_k folds into the output
scale. This is a deviation from PassionSR (whose inference tiles equal its calibration crops); it is
an exact identity before quantization. A cross-attention whose key length is not ``len(let_vw)`` raises
:class:`~harness.errors.ModelError` if s_vw was learned (is not all ones) and is computed without
s_vw if s_vw is still the identity, so nothing is ever dropped silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError, ModelError
from harness.quant.attention import AttentionQuantizers
from harness.quant.layers import LayerQuantSpec, QuantConv2d, QuantLayer, QuantLinear
from harness.quant.quantizer import QuantSpec

DEFAULT_ALPHA = 0.3
DEFAULT_MOMENTUM = 0.1
MIN_STAT = 1e-5
CONTEXT_TOKENS = 77
"""Length of the constant text context (CLIP's 77 tokens; the tiny model's stand-in has 77 too)."""


def smoothing_scale(
    act_max: torch.Tensor, other_max: torch.Tensor, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """PassionSR's LET init: act_max^α / other_max^α, both clamped ≥ 1e-5 (module docstring)."""
    act_max = act_max.detach().float().clamp(min=MIN_STAT)
    other_max = other_max.detach().float().clamp(min=MIN_STAT)
    return (act_max.pow(alpha) / other_max.pow(alpha)).clamp(min=MIN_STAT)


class LETObserverMixin:
    """EMA bookkeeping shared by the layer and attention LETs: ``let_observing``, α, momentum."""

    def _init_observer_state(self) -> None:
        self.let_observing = False
        self.let_alpha = DEFAULT_ALPHA
        self.let_momentum = DEFAULT_MOMENTUM

    @torch.no_grad()
    def _ema_update(self, param: nn.Parameter, new: torch.Tensor, first: bool) -> None:
        new = new.to(param.dtype)
        if first:
            param.copy_(new)
        else:
            param.mul_(1.0 - self.let_momentum).add_(new, alpha=self.let_momentum)


class LETLayerMixin(LETObserverMixin):
    """LET on top of a :class:`QuantLayer` (module docstring). Use :class:`LETQuantConv2d` or
    :class:`LETQuantLinear`."""

    def _init_let(self) -> None:
        channels = self.weight.shape[1]
        self.let_scale = nn.Parameter(torch.ones(channels))
        self.let_shift = nn.Parameter(torch.zeros(channels))
        self.register_buffer("let_shift_sign", torch.tensor(-1.0))
        self.register_buffer("let_initialized", torch.zeros((), dtype=torch.bool))
        self._init_observer_state()

    # shapes -------------------------------------------------------------------------------
    def _channel_view(self, v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = v.shape[0]
        return v.reshape(shape)

    def _weight_view(self, v: torch.Tensor) -> torch.Tensor:
        return self._channel_view(v, self.weight.dim(), 1)

    # statistics ---------------------------------------------------------------------------
    @torch.no_grad()
    def observe_let(self, x: torch.Tensor) -> None:
        """Update s from the input's per-channel max|X| (first call sets, later calls EMA)."""
        axis = self._input_channel_axis(x)
        act_max = x.detach().abs().movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
        w = self.weight.detach()
        w_max = w.abs().movedim(1, 0).reshape(w.shape[1], -1).amax(dim=1)
        new = smoothing_scale(act_max, w_max, self.let_alpha)
        self._ema_update(self.let_scale, new, first=not bool(self.let_initialized))
        self.let_initialized.fill_(True)

    def set_faithful_linear_sign(self, faithful: bool) -> None:
        """Quirk Q1: +1 reproduces PassionSR's linear X' = (X + δ)/s (only meaningful for Linear)."""
        self.let_shift_sign.fill_(1.0 if faithful else -1.0)

    # hooks ---------------------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.let_observing:
            self.observe_let(x)
        axis = self._input_channel_axis(x)
        shift = self._channel_view(self.let_shift, x.dim(), axis)
        scale = self._channel_view(self.let_scale, x.dim(), axis)
        return (x + self.let_shift_sign * shift) / scale

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self._weight_view(self.let_scale)

    def _shift_is_inactive(self) -> bool:
        return not self.let_shift.requires_grad and not bool(self.let_shift.detach().any())


class LETQuantConv2d(LETLayerMixin, QuantConv2d):
    """:class:`QuantConv2d` with LET (module docstring); groups = 1 only."""

    def __init__(self, conv: nn.Conv2d, spec: LayerQuantSpec):
        if conv.groups != 1:
            raise ConfigError("LET is implemented for convolutions with groups=1 only")
        super().__init__(conv, spec)
        self._init_let()

    def extra_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """conv(δ·1, W) with this layer's stride/padding/dilation: a [1, C_out, H', W'] map."""
        if self._shift_is_inactive():
            return None
        w_delta = (self.weight * self._weight_view(self.let_shift)).sum(dim=1, keepdim=True)
        ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
        if self.padding_mode != "zeros":
            ones = F.pad(ones, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(ones, w_delta, None, self.stride, 0, self.dilation, 1)
        return F.conv2d(ones, w_delta, None, self.stride, self.padding, self.dilation, 1)


class LETQuantLinear(LETLayerMixin, QuantLinear):
    """:class:`QuantLinear` with LET (module docstring)."""

    def __init__(self, linear: nn.Linear, spec: LayerQuantSpec):
        super().__init__(linear, spec)
        self._init_let()

    def extra_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """W·δ, broadcast over the leading dims."""
        if self._shift_is_inactive():
            return None
        return F.linear(self.let_shift, self.weight)


def let_layer_for(module: nn.Module, spec: LayerQuantSpec) -> QuantLayer:
    """The LET replacement of an ``nn.Conv2d`` (groups = 1) or ``nn.Linear`` (exact type match)."""
    if type(module) is nn.Conv2d:
        return LETQuantConv2d(module, spec)
    if type(module) is nn.Linear:
        return LETQuantLinear(module, spec)
    raise ConfigError(f"no LET layer for {type(module).__name__}")


class LETAttentionQuantizers(LETObserverMixin, AttentionQuantizers):
    """Attention quantizers with PassionSR's attention LET (module docstring).

    ``head_dim``: channels per head (size of ``let_qk``); ``key_tokens``: length of ``let_vw`` for a
    cross-attention with a fixed-length context, None for self-attention (no s_vw).
    """

    def __init__(self, spec: QuantSpec, head_dim: int, key_tokens: int | None = None):
        super().__init__(spec)
        self.let_qk = nn.Parameter(torch.ones(head_dim))
        self.let_vw = nn.Parameter(torch.ones(key_tokens)) if key_tokens else None
        self.register_buffer("let_qk_initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("let_vw_initialized", torch.zeros((), dtype=torch.bool))
        self._init_observer_state()

    @classmethod
    def for_attention(cls, attn: nn.Module, spec: QuantSpec) -> LETAttentionQuantizers:
        """Build for a diffusers ``Attention``: s_vw only if it is a cross-attention (module doc)."""
        inner = getattr(attn, "inner_dim", None) or attn.to_q.out_features
        if inner % attn.heads:
            raise ModelError(f"attention inner dim {inner} is not divisible by {attn.heads} heads")
        cross = bool(getattr(attn, "is_cross_attention", False))
        return cls(spec, inner // attn.heads, CONTEXT_TOKENS if cross else None)

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.let_observing:
            with torch.no_grad():
                q_max = q.detach().abs().reshape(-1, q.shape[-1]).amax(dim=0)
                k_max = k.detach().abs().reshape(-1, k.shape[-1]).amax(dim=0)
                new = smoothing_scale(k_max, q_max, self.let_alpha)
                self._ema_update(self.let_qk, new, first=not bool(self.let_qk_initialized))
                self.let_qk_initialized.fill_(True)
        return q * self.let_qk, k / self.let_qk

    def _vw_applies(self, key_len: int) -> bool:
        if self.let_vw is None:
            return False
        if key_len == self.let_vw.shape[0]:
            return True
        if bool((self.let_vw.detach() != 1).any()):
            raise ModelError(
                f"cross-attention has {key_len} key tokens but its learned LET s_vw has "
                f"{self.let_vw.shape[0]}; the per-key-token scale cannot be applied"
            )
        return False

    def quantize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Self-attention probabilities are quantized in units of 1/N_k (module docstring)."""
        if name == "probs" and self.let_vw is None and self.quant_activations:
            keys = x.shape[-1]
            return self.probs(x * keys) / keys
        return super().quantize(name, x)

    def transform_probs_v(
        self, probs: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._vw_applies(probs.shape[-1]):
            return probs, v
        if self.let_observing:
            with torch.no_grad():
                p_max = probs.detach().movedim(-1, 0).reshape(probs.shape[-1], -1).amax(dim=1)
                v_max = v.detach().abs().movedim(-2, 0).reshape(v.shape[-2], -1).amax(dim=1)
                new = smoothing_scale(v_max, p_max, self.let_alpha)
                self._ema_update(self.let_vw, new, first=not bool(self.let_vw_initialized))
                self.let_vw_initialized.fill_(True)
        return probs * self.let_vw, v / self.let_vw[:, None]


def iter_let_modules(module: nn.Module):
    """Every LET layer or LET attention under ``module`` (module order)."""
    for child in module.modules():
        if isinstance(child, (LETLayerMixin, LETAttentionQuantizers)):
            yield child


def let_parameters(module: nn.Module) -> list[nn.Parameter]:
    """s and δ of every LET layer, s_qk (and s_vw where present) of every LET attention."""
    params: list[nn.Parameter] = []
    for child in iter_let_modules(module):
        if isinstance(child, LETLayerMixin):
            params += [child.let_scale, child.let_shift]
        else:
            params.append(child.let_qk)
            if child.let_vw is not None:
                params.append(child.let_vw)
    return params


def set_let_trainable(module: nn.Module, trainable: bool) -> None:
    for p in let_parameters(module):
        p.requires_grad_(trainable)


def set_let_observing(
    module: nn.Module,
    observing: bool,
    alpha: float = DEFAULT_ALPHA,
    momentum: float = DEFAULT_MOMENTUM,
) -> None:
    """Switch LET statistics collection (init pass) on/off for every LET module under ``module``."""
    if alpha <= 0 or not 0 < momentum <= 1:
        raise ConfigError(f"LET alpha must be > 0 and momentum in (0, 1], got {alpha}, {momentum}")
    for child in iter_let_modules(module):
        child.let_observing = observing
        child.let_alpha = alpha
        child.let_momentum = momentum


__all__ = [
    "CONTEXT_TOKENS",
    "LETAttentionQuantizers",
    "LETLayerMixin",
    "LETQuantConv2d",
    "LETQuantLinear",
    "iter_let_modules",
    "let_layer_for",
    "let_parameters",
    "set_let_observing",
    "set_let_trainable",
    "smoothing_scale",
]

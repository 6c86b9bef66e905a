"""Quantized replacements for ``nn.Conv2d`` and ``nn.Linear``: weight and input-activation quantizers.

Each layer keeps the float module's ``weight`` and ``bias`` Parameters (the same tensor objects, under
the same state-dict keys) and adds quantizer children. The forward pass is (PassionSR's
``saw_*_QuantLayer`` without LET, methods.md §6.1)::

    x_t = transform_input(x)                   # hook: identity here (LET, QArtSR smoothing φ)
    w   = effective_weight()                   # hook: the float weight (LET W·s, QArtSR W − L1L2 + F1F2)
    b   = effective_bias()                     # hook: the float bias
    y   = op(Q_A(x_t), Q_W(w), Q_b(b))         # conv2d / linear on fake-quantized operands
    y   = y + extra_output(x)                  # hook: None here (LET bias term, QArtSR 16-bit branch)

Split inputs (Q-Diffusion's shortcut split, used by PassionSR; methods.md §6.2): with ``split_at = s``
the input is cut into ``x[..., :s]`` and ``x[..., s:]`` along its channel axis, each with its own
activation quantizer, and the weight into ``W[:, :s]``/``W[:, s:]`` along the input dimension, each
with its own per-output-channel quantizer. For ``nn.Linear`` on a 3-D input the channel axis is the
LAST axis (``split_axis="channel"``, the default). PassionSR's code splits dim 1 of the *input* — the
token axis for ``[B, N, C]`` inputs — at ``N // 2`` while still splitting the weight along its input
channels (quirk Q3); ``split_axis="token"`` reproduces that on request.

Switches: :meth:`QuantLayer.set_quant_state` turns weight (and bias) and activation quantization on
and off independently; with both off the layer computes exactly the float module (hooks included).
Bias quantization (PassionSR fake-quantizes biases per tensor at the weight bits) is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.quant.quantizer import FakeQuantizer, QuantSpec

SPLIT_AXES = ("channel", "token")


@dataclass(frozen=True)
class LayerQuantSpec:
    """How one conv/linear layer is quantized."""

    weight: QuantSpec
    activation: QuantSpec
    bias: QuantSpec | None = None
    split_at: int | None = None
    split_axis: str = "channel"

    def __post_init__(self) -> None:
        if self.split_axis not in SPLIT_AXES:
            raise ConfigError(f"split_axis must be one of {SPLIT_AXES}, got {self.split_axis!r}")

    def to_dict(self) -> dict:
        return {
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "bias": None if self.bias is None else self.bias.to_dict(),
            "split_at": self.split_at,
            "split_axis": self.split_axis,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerQuantSpec:
        return cls(
            weight=QuantSpec.from_dict(data["weight"]),
            activation=QuantSpec.from_dict(data["activation"]),
            bias=None if data.get("bias") is None else QuantSpec.from_dict(data["bias"]),
            split_at=data.get("split_at"),
            split_axis=data.get("split_axis", "channel"),
        )


class QuantLayer(nn.Module):
    """Base class of :class:`QuantConv2d` and :class:`QuantLinear` (see the module docstring).

    Extension points for subclasses (PassionSR LET/LBQ, QArtSR low-rank quantizer):
    :meth:`transform_input`, :meth:`effective_weight`, :meth:`effective_bias`, :meth:`extra_output`,
    plus the quantizers themselves (``weight_quantizers``, ``act_quantizers``, ``bias_quantizer``) whose
    ranges can be made learnable with ``FakeQuantizer.make_range_learnable``.
    """

    float_type: type[nn.Module] = nn.Module

    def __init__(self, float_module: nn.Module, spec: LayerQuantSpec):
        super().__init__()
        if not isinstance(float_module, self.float_type):
            raise TypeError(
                f"{type(self).__name__} wraps {self.float_type.__name__}, got {type(float_module).__name__}"
            )
        self.weight = float_module.weight
        self.bias = float_module.bias
        self.spec = spec
        in_dim = self.weight.shape[1]
        if spec.split_at is not None and not 0 < spec.split_at < in_dim:
            raise ConfigError(f"split_at={spec.split_at} is outside (0, {in_dim}) input channels")
        self.split_at = spec.split_at
        self.split_axis = spec.split_axis
        parts = self.weight_parts(self.weight.detach())
        self.weight_quantizers = nn.ModuleList(
            FakeQuantizer(spec.weight, tuple(part.shape)) for part in parts
        )
        n_act = 1 if spec.split_at is None else 2
        self.act_quantizers = nn.ModuleList(FakeQuantizer(spec.activation) for _ in range(n_act))
        self.bias_quantizer = (
            FakeQuantizer(spec.bias) if spec.bias is not None and self.bias is not None else None
        )
        self.quant_weights = True
        self.quant_activations = True

    # ----------------------------------------------------------- extension hooks
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input transform applied before activation quantization (identity)."""
        return x

    def effective_weight(self) -> torch.Tensor:
        """The float weight that the weight quantizer sees (the layer's weight)."""
        return self.weight

    def effective_bias(self) -> torch.Tensor | None:
        """The float bias added to the quantized product (the layer's bias)."""
        return self.bias

    def extra_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """A term added to the output, computed from the *original* input (none)."""
        return None

    # ----------------------------------------------------------- mechanics
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _input_channel_axis(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def weight_parts(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The weight cut along its input dimension at ``split_at`` (one part if not split)."""
        if self.split_at is None:
            return [weight]
        return [weight[:, : self.split_at], weight[:, self.split_at :]]

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize a weight with the (per-part) weight quantizers."""
        parts = self.weight_parts(weight)
        quantized = [q(part) for q, part in zip(self.weight_quantizers, parts, strict=True)]
        return quantized[0] if len(quantized) == 1 else torch.cat(quantized, dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the (transformed) input with the (per-half) activation quantizers."""
        if self.split_at is None:
            return self.act_quantizers[0](x)
        if self.split_axis == "token" and x.dim() == 3:
            axis, cut = 1, x.shape[1] // 2  # PassionSR quirk Q3
        else:
            axis, cut = self._input_channel_axis(x), self.split_at
        first, second = x.narrow(axis, 0, cut), x.narrow(axis, cut, x.shape[axis] - cut)
        return torch.cat([self.act_quantizers[0](first), self.act_quantizers[1](second)], dim=axis)

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in the forward pass (fake-quantized when weight quantization is on)."""
        weight = self.effective_weight()
        return self.quantize_weight(weight) if self.quant_weights else weight

    def quantized_bias(self) -> torch.Tensor | None:
        bias = self.effective_bias()
        if bias is None or self.bias_quantizer is None or not self.quant_weights:
            return bias
        return self.bias_quantizer(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.transform_input(x)
        if self.quant_activations:
            x_t = self.quantize_input(x_t)
        y = self._op(x_t, self.quantized_weight(), self.quantized_bias())
        extra = self.extra_output(x)
        return y if extra is None else y + extra

    # ----------------------------------------------------------- switches
    def set_quant_state(self, weights: bool, activations: bool) -> None:
        """Turn weight (and bias) quantization and input-activation quantization on or off."""
        self.quant_weights = bool(weights)
        self.quant_activations = bool(activations)

    def quantizers(self) -> dict[str, FakeQuantizer]:
        """Every quantizer of this layer by role: ``weight.0``, ``act.1``, ``bias``."""
        out = {f"weight.{i}": q for i, q in enumerate(self.weight_quantizers)}
        out.update({f"act.{i}": q for i, q in enumerate(self.act_quantizers)})
        if self.bias_quantizer is not None:
            out["bias"] = self.bias_quantizer
        return out

    @torch.no_grad()
    def init_weight_ranges(self, setter) -> None:
        """Set every weight (and bias) quantizer's range with ``setter(quantizer, tensor)``."""
        parts = self.weight_parts(self.effective_weight().detach())
        for quantizer, part in zip(self.weight_quantizers, parts, strict=True):
            setter(quantizer, part)
        bias = self.effective_bias()
        if self.bias_quantizer is not None and bias is not None:
            setter(self.bias_quantizer, bias.detach())

    @property
    def bits(self) -> tuple[int, int]:
        return self.spec.weight.bits, self.spec.activation.bits

    def extra_repr(self) -> str:
        w, a = self.bits
        split = f", split_at={self.split_at}" if self.split_at is not None else ""
        return (
            f"W{w}A{a}{split}, quant_weights={self.quant_weights}, "
            f"quant_activations={self.quant_activations}"
        )


class QuantConv2d(QuantLayer):
    """Fake-quantized ``nn.Conv2d`` (stride, padding, dilation, groups and padding mode kept)."""

    float_type = nn.Conv2d

    def __init__(self, conv: nn.Conv2d, spec: LayerQuantSpec):
        if spec.split_at is not None and conv.groups != 1:
            raise ConfigError("split inputs are only supported for convolutions with groups=1")
        super().__init__(conv, spec)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    def _input_channel_axis(self, x: torch.Tensor) -> int:
        return 1

    def _op(self, x, weight, bias):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayer):
    """Fake-quantized ``nn.Linear``; inputs of any rank, channels on the last axis."""

    float_type = nn.Linear

    def __init__(self, linear: nn.Linear, spec: LayerQuantSpec):
        super().__init__(linear, spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _input_channel_axis(self, x: torch.Tensor) -> int:
        return x.dim() - 1

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)


QUANT_LAYER_TYPES: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}
"""Float module type → default quantized class (methods may return subclasses instead)."""


def quant_layer_for(module: nn.Module, spec: LayerQuantSpec) -> QuantLayer:
    """The default quantized replacement of ``module`` (exact type match: Conv2d or Linear)."""
    cls = QUANT_LAYER_TYPES.get(type(module))
    if cls is None:
        raise ConfigError(f"no quantized replacement for {type(module).__name__}")
    return cls(module, spec)

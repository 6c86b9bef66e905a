"""Walking a (partly) quantized model: quant layers, attention quantizers, quantizers, switches.

Pure helpers over ``nn.Module`` trees; they work on a ``OneStepSR``, a ``QuantizedModel.model`` or any
sub-module (names are relative to the module passed in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from harness.errors import DivergedError
from harness.quant.attention import AttentionQuantizers
from harness.quant.layers import QuantLayer
from harness.quant.quantizer import FakeQuantizer, RangeObserver


def iter_quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """``(name, layer)`` for every :class:`QuantLayer` (conv/linear), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def iter_attention_quantizers(model: nn.Module) -> Iterator[tuple[str, AttentionQuantizers]]:
    """``(attention module name, quantizers)`` for every quantized attention."""
    suffix = ".attn_quantizers"
    for name, module in model.named_modules():
        if isinstance(module, AttentionQuantizers):
            yield (name[: -len(suffix)] if name.endswith(suffix) else name), module


def iter_quantizers(
    model: nn.Module, kinds: tuple[str, ...] = ("weight", "act", "bias", "attn")
) -> Iterator[tuple[str, str, FakeQuantizer]]:
    """``(owner name, role, quantizer)``; roles ``weight.i``, ``act.i``, ``bias``, ``attn.q|k|v|probs``.

    ``kinds`` filters by the part before the dot (``"attn"`` = attention operands, which are activations).
    """
    for name, layer in iter_quant_layers(model):
        for role, quantizer in layer.quantizers().items():
            if role.split(".")[0] in kinds:
                yield name, role, quantizer
    if "attn" in kinds:
        for name, quantizers in iter_attention_quantizers(model):
            for role, quantizer in quantizers.quantizers().items():
                yield name, f"attn.{role}", quantizer


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Switch weight (and bias) and activation (incl. attention) fake quantization for every layer."""
    for _, layer in iter_quant_layers(model):
        layer.set_quant_state(weights, activations)
    for _, quantizers in iter_attention_quantizers(model):
        quantizers.set_quant_state(weights, activations)


def quant_state(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """Current ``(weights, activations)`` switches by module name."""
    out = {
        name: (layer.quant_weights, layer.quant_activations)
        for name, layer in iter_quant_layers(model)
    }
    for name, quantizers in iter_attention_quantizers(model):
        out[name] = (False, quantizers.quant_activations)
    return out


@contextlib.contextmanager
def quant_disabled(model: nn.Module):
    """Temporarily compute in float (every switch off), restoring the previous switches after."""
    saved_layers = {
        name: (layer.quant_weights, layer.quant_activations)
        for name, layer in iter_quant_layers(model)
    }
    saved_attn = {name: q.quant_activations for name, q in iter_attention_quantizers(model)}
    set_quant_state(model, False, False)
    try:
        yield model
    finally:
        for name, layer in iter_quant_layers(model):
            layer.set_quant_state(*saved_layers[name])
        for name, quantizers in iter_attention_quantizers(model):
            quantizers.quant_activations = saved_attn[name]


def attach_observers(
    model: nn.Module,
    factory: Callable[[str, str, FakeQuantizer], RangeObserver | None],
    kinds: tuple[str, ...] = ("act", "attn"),
) -> int:
    """Give each quantizer of ``kinds`` the observer ``factory(owner, role, quantizer)``; returns count."""
    count = 0
    for name, role, quantizer in iter_quantizers(model, kinds):
        observer = factory(name, role, quantizer)
        if observer is not None:
            quantizer.observer = observer
            count += 1
    return count


def detach_observers(model: nn.Module) -> dict[str, dict]:
    """Remove every observer; returns ``{"owner/role": observer.describe()}`` for the record."""
    described: dict[str, dict] = {}
    for name, role, quantizer in iter_quantizers(model):
        if quantizer.observer is not None:
            described[f"{name}/{role}"] = quantizer.observer.describe()
            quantizer.observer = None
    return described


def uncalibrated_quantizers(model: nn.Module) -> list[str]:
    """``owner/role`` of every enabled quantizer without a range."""
    return [
        f"{name}/{role}"
        for name, role, q in iter_quantizers(model)
        if q.enabled and not q.is_initialized
    ]


def check_quantizers_finite(model: nn.Module) -> None:
    """Raise :class:`DivergedError` naming the first quantizer whose range holds NaN/Inf."""
    for name, role, quantizer in iter_quantizers(model):
        for tensor_name in ("x_min", "x_max"):
            value = getattr(quantizer, tensor_name)
            if not bool(torch.isfinite(value).all()):
                raise DivergedError(f"quantizer {name}/{role} has a non-finite {tensor_name}")


def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Re-run ``run()`` with forward hooks and return the first quantized module (in execution
    order) whose output holds NaN/Inf, or None. Used to name the cause of a divergence."""
    found: list[str] = []
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            if (
                not found
                and isinstance(output, torch.Tensor)
                and not bool(torch.isfinite(output).all())
            ):
                found.append(name)

        return fn

    watched = dict(iter_quant_layers(model))
    for name, module in model.named_modules():
        if name in watched or hasattr(module, "attn_quantizers"):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - diagnosis only; the caller reports the original failure
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None

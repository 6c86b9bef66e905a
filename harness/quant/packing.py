"""Real packed integer weights, model size against FP32, and analytic bit-operations (BOPs).

Everything here is labelled "simulated quantization: accuracy, not speed": the fake-quantized model
runs float kernels; these numbers say what an integer deployment *would* store and compute.

Packing (per quantized conv/linear layer and per weight part when the input is split):
- codes: the weight quantizer's integer codes shifted to [0, 2^b − 1] and bit-packed little-endian
  (b bits per weight, no padding between weights; the stream is padded to a whole byte);
- scales: Δ per output channel (or per group / per tensor) as float32;
- zero points: the code offset as int16, so that weight = (code + zero_point)·Δ exactly reproduces
  the fake-quantized weight;
- bias: float32 (integer kernels keep the bias in the 32-bit accumulator; if the method fake-quantizes
  the bias, the stored float32 value is the fake-quantized one).

Sizes: ``packed_bytes`` = codes + scales + zero points + bias bytes; ``fp32_bytes`` = 4 × (weight +
bias elements). The whole-model size adds every other parameter and buffer at its stored width in
FP32 (norms, embeddings, unquantized layers, the prompt embedding).

BOPs (bit-operations, as in the quantization literature): MACs × w_bits × a_bits per conv/linear layer
and MACs × a_bits × a_bits for the two attention matmuls, 32 × 32 for anything in float. MACs are
counted with forward hooks on one untiled forward of a ``size``×``size`` image (OSEDiff processes
512×512): conv MACs = output elements × (C_in/groups) × k_h × k_w; linear MACs = output elements ×
in_features; attention MACs = 2 × batch × N_q × N_k × inner_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from harness.quant.api import SIMULATED_LABEL, component_of
from harness.quant.attention import is_diffusers_attention
from harness.quant.layers import QuantLayer
from harness.quant.quantizer import to_range_view
from harness.quant.state import iter_quant_layers, quant_disabled


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack unsigned codes (< 2^bits) into a uint8 stream, little-endian within each code."""
    codes = np.asarray(codes).reshape(-1).astype(np.uint16)
    if codes.size and int(codes.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    bit_planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int32."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: count * bits]
    planes = flat.reshape(count, bits).astype(np.int32)
    return (planes << np.arange(bits, dtype=np.int32)).sum(axis=1)


@dataclass
class PackedPart:
    """One packed weight part: codes, scales, zero points and the shape to unpack to."""

    bits: int
    shape: tuple[int, ...]
    codes: np.ndarray  # uint8 bit stream
    scales: np.ndarray  # float32, range shape
    zero_points: np.ndarray  # int16, range shape
    granularity: str
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def dequantize(self) -> torch.Tensor:
        """The weight part as float32: (code + zero point)·Δ, reshaped."""
        count = int(np.prod(self.shape))
        codes = torch.from_numpy(unpack_codes(self.codes, self.bits, count).astype(np.float32))
        scales = torch.from_numpy(self.scales)
        zeros = torch.from_numpy(self.zero_points.astype(np.float32))
        codes = codes.reshape(self.shape)
        if self.granularity == "group":
            view = codes.reshape(self.shape[0], -1, self.group_size)
            return ((view + zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(self.shape)
        if self.granularity == "channel":
            bshape = [self.shape[0]] + [1] * (len(self.shape) - 1)
            return (codes + zeros.reshape(bshape)) * scales.reshape(bshape)
        return (codes + zeros) * scales


@dataclass
class PackedLayer:
    name: str
    parts: list[PackedPart]
    bias: np.ndarray | None
    weight_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.nbytes)

    @property
    def fp32_bytes(self) -> int:
        n = int(np.prod(self.weight_shape)) + (0 if self.bias is None else self.bias.size)
        return 4 * n

    def dequantize_weight(self) -> torch.Tensor:
        parts = [p.dequantize() for p in self.parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.no_grad()
def pack_layer(name: str, layer: QuantLayer) -> PackedLayer:
    """Pack one quant layer's weight with its own quantizers (module docstring)."""
    weight = layer.effective_weight().detach().float()
    parts = []
    for quantizer, part in zip(layer.weight_quantizers, layer.weight_parts(weight), strict=True):
        spec = quantizer.spec
        view = to_range_view(part, spec)
        codes = quantizer.codes(part).reshape(-1).numpy() - spec.qmin
        delta, zero_point = quantizer.qparams(view.dim())
        # store flat range-shaped Δ and the code offset (q_min + z)
        scales = _flat(delta, spec)
        zeros = _flat(zero_point, spec) + spec.qmin
        parts.append(
            PackedPart(
                bits=spec.bits,
                shape=tuple(part.shape),
                codes=pack_codes(codes, spec.bits),
                scales=scales.numpy().astype(np.float32),
                zero_points=np.rint(zeros.numpy()).astype(np.int16),
                granularity=spec.granularity,
                group_size=spec.group_size,
            )
        )
    bias = layer.quantized_bias() if layer.quant_weights else layer.effective_bias()
    bias_np = None if bias is None else bias.detach().float().cpu().numpy()
    return PackedLayer(name, parts, bias_np, tuple(weight.shape))


def _flat(t: torch.Tensor, spec) -> torch.Tensor:
    if spec.granularity == "tensor":
        return t.detach().reshape(())
    if spec.granularity == "group":
        return t.detach().squeeze(-1)
    return t.detach().reshape(-1)


def export_packed(model: nn.Module) -> dict[str, PackedLayer]:
    """Pack every quant layer of ``model`` (a ``QuantizedModel.model``)."""
    return {name: pack_layer(name, layer) for name, layer in iter_quant_layers(model)}


def save_packed(packed: dict[str, PackedLayer], path) -> None:
    """Write packed layers to one safetensors file (keys ``<layer>.<part>.codes|scales|zero_points``,
    ``<layer>.bias``) with the bits and shapes in its metadata."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {"label": SIMULATED_LABEL}
    for name, layer in packed.items():
        for i, part in enumerate(layer.parts):
            tensors[f"{name}.{i}.codes"] = part.codes
            tensors[f"{name}.{i}.scales"] = np.atleast_1d(part.scales)
            tensors[f"{name}.{i}.zero_points"] = np.atleast_1d(part.zero_points)
            meta[f"{name}.{i}"] = (
                f"bits={part.bits};shape={list(part.shape)};granularity={part.granularity};group_size={part.group_size}"
            )
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    save_file(tensors, str(path), metadata=meta)


def _state_bytes(model: nn.Module, skip: set[int]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in skip or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * 4
    return total


def size_report(model: nn.Module, packed: dict[str, PackedLayer] | None = None) -> dict:
    """Real packed sizes vs FP32 for the quantized layers and for the whole model (module docstring).

    Quantizer range tensors are not counted (they are the scales/zero points, counted in packed form).
    """
    packed = export_packed(model) if packed is None else packed
    layers = dict(iter_quant_layers(model))
    quant_fp32 = sum(p.fp32_bytes for p in packed.values())
    quant_packed = sum(p.nbytes for p in packed.values())
    skip: set[int] = set()
    for layer in layers.values():
        skip.add(id(layer.weight))
        if layer.bias is not None:
            skip.add(id(layer.bias))
        for q in layer.quantizers().values():
            skip.update(id(t) for t in (q.x_min, q.x_max, q.initialized))
    for module in model.modules():
        if hasattr(module, "attn_quantizers"):
            for q in module.attn_quantizers.quantizers().values():
                skip.update(id(t) for t in (q.x_min, q.x_max, q.initialized))
    rest_fp32 = _state_bytes(model, skip)
    by_bits: dict[str, dict[str, int]] = {}
    for name, p in packed.items():
        w, a = layers[name].bits
        entry = by_bits.setdefault(f"W{w}A{a}", {"layers": 0, "fp32_bytes": 0, "packed_bytes": 0})
        entry["layers"] += 1
        entry["fp32_bytes"] += p.fp32_bytes
        entry["packed_bytes"] += p.nbytes
    whole_fp32 = quant_fp32 + rest_fp32
    whole_packed = quant_packed + rest_fp32
    return {
        "label": SIMULATED_LABEL,
        "quantized_layers": len(packed),
        "quantized_layers_fp32_bytes": quant_fp32,
        "quantized_layers_packed_bytes": quant_packed,
        "quantized_layers_ratio": quant_packed / quant_fp32 if quant_fp32 else None,
        "other_fp32_bytes": rest_fp32,
        "model_fp32_bytes": whole_fp32,
        "model_packed_bytes": whole_packed,
        "model_ratio": whole_packed / whole_fp32 if whole_fp32 else None,
        "by_bits": by_bits,
    }


@torch.no_grad()
def bops_report(qmodel, size: int = 512, targets: dict | None = None) -> dict:
    """Analytic MACs and BOPs for one untiled ``size``×``size`` forward (module docstring).

    ``qmodel`` is a ``QuantizedModel`` (or a base model: everything counts as 32-bit). The forward runs
    with quantization switched off (MACs do not depend on values).
    """
    model = getattr(qmodel, "model", qmodel)
    targets = targets if targets is not None else getattr(qmodel, "targets", {})
    counts: dict[str, dict] = {}
    handles = []

    def conv_linear_hook(name):
        def fn(module, inputs, output):
            if isinstance(module, (nn.Conv2d,)) or getattr(module, "float_type", None) is nn.Conv2d:
                weight = module.weight
                macs = output.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
                kind = "conv2d"
            else:
                macs = output.numel() * module.weight.shape[1]
                kind = "linear"
            entry = counts.setdefault(name, {"kind": kind, "macs": 0})
            entry["macs"] += int(macs)

        return fn

    def attention_hook(name):
        def fn(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            if context is None and len(args) > 1:
                context = args[1]
            batch = hidden.shape[0]
            n_q = hidden.shape[2] * hidden.shape[3] if hidden.dim() == 4 else hidden.shape[1]
            n_k = n_q if context is None else context.shape[1]
            inner = (
                module.to_q.out_features
                if hasattr(module.to_q, "out_features")
                else module.inner_dim
            )
            entry = counts.setdefault(name, {"kind": "attention", "macs": 0})
            entry["macs"] += int(2 * batch * n_q * n_k * inner)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, QuantLayer)):
            handles.append(module.register_forward_hook(conv_linear_hook(name)))
        elif is_diffusers_attention(module):
            handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, size, size, device=device)
    try:
        with quant_disabled(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    total_macs = total_bops = fp_bops = 0
    per_component: dict[str, dict[str, int]] = {}
    for name, entry in counts.items():
        target = targets.get(name)
        if target is None:
            w_bits = a_bits = 32
        elif target.kind == "attention":
            w_bits = a_bits = target.a_bits
        else:
            w_bits, a_bits = target.w_bits, target.a_bits
        entry["w_bits"], entry["a_bits"] = w_bits, a_bits
        entry["bops"] = entry["macs"] * w_bits * a_bits
        total_macs += entry["macs"]
        total_bops += entry["bops"]
        fp_bops += entry["macs"] * 32 * 32
        component = component_of(name) or name.split(".")[0]
        agg = per_component.setdefault(component, {"macs": 0, "bops": 0, "fp32_bops": 0})
        agg["macs"] += entry["macs"]
        agg["bops"] += entry["bops"]
        agg["fp32_bops"] += entry["macs"] * 32 * 32
    return {
        "label": SIMULATED_LABEL,
        "image_size": size,
        "macs": total_macs,
        "bops": total_bops,
        "fp32_bops": fp_bops,
        "bops_ratio": total_bops / fp_bops if fp_bops else None,
        "by_component": per_component,
        "layers": counts,
    }


__all__ = [
    "PackedLayer",
    "PackedPart",
    "bops_report",
    "export_packed",
    "pack_codes",
    "pack_layer",
    "save_packed",
    "size_report",
    "unpack_codes",
]

"""``python -m bench.size``: packed model size and analytic bit-operations (BOPs) per method and bits,
against FP32, for the tiny model and for an SD-2.1-base-sized UNet.

- **Tiny model** (``load_model("tiny")``, the config default scope UV): each method is calibrated with
  the smallest budget it accepts (:data:`bench._common.STRUCTURE_ONLY_PARAMS`; sizes and BOPs depend on
  the quantized structure, not on calibrated values), the weights are **really packed**
  (:func:`harness.quant.packing.export_packed`; QArtSR through
  :func:`harness.quant.lowrank.lowrank_size_report`, which adds its 16-bit low-rank branch and
  smoothing factors) and BOPs are counted with forward hooks on one untiled 512×512 inference
  (:func:`~harness.quant.packing.bops_report` / :func:`~harness.quant.lowrank.lowrank_bops_report`).
  The analytic packed size (below) is computed too and must equal the real one byte for byte.
- **SD-2.1-base UNet** (``harness/configs/sd21_base_unet.json``, 866 M parameters, scope U): built on
  PyTorch's ``meta`` device (shapes only, no memory), quantized structurally with the method's own
  layer factories (:func:`harness.quant.api.resolve_targets` / ``apply_targets``), never calibrated.
  Packing needs real weights, so the packed size is **analytic**: per weight part
  ⌈elements × bits / 8⌉ bytes of codes + 4 bytes (float32 Δ) + 2 bytes (int16 zero point) per range
  element, + 4 bytes per bias element — the exact byte count :func:`export_packed` produces (checked
  on the tiny model). These analytic layers are handed to the same report functions. BOPs: the same
  hook counting on a meta forward of the UNet at a 64×64 latent (a 512×512 image, VAE factor 8) with a
  77-token, 1024-wide text context; QArtSR's timestep guard reads a scalar, which the meta device
  cannot, so it is given an unbound CPU scalar for that forward.

Labels: simulated quantization — these numbers say what an integer deployment would store and
compute; no time or memory is saved by the fake-quantized models.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from bench._common import (
    METHODS,
    REPO,
    STRUCTURE_CALIBRATION,
    base_parser,
    calibration_set_for,
    machine_info,
    print_table,
    quantize_tiny,
    set_threads,
    write_results,
)

SD21_CONFIG = REPO / "harness" / "configs" / "sd21_base_unet.json"


@dataclass
class AnalyticPacked:
    """What :class:`harness.quant.packing.PackedLayer` reports, computed from shapes alone."""

    nbytes: int
    fp32_bytes: int


def analytic_layer(layer) -> AnalyticPacked:
    """Packed and FP32 bytes of one quant layer from its shapes and quantizer specs."""
    weight = layer.effective_weight()
    packed = 0
    for quantizer, part in zip(layer.weight_quantizers, layer.weight_parts(weight), strict=True):
        range_elements = quantizer.x_min.numel()
        packed += math.ceil(part.numel() * quantizer.spec.bits / 8) + range_elements * (4 + 2)
    bias_elements = 0 if layer.bias is None else layer.bias.numel()
    packed += 4 * bias_elements
    return AnalyticPacked(nbytes=packed, fp32_bytes=4 * (weight.numel() + bias_elements))


def analytic_export(model) -> dict[str, AnalyticPacked]:
    from harness.quant.state import iter_quant_layers

    return {name: analytic_layer(layer) for name, layer in iter_quant_layers(model)}


@contextlib.contextmanager
def analytic_packing():
    """Make the report functions use :func:`analytic_export` instead of real packing (for meta
    models: the reports only read ``nbytes``/``fp32_bytes`` of each packed layer and tensor sizes)."""
    from harness.quant import packing

    real = packing.export_packed
    packing.export_packed = analytic_export
    try:
        yield
    finally:
        packing.export_packed = real


def reports_for(qmodel, method: str, size: int):
    """(size report, BOPs report) with the QArtSR-aware functions for QArtSR."""
    from harness.quant.lowrank import lowrank_bops_report, lowrank_size_report
    from harness.quant.packing import bops_report, size_report

    if method.startswith("qartsr"):
        return lowrank_size_report(qmodel.model), lowrank_bops_report(qmodel, size=size)
    return size_report(qmodel.model), bops_report(qmodel, size=size)


def size_only(qmodel, method: str) -> dict:
    from harness.quant.lowrank import lowrank_size_report
    from harness.quant.packing import size_report

    if method.startswith("qartsr"):
        return lowrank_size_report(qmodel.model)
    return size_report(qmodel.model)


def _summary(size: dict, bops: dict) -> dict:
    return {
        "quantized_layers": size["quantized_layers"],
        "model_fp32_bytes": size["model_fp32_bytes"],
        "model_packed_bytes": size["model_packed_bytes"],
        "model_ratio": size["model_ratio"],
        "quantized_layers_fp32_bytes": size["quantized_layers_fp32_bytes"],
        "quantized_layers_packed_bytes": size["quantized_layers_packed_bytes"],
        "quantized_layers_ratio": size["quantized_layers_ratio"],
        "lowrank_branch_bytes": size.get("lowrank_branch_bytes"),
        "macs": bops["macs"],
        "bops": bops["bops"],
        "fp32_bops": bops["fp32_bops"],
        "bops_ratio": bops["bops_ratio"],
        "image_size": bops["image_size"],
    }


def tiny_figures(methods, bits_list, size: int) -> dict:
    from harness.loaders import load_model

    fp = load_model("tiny")
    calibration = calibration_set_for(fp, **STRUCTURE_CALIBRATION)
    out: dict = {}
    for method in methods:
        for bits in bits_list:
            qmodel, _ = quantize_tiny(method, bits, calibration)
            size_real, bops = reports_for(qmodel, method, size)
            with analytic_packing():
                size_analytic = size_only(qmodel, method)
            entry = _summary(size_real, bops)
            entry["analytic_model_packed_bytes"] = size_analytic["model_packed_bytes"]
            entry["analytic_matches_real"] = (
                size_analytic["model_packed_bytes"] == size_real["model_packed_bytes"]
            )
            out[f"{method} {bits}"] = entry
            del qmodel
    return out


def sd21_figures(methods, bits_list, size: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    from harness.quant.api import apply_targets, resolve_targets
    from harness.registry import get_method

    config = json.loads(SD21_CONFIG.read_text())
    config.pop("_comment", None)

    class UNetOnly(nn.Module):
        def __init__(self, unet: nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            side = image.shape[-1] // 8
            latent = torch.zeros(1, 4, side, side, device="meta")
            context = torch.zeros(1, 77, int(config["cross_attention_dim"]), device="meta")
            timestep = torch.tensor([999], device="meta")
            return self.unet(latent, timestep, encoder_hidden_states=context).sample

    def build():
        with torch.device("meta"):
            return UNetOnly(UNet2DConditionModel(**config))

    out: dict = {}
    fp_model = build()
    params = sum(p.numel() for p in fp_model.parameters())
    with analytic_packing():
        from harness.quant.packing import bops_report

        fp_bops = bops_report(SimpleNamespace(model=fp_model, targets={}), size=size)
    out["FP32"] = {
        "parameters": params,
        "model_fp32_bytes": 4 * params,
        "macs": fp_bops["macs"],
        "fp32_bops": fp_bops["fp32_bops"],
        "image_size": size,
    }
    for method in methods:
        entry_cls = get_method(method)
        for bits in bits_list:
            fields = {"budget": "tiny"} if method.startswith("qartsr") else {}
            method_config = entry_cls.make_config(bits=bits, scope="U", **fields)
            model = build()
            with torch.device("meta"):
                quant_method = entry_cls.create()
                quant_method.configure(method_config)
                targets = resolve_targets(model, method_config, quant_method)
                apply_targets(model, targets, quant_method)
            for module in model.modules():
                if "bound_timestep" in getattr(module, "_buffers", {}):
                    module._buffers["bound_timestep"] = torch.tensor(-1)
            qmodel = SimpleNamespace(model=model, targets=targets)
            with analytic_packing():
                size_report_, bops = reports_for(qmodel, method, size)
            out[f"{method} {bits}"] = _summary(size_report_, bops)
            del model
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A4", "W2A2"])
    parser.add_argument("--size", type=int, default=512, help="image side for BOPs (default 512)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny model")
    parser.add_argument("--no-sd21", action="store_true", help="skip the SD-2.1 UNet")
    parser.add_argument("--quick", action="store_true", help="minmax and qartsr at W4A4 only")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.bits = ["minmax", "qartsr"], ["W4A4"]

    machine = machine_info()
    machine["torch_threads"] = set_threads(args.threads)
    figures: dict = {"label": "simulated quantization: accuracy, not speed"}
    mib = 2**20
    if not args.no_tiny:
        tiny = tiny_figures(args.methods, args.bits, args.size)
        figures["tiny"] = tiny
        rows = []
        first = next(iter(tiny.values()))
        rows.append(["FP32", "", first["model_fp32_bytes"] / mib, 1.0, first["fp32_bops"], 1.0, ""])
        for key, e in tiny.items():
            rows.append([
                key, e["quantized_layers"], e["model_packed_bytes"] / mib, e["model_ratio"],
                e["bops"], e["bops_ratio"], "yes" if e["analytic_matches_real"] else "NO",
            ])  # fmt: skip
        print_table(
            ["tiny model (UV)", "q. layers", "size (MiB)", "x FP32", "BOPs", "x FP32",
             "analytic = packed"],
            rows,
            title=f"size: tiny model, real packed weights; BOPs of one {args.size}² inference",
        )  # fmt: skip
    if not args.no_sd21:
        sd21 = sd21_figures(args.methods, args.bits, args.size)
        figures["sd21_unet"] = sd21
        fp = sd21["FP32"]
        rows = [["FP32", "", fp["model_fp32_bytes"] / mib, 1.0, fp["fp32_bops"], 1.0]]
        for key, e in sd21.items():
            if key == "FP32":
                continue
            rows.append([
                key, e["quantized_layers"], e["model_packed_bytes"] / mib, e["model_ratio"],
                e["bops"], e["bops_ratio"],
            ])  # fmt: skip
        print_table(
            ["SD-2.1 UNet (U)", "q. layers", "size (MiB)", "x FP32", "BOPs", "x FP32"],
            rows,
            title=f"size: SD-2.1-base UNet ({fp['parameters']:,} parameters), analytic packed size "
            f"on the meta device; BOPs of one {args.size}² inference (latent {args.size // 8}²)",
        )
    write_results("size", figures, machine=machine, args=args, path=args.json)
    ok = all(e.get("analytic_matches_real", True) for e in figures.get("tiny", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

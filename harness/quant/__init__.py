"""qbench's fake-quantization core (simulated quantization: accuracy, not speed).

Public API (see docs/quantization.md):

- :func:`quantize` (the one entry point), :class:`MethodConfig`, :class:`QuantMethod`,
  :class:`QuantizedModel`, :class:`Target`, :func:`parse_bits`, :data:`PASSIONSR_8BIT_OVERRIDES`;
- quantizer: :class:`QuantSpec`, :class:`FakeQuantizer`, observers (:class:`MinMaxObserver`,
  :class:`EmaMinMaxObserver`, :class:`LpSearchObserver`), :func:`lp_search_range`;
- layers: :class:`QuantConv2d`, :class:`QuantLinear`, :class:`LayerQuantSpec`; attention:
  :class:`AttentionQuantizers`, :class:`QuantAttnProcessor`;
- state: :func:`set_quant_state`, :func:`iter_quant_layers`, :func:`iter_quantizers`;
- calibration: :class:`CalibrationSettings`, :class:`CalibrationSet`, :func:`build_calibration_set`;
- io: :func:`save_quantized`, :func:`load_quantized`, :func:`model_identity`;
- packing: :func:`export_packed`, :func:`size_report`, :func:`bops_report`.
"""

from __future__ import annotations

from harness.quant.api import (
    LDM_TO_DIFFUSERS_8BIT,
    PASSIONSR_8BIT_OVERRIDES,
    SIMULATED_LABEL,
    BitWidths,
    MethodConfig,
    QuantizedModel,
    QuantMethod,
    Target,
    parse_bits,
    quantize,
    resolve_targets,
)
from harness.quant.attention import AttentionQuantizers, QuantAttnProcessor
from harness.quant.calibration import (
    CalibrationBatch,
    CalibrationSet,
    CalibrationSettings,
    build_calibration_set,
    calibration_passes,
    pipeline_forward,
)
from harness.quant.io import load_quantized, model_identity, save_quantized
from harness.quant.layers import LayerQuantSpec, QuantConv2d, QuantLayer, QuantLinear
from harness.quant.packing import bops_report, export_packed, size_report
from harness.quant.quantizer import (
    EmaMinMaxObserver,
    FakeQuantizer,
    LpSearchObserver,
    MinMaxObserver,
    QuantSpec,
    lp_search_range,
)
from harness.quant.state import iter_quant_layers, iter_quantizers, set_quant_state

__all__ = [
    "LDM_TO_DIFFUSERS_8BIT",
    "PASSIONSR_8BIT_OVERRIDES",
    "SIMULATED_LABEL",
    "AttentionQuantizers",
    "BitWidths",
    "CalibrationBatch",
    "CalibrationSet",
    "CalibrationSettings",
    "EmaMinMaxObserver",
    "FakeQuantizer",
    "LayerQuantSpec",
    "LpSearchObserver",
    "MethodConfig",
    "MinMaxObserver",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantMethod",
    "QuantSpec",
    "QuantizedModel",
    "Target",
    "bops_report",
    "build_calibration_set",
    "calibration_passes",
    "export_packed",
    "iter_quant_layers",
    "iter_quantizers",
    "load_quantized",
    "lp_search_range",
    "model_identity",
    "parse_bits",
    "pipeline_forward",
    "quantize",
    "resolve_targets",
    "save_quantized",
    "set_quant_state",
    "size_report",
]

"""``fp``: no quantization. The full-precision reference row goes through the same ``quantize`` path
(and the same save/load format), so every table row is produced the same way."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError
from harness.quant.api import MethodConfig, QuantMethod
from harness.registry import register_method


@dataclass(frozen=True)
class FPConfig(MethodConfig):
    """Config of ``fp``: ``bits`` is always ``"FP"``; targeting fields are kept but unused."""

    method: str = "fp"
    bits: str = "FP"

    def validate(self) -> None:
        if self.bits != "FP":
            raise ConfigError(
                f"method 'fp' does not quantize; bits must be 'FP', got {self.bits!r}"
            )
        if self.scope not in ("U", "UV"):
            raise ConfigError(f"scope must be 'U' or 'UV', got {self.scope!r}")


@register_method(
    "fp", config_cls=FPConfig, description="full precision: no quantization (reference row)"
)
class FullPrecision(QuantMethod):
    """Full precision: leaves the model untouched."""

    quantizes_model = False
    needs_calibration = False

    def calibrate(self, qmodel, calibration, config, progress=None) -> dict:
        return {"quantized_modules": 0, "note": "full precision, nothing calibrated"}

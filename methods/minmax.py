"""``minmax``: the papers' "MaxMin" baseline (Jacob et al. 2018 as cited by PassionSR and QArtSR).

No implementation was released (PassionSR deleted its baselines); this is the reconstruction of
methods.md §4 on PassionSR's quantizer framework (§6.1–6.2), with no LET and no training:

- weights: per-output-channel asymmetric min/max on the unsigned grid (PassionSR ``Init_basicinfo``
  with ``channel_wise=True``);
- activations (conv/linear inputs and the UNet attention Q, K, V, softmax output): per-tensor
  asymmetric, range = running min/max over every calibration batch;
- biases fake-quantized per tensor at the weight bits, min/max (PassionSR's framework does this;
  ``quantize_bias=False`` turns it off);
- the same 8-bit list, skip split and attention quantization as every method (config defaults).

[RECON] choices and reasons:
- Running min/max over the whole calibration set rather than PassionSR's first-batch-only init
  (quirk Q2) or an EMA: "MinMax" means the observed extremes; ``activation_observer="ema"`` gives an
  EMA (momentum ``ema_momentum``) instead.
- Calibration runs with weight and activation quantization on (PassionSR's init pass), so each layer
  sees the quantized outputs of the layers before it; ranges grow as batches arrive.
- Rounding half away from zero (PassionSR ``Round``).
- Batch size 4 (PassionSR's ``cali_batch_size``); with running min/max the result does not depend on
  it except through the quantized upstream outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError
from harness.quant.api import MethodConfig, QuantMethod
from harness.quant.calibration import calibration_passes
from harness.quant.quantizer import EmaMinMaxObserver, MinMaxObserver, observed_min_max
from harness.quant.state import attach_observers, detach_observers, iter_quant_layers
from harness.registry import register_method

ACTIVATION_OBSERVERS = ("running_minmax", "ema")


@dataclass(frozen=True)
class MinMaxConfig(MethodConfig):
    """MinMax fields on top of :class:`MethodConfig`."""

    method: str = "minmax"
    quantize_bias: bool = True
    calib_batch_size: int = 4
    activation_observer: str = "running_minmax"
    ema_momentum: float = 0.9

    def validate(self) -> None:
        super().validate()
        if self.calib_batch_size < 1:
            raise ConfigError(f"calib_batch_size must be >= 1, got {self.calib_batch_size}")
        if self.activation_observer not in ACTIVATION_OBSERVERS:
            raise ConfigError(
                f"activation_observer must be one of {ACTIVATION_OBSERVERS}, got {self.activation_observer!r}"
            )
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")


def set_minmax_range(quantizer, tensor) -> None:
    quantizer.set_range(*observed_min_max(tensor, quantizer.spec))


@register_method(
    "minmax", config_cls=MinMaxConfig, description="MaxMin baseline: min/max ranges, no training"
)
class MinMax(QuantMethod):
    """Min/max ranges on PassionSR's quantizer framework, no training (methods.md §4)."""

    def calibrate(self, qmodel, calibration, config: MinMaxConfig, progress=None) -> dict:
        model = qmodel.model
        layers = dict(iter_quant_layers(model))
        for layer in layers.values():
            layer.init_weight_ranges(set_minmax_range)
        if config.activation_observer == "ema":
            observers = attach_observers(model, lambda *_: EmaMinMaxObserver(config.ema_momentum))
        else:
            observers = attach_observers(model, lambda *_: MinMaxObserver(running=True))
        try:
            batches = calibration_passes(
                qmodel, calibration, batch_size=config.calib_batch_size, scope=config.scope,
                progress=progress, stage="minmax activation ranges",
            )  # fmt: skip
        finally:
            detach_observers(model)
        return {
            "weight_ranges": "per-output-channel min/max",
            "activation_ranges": config.activation_observer,
            "activation_quantizers": observers,
            "calibration_batches": batches,
            "calibration_crops": len(calibration),
        }

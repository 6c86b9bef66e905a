"""``ptq4dm``: PTQ4DM (Shang et al., CVPR 2023) adapted to one-step SR (methods.md §5.4).

What the released PTQ4DM script executes (methods.md §5.3; ``QDrop/quant``): MSE-style clipping
search with the L_2.4 norm and 100 candidates, per-channel for weights (QDrop ``sym=True``: a symmetric
clipping range quantized with the affine formula on the unsigned grid), per-tensor for activations
with an EMA over calibration batches (running = 0.9·old + 0.1·new); first and last layers at 8 bit;
network output unquantized; no AdaRound/BRECQ reconstruction (``--use_adaround`` is not set).

Adaptation here:
- weights: per-output-channel; 1-D search over thresholds (i/100)·max(|min|, max) of ranges [−t, t]
  (or [0, t]/[−t, 0] if the whole weight is one-sided), score mean |w − Q(w)|^2.4 per channel;
- activations (conv/linear inputs, and the UNet attention Q, K, V, softmax output that PassionSR's
  framework quantizes): per-tensor, 1-D search for one-sided tensors (e.g. the softmax output), else
  the 2-D range × zero-point search; the per-batch result is EMA-averaged;
- rounding ``torch.round`` (half to even) with STE, as QDrop's ``round_ste``;
- first/last layers at 8 bit: the default 8-bit list (PassionSR's, which contains the UNet's first
  layer ``time_embedding.linear_1`` = QDrop's ``w_list[0]`` and last ``conv_out``, plus the VAE ends
  for scope UV); "network output unquantized" holds by construction (only layer *inputs* are
  quantized here, QDrop quantizes outputs);
- biases are not quantized (QDrop's ``QuantModule`` keeps the float bias).

Timestep calibration (``timestep_calibration``):
- ``"faithful"`` (default): NDTC degenerates for one-step inference — every calibration input is
  (z_L, T=999); calibrate on the calibration crops only.
- ``"literal"`` (documented ablation, not recommended by methods.md): additionally run the UNet on
  noisy latents z_t = √ᾱ_t·z_H + √(1−ᾱ_t)·ε, one per crop, with t = int(N(μ, σ)·1000) clamped to
  [0, 999], μ = σ = 0.4 (PTQ4DM's script), z_H the FP teacher x0, ε ~ N(0, I) seeded by
  ``literal_seed``. These inputs never occur at inference.

[RECON] choices and reasons:
- ``search_max_elements`` = 4096 and ``search_budget`` = 2^25: the 2-D search scores 100 × 2^b
  candidates; for CPU cost the scores are computed on a seeded random subsample of
  E = min(4096, max(1024, 2^25/(100·2^b))) elements per batch (8 bit: 1310; ≤ 6 bit: 4096), while
  min/max and the candidate grid still come from the full tensor, and the EMA over batches averages
  the subsampling noise. Zero points that cannot win are pruned exactly (same result as the full
  grid on those elements). The 1-D searches use every element.
- ``calib_batch_size`` = 4 (PassionSR's init batch; PTQ4DM used 256 of 1024 images): the EMA then
  averages N/4 per-batch searches.
- Calibration runs with weights and activations quantized (QDrop ``set_quant_state(True, True)``
  during activation calibration), scope UV by default (methods.md §11.2: same scope for every method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from harness.errors import ConfigError
from harness.quant.api import MethodConfig, QuantMethod, Target
from harness.quant.calibration import calibration_passes
from harness.quant.quantizer import LpSearchObserver, QuantSpec, lp_search_range
from harness.quant.state import attach_observers, detach_observers, iter_quant_layers
from harness.registry import register_method

TIMESTEP_CALIBRATIONS = ("faithful", "literal")


@dataclass(frozen=True)
class PTQ4DMConfig(MethodConfig):
    """PTQ4DM fields on top of :class:`MethodConfig`."""

    method: str = "ptq4dm"
    calib_batch_size: int = 4
    lp_norm: float = 2.4
    search_candidates: int = 100
    act_ema_momentum: float = 0.9
    search_max_elements: int = 4096
    search_budget: int = 2**25
    timestep_calibration: str = "faithful"
    literal_mu: float = 0.4
    literal_sigma: float = 0.4
    literal_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.calib_batch_size < 1:
            raise ConfigError(f"calib_batch_size must be >= 1, got {self.calib_batch_size}")
        if self.lp_norm <= 0:
            raise ConfigError(f"lp_norm must be > 0, got {self.lp_norm}")
        if self.search_candidates < 1:
            raise ConfigError(f"search_candidates must be >= 1, got {self.search_candidates}")
        if not 0.0 <= self.act_ema_momentum < 1.0:
            raise ConfigError(f"act_ema_momentum must be in [0, 1), got {self.act_ema_momentum}")
        if self.search_max_elements < 16:
            raise ConfigError(f"search_max_elements must be >= 16, got {self.search_max_elements}")
        if self.search_budget < 1:
            raise ConfigError(f"search_budget must be >= 1, got {self.search_budget}")
        if self.timestep_calibration not in TIMESTEP_CALIBRATIONS:
            raise ConfigError(
                f"timestep_calibration must be one of {TIMESTEP_CALIBRATIONS}, "
                f"got {self.timestep_calibration!r}"
            )
        if self.literal_sigma <= 0:
            raise ConfigError(f"literal_sigma must be > 0, got {self.literal_sigma}")


def literal_timesteps(n: int, mu: float, sigma: float, num_timesteps: int, seed: int) -> list[int]:
    """PTQ4DM NDTC timesteps: int(N(μ, σ)·T) clamped to [0, T − 1]."""
    rng = np.random.default_rng(seed)
    draws = rng.normal(mu, sigma, size=n) * num_timesteps
    return [int(min(max(math.trunc(d), 0), num_timesteps - 1)) for d in draws]


@register_method(
    "ptq4dm",
    config_cls=PTQ4DMConfig,
    description="PTQ4DM: L2.4 range search, EMA activations (one-step)",
)
class PTQ4DM(QuantMethod):
    """PTQ4DM adapted to one-step SR (module docstring)."""

    def weight_spec(self, target: Target, config) -> QuantSpec:
        return QuantSpec(bits=target.w_bits, granularity="channel", axis=0, rounding="half_even")

    def activation_spec(self, target: Target, config) -> QuantSpec:
        return QuantSpec(bits=target.a_bits, rounding="half_even")

    def bias_spec(self, target: Target, config) -> QuantSpec | None:
        return None

    def calibrate(self, qmodel, calibration, config: PTQ4DMConfig, progress=None) -> dict:
        model = qmodel.model
        layers = dict(iter_quant_layers(model))

        def search_weight(quantizer, tensor):
            lo, hi = lp_search_range(
                tensor, quantizer.spec, p=config.lp_norm,
                num_candidates=config.search_candidates, symmetric_range=True,
            )  # fmt: skip
            quantizer.set_range(lo, hi)

        for k, layer in enumerate(layers.values()):
            layer.init_weight_ranges(search_weight)
            if progress is not None:
                progress("ptq4dm weight search", k + 1, len(layers))

        counter = iter(range(1_000_000))
        attach_observers(
            model,
            lambda *_: LpSearchObserver(
                p=config.lp_norm,
                num_candidates=config.search_candidates,
                symmetric_range=False,
                ema_momentum=config.act_ema_momentum,
                max_elements=config.search_max_elements,
                evaluation_budget=config.search_budget,
                seed=next(counter),
            ),
        )
        after_batch = None
        literal_record = None
        if config.timestep_calibration == "literal":
            num_t = int(model.alphas_cumprod.shape[0])
            steps = literal_timesteps(
                len(calibration),
                config.literal_mu,
                config.literal_sigma,
                num_t,
                config.literal_seed,
            )
            noise_gen = torch.Generator().manual_seed(config.literal_seed)
            literal_record = {
                "timesteps": steps,
                "mu": config.literal_mu,
                "sigma": config.literal_sigma,
            }

            def after_batch(batch):
                abar = model.alphas_cumprod
                for j, idx in enumerate(batch.indices):
                    t = steps[idx]
                    z_h = batch.z_h[j : j + 1]
                    noise = torch.randn(z_h.shape, generator=noise_gen).to(z_h.device)
                    a = abar[t].to(z_h.device)
                    z_t = (a.sqrt() * z_h.double() + (1 - a).sqrt() * noise.double()).float()
                    model.predict_eps(z_t, t)

        try:
            batches = calibration_passes(
                qmodel, calibration, batch_size=config.calib_batch_size, scope=config.scope,
                progress=progress, after_batch=after_batch, stage="ptq4dm activation search",
            )  # fmt: skip
        finally:
            observers = detach_observers(model)
        one_sided = sum(1 for d in observers.values() if d.get("one_side") in ("pos", "neg"))
        return {
            "weight_ranges": f"per-channel symmetric-range L{config.lp_norm} search, "
            f"{config.search_candidates} candidates",
            "activation_ranges": f"per-tensor L{config.lp_norm} search + EMA {config.act_ema_momentum}",
            "activation_quantizers": len(observers),
            "one_sided_activation_quantizers": one_sided,
            "calibration_batches": batches,
            "calibration_crops": len(calibration),
            "timestep_calibration": config.timestep_calibration,
            "literal": literal_record,
        }

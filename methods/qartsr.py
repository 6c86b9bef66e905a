"""``qartsr``: QArtSR (Zhu et al., arXiv 2503.05584) — Timestep Retraining Quantization (TRQ),
Reversed Per-module Quantization (RPQ), extended end-to-end training (ET) and a low-rank quantizer.

QArtSR's code is not released; this follows its README, abstract and figures (methods.md §7) and
reconstructs everything they leave open. Every [RECON] choice is a config field with a documented
default; ``docs/qartsr.md`` gives the reasons.

Pipeline of :meth:`QArtSR.calibrate`:

1. **Quantizer** (:mod:`harness.quant.lowrank`): every targeted conv/linear becomes
   Y = L1L2·X (16 bit) + Q_A(φ⊙X)·Q_W((W − L1L2 + F1F2)⊘φ); UNet attention operands get PassionSR's
   learnable-boundary quantizers (:mod:`harness.quant.lbq`). Initialisation on ``init_crops``
   calibration crops: per-input-channel activation maxima from a float pass → φ (SmoothQuant α);
   truncated SVD → L1, L2; F2 = 0; weight ranges per output channel by an L_p search on the residual;
   activation ranges by PTQ4DM's L_p search (EMA over batches) in a fully quantized pass.
2. **TRQ**: the quantized model runs at a retraining timestep T* — the UNet's timestep embedding and
   the x0 coefficients both use T* — while the teacher is the FP model at the calibration set's
   timestep (999). T* is ``timestep`` if given, 999 without TRQ, else chosen by a sweep over
   ``tstar_grid``: for each candidate the initial state is restored, activation ranges are
   re-observed at T, the UNet's QArtSR parameters are retrained for ``sweep_iters`` steps toward the
   teacher's HQ latent, and the image loss ‖I_q − I_fp‖² is measured on a held-out calibration split;
   the lowest loss wins and the whole curve is recorded (``tstar_sweep``).
3. **RPQ**: the model's units (:meth:`OneStepSR.ordered_modules`) are quantized one at a time from the
   output end toward the input (``rpq_order="reverse"``; ``"forward"`` is the ablation). At step k
   unit k is being quantized, the units already visited are quantized, the others compute exactly
   in float. Loss = ``module_loss_weight``·relMSE(M_k^q, M_k^fp) + ``image_loss_weight``·
   ‖I_q − I_fp‖²; the QArtSR parameters of unit k and of every already-quantized unit are updated
   (everything else has ``requires_grad=False``). With ``checkpoint_dir`` the state is saved after
   every finished unit and an interrupted run resumes after the last finished unit.
4. **ET**: all units quantized; loss = ``lpips_weight``·LPIPS(I_q, I_fp) + ``mse_weight``·‖I_q − I_fp‖²
   with the FP image as teacher. LPIPS weights are never downloaded: when they are absent the run
   fails with the missing-weights message unless ``perceptual_substitute`` names a substitute
   (``"ssim"``: 1 − SSIM, differentiable, written here; ``"l1"``), which is recorded with the result.

Only the QArtSR parameters (L1, L2, F1, F2, log φ, quantizer boundaries) are trained; W, biases and
every other base parameter stay frozen. The calibrated model's ``settings.timestep`` is set to T*.

Budgets: ``budget="paper"`` (default) and ``"tiny"`` fill the iteration counts, batch size and
learning rates that are left unset (explicit fields win); the resolved values are part of the
config (and so of the run-matrix cell id) and of the calibration record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError, DivergedError, MetricUnavailable, ModelError
from harness.model import is_under
from harness.quant.api import MethodConfig, QuantMethod, Target
from harness.quant.attention import AttentionQuantizers
from harness.quant.calibration import encode_per_sample
from harness.quant.lbq import convert_to_lbq, enforce_lbq_order
from harness.quant.lowrank import (
    LOWRANK_PRECISIONS,
    SVD_SOURCES,
    LowRankQuantMixin,
    TimestepBoundLinear,
    fp_mode,
    init_lowrank,
    init_smoothing,
    iter_lowrank_layers,
    lowrank_size_report,
    make_lowrank_layer,
)
from harness.quant.quantizer import (
    LpSearchObserver,
    QuantSpec,
    RangeObserver,
    compute_qparams,
    expand_range,
    fake_quantize,
    lp_search_range,
    observed_min_max,
    to_range_view,
)
from harness.quant.state import attach_observers, detach_observers, iter_attention_quantizers
from harness.registry import register_method, register_variant

DEFAULT_TSTAR_GRID = (999, 749, 499, 249, 99, 1)
BUDGETS = ("auto", "paper", "tiny")
RPQ_ORDERS = ("reverse", "forward")
RANGE_INITS = ("tail_search", "lp_search", "minmax")
WEIGHT_RANGE_INITS = ("clip_search", "lp_search", "minmax")
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5
TAIL_FRACTIONS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
SUBSTITUTES = ("ssim", "l1")
CHECKPOINT_STATE = "qartsr_state.safetensors"
CHECKPOINT_PROGRESS = "qartsr_progress.json"

BUDGET_PROFILES: dict[str, dict[str, float | int]] = {
    # [RECON] paper-scale: PassionSR's 500-crop set, batch 1 (PassionSR's training batch), about one
    # epoch per RPQ unit and two for ET; Adam lr 1e-4 for the low-rank branch and the adapter,
    # 1e-5 for φ and the quantizer boundaries (methods.md §7.5 [RECON]; PassionSR's lr 1e-5).
    "paper": {
        "init_crops": 32,
        "sweep_iters": 100,
        "rpq_iters": 500,
        "et_iters": 1000,
        "batch_size": 1,
        "lr_lowrank": 1e-4,
        "lr_finetune": 1e-4,
        "lr_smooth": 1e-5,
        "lr_quant": 1e-5,
        "rpq_lr_scale": 1.0,
    },
    # [RECON] CPU demo: a few minutes per cell for the tiny model (64 crops of 32 px LR, 2 cores): few
    # steps. Learning rates measured on the trained tiny model at W4A4 on the calibration selection
    # split (docs/qartsr.md): Adam lr 1e-3 on L/F/φ destroys the T=999 model within a few steps (every
    # element of F2 moves by ~lr at once and ε errors are amplified 14.6×); in ET 1e-4 (boundaries
    # 1e-3) gave the lowest held-out loss; RPQ's one-crop steps are noisier and did best at about a
    # third of that (rpq_lr_scale). et_iters by the held-out image loss after ET (16 selection crops
    # of 64, seed 0, W4A4): 32 → 0.0061, 96 → 0.0045, 192 → 0.0040 (docs/qartsr.md).
    "tiny": {
        "init_crops": 4,
        "sweep_iters": 4,
        "rpq_iters": 2,
        "et_iters": 192,
        "batch_size": 1,
        "lr_lowrank": 1e-4,
        "lr_finetune": 1e-4,
        "lr_smooth": 1e-4,
        "lr_quant": 1e-3,
        "rpq_lr_scale": 0.3,
    },
}
BUDGET_FIELDS = tuple(BUDGET_PROFILES["paper"])


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class QArtSRConfig(MethodConfig):
    """QArtSR fields on top of :class:`MethodConfig` (module docstring; reasons in docs/qartsr.md).

    Budget fields left as None are filled from ``BUDGET_PROFILES[budget]`` at construction;
    ``budget="auto"`` (default) leaves them for :meth:`QArtSR.calibrate`, which picks ``tiny`` for
    the embedded tiny model (base model name ``"tiny"``) and ``paper`` otherwise (as PassionSR's
    ``profile="auto"``) and records the resolved values.
    """

    method: str = "qartsr"
    budget: str = "auto"
    # quantizer design
    lowrank: bool = True
    lowrank_rank: int = 32
    lowrank_rank_fraction: float = 0.1
    finetune_rank: int = 8
    lowrank_precision: str = "fp16"
    svd_source: str = "smoothed"
    smooth_alpha: float = 0.5
    weight_range_init: str = "clip_search"
    act_range_init: str = "tail_search"
    lp_norm: float = 2.4
    act_ema_momentum: float = 0.9
    # TRQ
    trq: bool = True
    timestep: int | None = None
    tstar_grid: tuple[int, ...] = DEFAULT_TSTAR_GRID
    selection_fraction: float = 0.25
    # RPQ
    rpq: bool = True
    rpq_order: str = "reverse"
    module_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    # ET
    et: bool = True
    lpips_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_substitute: str | None = None
    # optimisation (None: from the budget profile)
    init_crops: int | None = None
    sweep_iters: int | None = None
    rpq_iters: int | None = None
    et_iters: int | None = None
    batch_size: int | None = None
    lr_lowrank: float | None = None
    lr_finetune: float | None = None
    lr_smooth: float | None = None
    lr_quant: float | None = None
    rpq_lr_scale: float | None = None
    data_seed: int = 0
    checkpoint_dir: str | None = None
    report_size: bool = True

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ConfigError(f"{self.method}.budget must be one of {BUDGETS}, got {self.budget!r}")
        profile = BUDGET_PROFILES.get(self.budget, {})
        for name, value in profile.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        where = self.method
        if self.lowrank_rank < 0 or self.finetune_rank < 0:
            raise ConfigError(f"{where}: lowrank_rank and finetune_rank must be >= 0")
        if not 0.0 < self.lowrank_rank_fraction <= 1.0:
            raise ConfigError(f"{where}.lowrank_rank_fraction must be in (0, 1]")
        if self.lowrank_precision not in LOWRANK_PRECISIONS:
            raise ConfigError(f"{where}.lowrank_precision must be one of {LOWRANK_PRECISIONS}")
        if self.svd_source not in SVD_SOURCES:
            raise ConfigError(f"{where}.svd_source must be one of {SVD_SOURCES}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"{where}.smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.weight_range_init not in WEIGHT_RANGE_INITS:
            raise ConfigError(f"{where}.weight_range_init must be one of {WEIGHT_RANGE_INITS}")
        if self.act_range_init not in RANGE_INITS:
            raise ConfigError(f"{where}.act_range_init must be one of {RANGE_INITS}")
        if self.lp_norm <= 0:
            raise ConfigError(f"{where}.lp_norm must be > 0")
        if not 0.0 <= self.act_ema_momentum < 1.0:
            raise ConfigError(f"{where}.act_ema_momentum must be in [0, 1)")
        if not self.tstar_grid:
            raise ConfigError(f"{where}.tstar_grid must not be empty")
        for t in (*self.tstar_grid, *(() if self.timestep is None else (self.timestep,))):
            if not 0 <= t <= 999:
                raise ConfigError(f"{where}: timesteps must be in [0, 999], got {t}")
        if not self.trq and self.timestep not in (None, 999):
            raise ConfigError(
                f"{where}: trq=false runs at T=999; timestep={self.timestep} conflicts"
            )
        if not 0.0 <= self.selection_fraction < 1.0:
            raise ConfigError(f"{where}.selection_fraction must be in [0, 1)")
        if self.rpq_order not in RPQ_ORDERS:
            raise ConfigError(f"{where}.rpq_order must be one of {RPQ_ORDERS}")
        for name in ("module_loss_weight", "image_loss_weight", "lpips_weight", "mse_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0")
        if self.rpq and self.module_loss_weight == 0 and self.image_loss_weight == 0:
            raise ConfigError(f"{where}: RPQ needs a module or an image loss weight > 0")
        if self.et and self.lpips_weight == 0 and self.mse_weight == 0:
            raise ConfigError(f"{where}: ET needs lpips_weight or mse_weight > 0")
        if self.perceptual_substitute is not None and self.perceptual_substitute not in SUBSTITUTES:
            raise ConfigError(
                f"{where}.perceptual_substitute must be one of {SUBSTITUTES} or unset, "
                f"got {self.perceptual_substitute!r}"
            )
        for name in ("init_crops", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{name} must be >= 1")
        for name in ("sweep_iters", "rpq_iters", "et_iters"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{where}.{name} must be >= 0")
        for name in ("lr_lowrank", "lr_finetune", "lr_smooth", "lr_quant", "rpq_lr_scale"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{where}.{name} must be >= 0")

    def resolved(self, base_model: str | None) -> QArtSRConfig:
        """This config with ``budget="auto"`` resolved (``tiny`` for the embedded tiny model)."""
        if self.budget != "auto":
            return self
        return dataclasses.replace(self, budget="tiny" if base_model == "tiny" else "paper")

    def budget_values(self) -> dict:
        return {name: getattr(self, name) for name in BUDGET_FIELDS}


# ---------------------------------------------------------------------------- range observer


class TailClipObserver(RangeObserver):
    """Per-tensor activation range by a small clipping search (a cheap stand-in for PTQ4DM's
    100 × 2^b grid search, which costs minutes per pass on CPU) [RECON].

    Candidates: [quantile(f), quantile(1 − f)] for the tail fractions ``TAIL_FRACTIONS`` (f = 0: the
    exact min/max), each scored by mean |x − Q(x)|^p on a seeded uniform sample of ``sample``
    elements (all of them if fewer); the best range is EMA-averaged over calls (first call: taken).
    Channel/group granularities fall back to min/max.
    """

    name = "tail_clip_search"

    def __init__(
        self, p: float = 2.4, ema_momentum: float = 0.9, sample: int = 65536, seed: int = 0
    ):
        self.p = p
        self.ema_momentum = ema_momentum
        self.sample = sample
        self.seed = seed
        self.calls = 0
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, quantizer, x: torch.Tensor) -> None:
        spec = quantizer.spec
        if spec.granularity != "tensor":
            lo, hi = observed_min_max(x, spec)
        else:
            flat = x.detach().reshape(-1).float().cpu()
            lo_full, hi_full = flat.min(), flat.max()
            if flat.numel() > self.sample:
                idx = torch.randint(0, flat.numel(), (self.sample,), generator=self._generator)
                flat = flat[idx]
            data = flat.sort().values
            best = None
            for f in TAIL_FRACTIONS:
                k = int(f * data.numel())
                if f > 0 and k == 0:
                    continue
                c_lo = lo_full if f == 0 else data[k]
                c_hi = hi_full if f == 0 else data[-1 - k]
                delta, zp = compute_qparams(c_lo, c_hi, spec)
                err = float((data - fake_quantize(data, delta, zp, spec)).abs().pow(self.p).mean())
                if best is None or err < best[0]:
                    best = (err, c_lo, c_hi)
            lo, hi = best[1], best[2]
        lo = lo.to(quantizer.x_min.device)
        hi = hi.to(quantizer.x_max.device)
        if quantizer.is_initialized and self.ema_momentum > 0:
            m = self.ema_momentum
            lo = m * quantizer.x_min.detach() + (1 - m) * lo
            hi = m * quantizer.x_max.detach() + (1 - m) * hi
        quantizer.set_range(lo, hi)
        self.calls += 1

    def describe(self) -> dict:
        return {"observer": self.name, "p": self.p, "ema_momentum": self.ema_momentum,
                "sample": self.sample, "calls": self.calls}  # fmt: skip


@torch.no_grad()
def clip_search_range(
    x: torch.Tensor, spec, p: float = 2.4, ratios: tuple[float, ...] = CLIP_RATIOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (channel/group/tensor) range [r·min, r·max] minimizing mean |x − Q(x)|^p over the
    shrink ratios r ∈ ``ratios`` (1.0 → 0.5): a fast weight-clipping search [RECON] (PTQ4DM's
    100 × 2^b search costs about a minute per 8-bit layer on CPU here)."""
    x = x.detach().float()
    lo0, hi0 = observed_min_max(x, spec)
    view = to_range_view(x, spec)
    ndim = view.dim()

    def unit_error(diff: torch.Tensor) -> torch.Tensor:
        if spec.granularity == "tensor":
            return diff.mean()
        if spec.granularity == "group":
            return diff.mean(dim=-1)
        axis = spec.axis % diff.dim()
        return diff.movedim(axis, 0).reshape(diff.shape[axis], -1).mean(dim=1)

    best_err = best_lo = best_hi = None
    for r in ratios:
        lo, hi = lo0 * r, hi0 * r
        delta, zp = compute_qparams(lo, hi, spec)
        xq = fake_quantize(
            view, expand_range(delta, spec, ndim), expand_range(zp, spec, ndim), spec
        )
        err = unit_error((view - xq).abs().pow(p))
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


# ---------------------------------------------------------------------------- losses


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_loss(a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
    """1 − mean SSIM (Wang et al. 2004: 11×11 Gaussian window σ=1.5, K1=0.01, K2=0.03, data range
    1, per RGB channel, valid region), differentiable; the ET substitute for LPIPS."""
    channels = a01.shape[1]
    window = _gaussian_window().to(a01)[None, None].repeat(channels, 1, 1, 1)

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a01), blur(b01)
    var_a = blur(a01 * a01) - mu_a**2
    var_b = blur(b01 * b01) - mu_b**2
    cov = blur(a01 * b01) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return 1.0 - ssim.mean()


def perceptual_term(config: QArtSRConfig) -> tuple[Callable | None, str]:
    """ET's perceptual term on images in [0, 1]: LPIPS when its weights are present, else the
    configured substitute, else :class:`MetricUnavailable` with the missing-weights message."""
    if config.lpips_weight == 0:
        return None, "none (lpips_weight = 0)"
    from harness.metrics import create_metric

    try:
        metric = create_metric("lpips")
    except MetricUnavailable as exc:
        if config.perceptual_substitute is None:
            raise MetricUnavailable(
                f"QArtSR's extended training needs LPIPS ({exc}); provide the weights, or name a "
                f"substitute explicitly with perceptual_substitute = one of {list(SUBSTITUTES)}"
            ) from exc
        name = config.perceptual_substitute
        fn = ssim_loss if name == "ssim" else (lambda a, b: (a - b).abs().mean())
        label = "1 - SSIM" if name == "ssim" else "L1"
        return fn, f"{name} ({label}) as a substitute for LPIPS, which is unavailable: {exc}"
    net = metric.model
    net.as_loss = True  # pyiqa InferenceModel: keep the graph (lpips is lower-better)
    for p in net.parameters():
        p.requires_grad_(False)

    def lpips_fn(a01, b01):
        return net(a01, b01).mean()

    return lpips_fn, "lpips (pyiqa, weights present)"


def _flatten_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        out = []
        for v in value:
            out.extend(_flatten_tensors(v))
        return out
    return []


def relative_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of ‖s − t‖² / ‖t‖² (per-element means): the module loss, made scale-free so
    that outputs of different magnitudes (time embedding, features, images) weigh alike."""
    if len(student) != len(teacher) or not student:
        raise ModelError(
            f"module loss: captured {len(student)} student and {len(teacher)} teacher tensors"
        )
    terms = [
        (s - t).pow(2).mean() / (t.pow(2).mean() + 1e-8)
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------- units


@dataclass
class UnitParts:
    """What a unit of ``ordered_modules`` holds: its quantized layers and attention quantizers, and
    the member modules whose outputs make the module loss."""

    name: str
    members: tuple[str, ...]
    layers: dict[str, LowRankQuantMixin]
    attention: dict[str, AttentionQuantizers]
    loss_members: tuple[str, ...]


def build_units(model, scope: str) -> list[UnitParts]:
    """The units of ``model.ordered_modules(scope)`` (forward order) with their QArtSR layers and
    attention quantizers; every QArtSR layer must belong to exactly one unit."""
    layers = dict(iter_lowrank_layers(model))
    attention = dict(iter_attention_quantizers(model))
    units = []
    claimed: set[str] = set()
    for unit in model.ordered_modules(scope):
        own_layers = {n: layer for n, layer in layers.items() if unit.contains(n)}
        own_attn = {n: q for n, q in attention.items() if unit.contains(n)}
        loss_members = tuple(
            m for m in unit.members if any(is_under(n, m) for n in (*own_layers, *own_attn))
        )
        claimed.update(own_layers)
        units.append(UnitParts(unit.name, unit.members, own_layers, own_attn, loss_members))
    missing = sorted(set(layers) - claimed)
    if missing:
        raise ModelError(
            f"QArtSR layers outside every unit of ordered_modules({scope!r}): {missing[:3]}"
        )
    return units


def set_unit_quantized(unit: UnitParts, quantized: bool) -> None:
    """Quantized (QArtSR form, weights and activations fake-quantized) or exact float."""
    for layer in unit.layers.values():
        layer.set_fp(not quantized)
        layer.set_quant_state(True, True)
    for q in unit.attention.values():
        q.quant_activations = bool(quantized)


def unit_parameter_groups(units: list[UnitParts]) -> dict[str, list[nn.Parameter]]:
    """The trainable QArtSR parameters of ``units`` by group (lowrank, finetune, smooth, quant)."""
    groups: dict[str, list[nn.Parameter]] = {
        "lowrank": [],
        "finetune": [],
        "smooth": [],
        "quant": [],
    }
    seen: set[int] = set()
    for unit in units:
        for layer in unit.layers.values():
            for group, params in layer.finetune_parameters().items():
                for p in params:
                    if id(p) not in seen:
                        seen.add(id(p))
                        groups[group].append(p)
        for q in unit.attention.values():
            for p in q.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    groups["quant"].append(p)
    return groups


def qartsr_parameters(model) -> list[nn.Parameter]:
    """Every trainable QArtSR parameter of ``model`` (layers and attention quantizers)."""
    seen: set[int] = set()
    out = []
    for _, layer in iter_lowrank_layers(model):
        for params in layer.finetune_parameters().values():
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    for _, q in iter_attention_quantizers(model):
        for p in q.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def make_optimizer(groups: dict[str, list[nn.Parameter]], config: QArtSRConfig, scale=1.0):
    """Adam over the groups with their learning rates (× ``scale``); None if nothing is trainable."""
    lrs = {
        "lowrank": config.lr_lowrank * scale,
        "finetune": config.lr_finetune * scale,
        "smooth": config.lr_smooth * scale,
        "quant": config.lr_quant * scale,
    }
    param_groups = [
        {"params": params, "lr": lrs[name]} for name, params in groups.items() if params
    ]
    return torch.optim.Adam(param_groups) if param_groups else None


# ---------------------------------------------------------------------------- forwards


def student_forward(model, batch, timestep: int, scope: str) -> dict[str, torch.Tensor]:
    """The differentiable one-step pipeline at ``timestep`` (TRQ: embedding and x0 at T*): scope UV
    encodes the upsampled LR with per-sample posterior noise (as the teacher); scope U starts from
    the teacher's latent z_L (the VAE is float)."""
    z_l = encode_per_sample(model, batch.x) if scope == "UV" else batch.z_l
    eps = model.predict_eps(z_l, timestep)
    z_h = model.x0_from_eps(z_l, eps, timestep)
    return {"z_l": z_l, "z_h": z_h, "image": model.decode(z_h)}


@torch.no_grad()
def teacher_module_outputs(model, batch, members: tuple[str, ...], timestep: int, scope: str):
    """Outputs of ``members`` in the exact float model at the teacher timestep (in capture order).
    The forward stops once the last member has run (nothing after it is needed)."""
    with (
        fp_mode(model),
        capture_outputs(model, members, stop_after_last=True) as captured,
        contextlib.suppress(_StopForward),
    ):
        student_forward(model, batch, timestep, scope)
    return [t.detach() for t in captured.tensors()]


class _StopForward(Exception):
    """Raised by a capture hook to end a teacher forward early."""


class _Capture:
    def __init__(self, members):
        self.members = members
        self.outputs: dict[str, list] = {m: [] for m in members}

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for m in self.members:
            for value in self.outputs[m]:
                out.extend(_flatten_tensors(value))
        return out


class capture_outputs:
    """Context manager: forward hooks recording the outputs of the named modules."""

    def __init__(self, model, members, stop_after_last: bool = False):
        self.model = model
        self.capture = _Capture(tuple(members))
        self.stop_after_last = stop_after_last
        self.handles = []

    def __enter__(self) -> _Capture:
        last = self.capture.members[-1] if self.capture.members else None
        for name in self.capture.members:
            module = self.model.get_submodule(name)

            def hook(_m, _i, output, _name=name):
                self.capture.outputs[_name].append(output)
                if self.stop_after_last and _name == last:
                    raise _StopForward

            self.handles.append(module.register_forward_hook(hook))
        return self.capture

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def batch_schedule(pool: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches drawn from ``pool`` by cycling through seeded permutations."""
    if not pool:
        raise ConfigError("QArtSR needs at least one calibration crop for training")
    generator = torch.Generator().manual_seed(int(seed))
    batches: list[list[int]] = []
    order: list[int] = []
    bs = min(batch_size, len(pool))
    for _ in range(steps):
        batch = []
        while len(batch) < bs:
            if not order:
                order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
            batch.append(order.pop(0))
        batches.append(batch)
    return batches


def _check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise DivergedError(f"QArtSR {stage}: non-finite loss at step {step}")


def train_steps(
    model,
    params: dict[str, list[nn.Parameter]],
    config: QArtSRConfig,
    batches: list[list[int]],
    calibration,
    loss_fn: Callable,
    stage: str,
    progress=None,
    lr_scale: float = 1.0,
) -> list[float]:
    """Adam steps on ``params`` (only these have ``requires_grad``); returns the loss curve."""
    device = model.alphas_cumprod.device
    for p in qartsr_parameters(model):
        p.requires_grad_(False)
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    optimizer = make_optimizer(params, config, lr_scale)
    curve: list[float] = []
    if optimizer is None or not batches:
        return curve
    for step, indices in enumerate(batches):
        batch = calibration.batch(indices, device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        _check_finite(loss, stage, step)
        loss.backward()
        optimizer.step()
        enforce_lbq_order(model)
        curve.append(float(loss.detach()))
        if progress is not None:
            progress(stage, step + 1, len(batches))
    for group in params.values():
        for p in group:
            p.requires_grad_(False)
            p.grad = None
    return curve


@torch.no_grad()
def image_loss_on(model, calibration, indices: list[int], timestep: int, scope: str, bs: int):
    """Mean ‖I_q − I_fp‖² over ``indices`` (the current quantization state, no gradients)."""
    if not indices:
        return None
    device = model.alphas_cumprod.device
    total = 0.0
    for start in range(0, len(indices), bs):
        batch = calibration.batch(indices[start : start + bs], device)
        image = student_forward(model, batch, timestep, scope)["image"]
        total += float((image - batch.image).pow(2).mean(dim=(1, 2, 3)).sum())
    value = total / len(indices)
    if not math.isfinite(value):
        raise DivergedError(f"QArtSR: non-finite image loss at T={timestep}")
    return value


# ---------------------------------------------------------------------------- initialisation


@torch.no_grad()
def collect_input_absmax(model, calibration, indices, timestep: int, scope: str, bs: int):
    """Per-input-channel max|X| of every QArtSR layer's input in the exact float model."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in iter_lowrank_layers(model):

        def hook(module, inputs, _name=name):
            x = inputs[0].detach()
            axis = module._input_channel_axis(x)
            value = x.abs().movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
            previous = stats.get(_name)
            stats[_name] = value if previous is None else torch.maximum(previous, value)

        handles.append(layer.register_forward_pre_hook(hook))
    device = model.alphas_cumprod.device
    try:
        with fp_mode(model):
            for start in range(0, len(indices), bs):
                student_forward(
                    model, calibration.batch(indices[start : start + bs], device), timestep, scope
                )
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def init_weight_ranges(model, config: QArtSRConfig) -> None:
    """Per-output-channel ranges of the residual weight: clip-ratio search (default), PTQ4DM's L_p
    search or min/max."""
    for _, layer in iter_lowrank_layers(model):
        parts = layer.weight_parts(layer.effective_weight().detach())
        for quantizer, part in zip(layer.weight_quantizers, parts, strict=True):
            if config.weight_range_init == "minmax":
                quantizer.set_range(*observed_min_max(part, quantizer.spec))
            elif config.weight_range_init == "clip_search":
                quantizer.set_range(*clip_search_range(part, quantizer.spec, config.lp_norm))
            else:
                lo, hi = lp_search_range(
                    part.cpu(), quantizer.spec, p=config.lp_norm, evaluation_budget=2**25
                )
                quantizer.set_range(lo, hi)
        bias = layer.effective_bias()
        if layer.bias_quantizer is not None and bias is not None:
            layer.bias_quantizer.set_range(
                *observed_min_max(bias.detach(), layer.bias_quantizer.spec)
            )


@torch.no_grad()
def init_activation_ranges(model, calibration, indices, timestep, scope, config, bs) -> int:
    """Observe every activation/attention quantizer in a fully quantized pass at ``timestep``
    (PTQ4DM's L_p search + EMA, or running min/max); previous ranges are discarded."""
    from harness.quant.quantizer import MinMaxObserver
    from harness.quant.state import iter_quantizers

    for _, _, q in iter_quantizers(model, ("act", "attn")):
        q.initialized.fill_(False)
    counter = iter(range(1_000_000))

    def factory(*_):
        if config.act_range_init == "minmax":
            return MinMaxObserver(running=True)
        if config.act_range_init == "tail_search":
            return TailClipObserver(
                p=config.lp_norm, ema_momentum=config.act_ema_momentum, seed=next(counter)
            )
        return LpSearchObserver(
            p=config.lp_norm, ema_momentum=config.act_ema_momentum, max_elements=4096,
            evaluation_budget=2**25, seed=next(counter),
        )  # fmt: skip

    count = attach_observers(model, factory)
    device = model.alphas_cumprod.device
    try:
        for start in range(0, len(indices), bs):
            batch = calibration.batch(indices[start : start + bs], device)
            student_forward(model, batch, timestep, scope)
    finally:
        detach_observers(model)
    return count


def initialise_quantizers(model, calibration, config, indices, timestep, bs, report) -> dict:
    """φ from the float activation maxima, L1L2 from the SVD, F2 = 0, weight ranges on the residual,
    activation ranges in a quantized pass at ``timestep``; returns the record."""
    scope = config.scope
    report("qartsr init: activation statistics", 0, 3)
    absmax = collect_input_absmax(model, calibration, indices, timestep, scope, bs)
    energies = []
    ranks = {}
    for name, layer in iter_lowrank_layers(model):
        init_smoothing(layer, absmax.get(name), config.smooth_alpha)
        info = init_lowrank(layer, config.svd_source)
        ranks[name] = [layer.rank, layer.finetune_rank]
        if info["rank"]:
            energies.append(info["energy"])
    report("qartsr init: weight ranges", 1, 3)
    init_weight_ranges(model, config)
    report("qartsr init: activation ranges", 2, 3)
    init_activation_ranges(model, calibration, indices, timestep, scope, config, bs)
    report("qartsr init: activation ranges", 3, 3)
    return {
        "crops": list(indices),
        "layers": len(ranks),
        "ranks": ranks,
        "lowrank_layers": sum(1 for r in ranks.values() if r[0] > 0),
        "mean_branch_energy": sum(energies) / len(energies) if energies else 0.0,
        "smooth_alpha": config.smooth_alpha,
        "svd_source": config.svd_source,
        "weight_range_init": config.weight_range_init,
        "act_range_init": config.act_range_init,
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every QArtSR tensor (parameters and quantizer state) of ``model``, cloned."""
    keep = {}
    for name, tensor in model.state_dict().items():
        if any(
            key in name
            for key in (
                "log_smooth", "lowrank_", "finetune_", "x_min", "x_max", "initialized",
                "bound_timestep", "bound_input",
            )
        ):  # fmt: skip
            keep[name] = tensor.detach().clone()
    return keep


def restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        current = model.state_dict()
        for name, value in state.items():
            current[name].copy_(value)


# ---------------------------------------------------------------------------- checkpoints


def _fingerprint(config: QArtSRConfig, qmodel, calibration) -> str:
    data = config.to_dict()
    data.pop("checkpoint_dir", None)
    material = {
        "config": data,
        "base": qmodel.base_identity,
        "calibration": getattr(calibration, "cache_key", None),
        "crops": getattr(calibration, "crops_hash", None),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(directory: Path, model, progress: dict) -> None:
    """Atomically write the QArtSR state and the progress record."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in snapshot(model).items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=CHECKPOINT_STATE, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, directory / CHECKPOINT_STATE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=CHECKPOINT_PROGRESS, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(progress, handle, indent=1)
    os.replace(tmp, directory / CHECKPOINT_PROGRESS)


def load_checkpoint(directory: Path, model, fingerprint: str) -> dict | None:
    """The progress record (and the state loaded into ``model``) of a matching checkpoint, None if
    there is none; a checkpoint of another config/model/calibration is a :class:`ConfigError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    progress_path = directory / CHECKPOINT_PROGRESS
    state_path = directory / CHECKPOINT_STATE
    if not progress_path.is_file():
        return None
    try:
        progress = json.loads(progress_path.read_text())
        tensors = load_file(str(state_path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{directory}: corrupt QArtSR checkpoint ({exc})") from exc
    if progress.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{directory}: this QArtSR checkpoint belongs to another config, base model or "
            "calibration set; use another checkpoint_dir or delete it"
        )
    expected = snapshot(model)
    if sorted(expected) != sorted(tensors):
        raise ModelError(f"{state_path}: tensor keys do not match the model")
    restore(model, tensors)
    return progress


# ---------------------------------------------------------------------------- the method


def apply_retrain_timestep(qmodel) -> int | None:
    """Set ``settings.timestep`` of a loaded QArtSR model to its recorded T* (from the bound time
    embedding layer); returns T*, or None if the model records none."""
    model = getattr(qmodel, "model", qmodel)
    for _, module in model.named_modules():
        if isinstance(module, TimestepBoundLinear) and int(module.bound_timestep) >= 0:
            tstar = int(module.bound_timestep)
            model.settings = dataclasses.replace(model.settings, timestep=tstar)
            return tstar
    return None


@register_method(
    "qartsr",
    config_cls=QArtSRConfig,
    description="QArtSR: TRQ + reversed per-module quantization + extended training, low-rank quantizer",
)
class QArtSR(QuantMethod):
    """QArtSR (module docstring)."""

    def __init__(self) -> None:
        self._config: QArtSRConfig | None = None

    # -- layer factories (the config reaches them through layer_spec/configure)
    def configure(self, config: QArtSRConfig) -> None:
        """Give the layer factory the config (ranks, precision) before layers are built."""
        self._config = config

    def layer_spec(self, target: Target, config, split_at):
        self._config = config
        return super().layer_spec(target, config, split_at)

    def weight_spec(self, target: Target, config) -> QuantSpec:
        """Per-output-channel asymmetric, rounding half to even (``torch.round``) [RECON]."""
        return QuantSpec(bits=target.w_bits, granularity="channel", axis=0, rounding="half_even")

    def activation_spec(self, target: Target, config) -> QuantSpec:
        """Per-tensor asymmetric, rounding half to even (``torch.round``) [RECON]."""
        return QuantSpec(bits=target.a_bits, rounding="half_even")

    def make_layer(self, module: nn.Module, target: Target):
        config = self._config or QArtSRConfig()
        return make_lowrank_layer(
            module, target.layer, rank=config.lowrank_rank,
            rank_fraction=config.lowrank_rank_fraction, finetune_rank=config.finetune_rank,
            lowrank=config.lowrank, lowrank_precision=config.lowrank_precision, name=target.name,
            seed=config.data_seed,
        )  # fmt: skip

    def make_attention_quantizers(self, attn: nn.Module, target: Target) -> AttentionQuantizers:
        quantizers = AttentionQuantizers(target.attention)
        convert_to_lbq(quantizers)
        return quantizers

    def after_load(self, qmodel) -> None:
        """Restore the inference timestep T* after loading a saved model (see the report)."""
        apply_retrain_timestep(qmodel)

    def size_report(self, model: nn.Module, packed: dict | None = None) -> dict:
        """Counts the 16-bit low-rank branch and smoothing honestly (:func:`lowrank_size_report`)."""
        return lowrank_size_report(model)

    # -- calibration
    def calibrate(self, qmodel, calibration, config: QArtSRConfig, progress=None) -> dict:
        started = time.perf_counter()
        config = config.resolved(getattr(qmodel, "base_model", None))
        timings: dict[str, float] = {}
        model = qmodel.model
        scope = config.scope
        model.requires_grad_(False)
        teacher_t = int(calibration.timestep)
        loss_fn_perceptual, perceptual_label = (None, "not used (et = false)")
        if config.et:
            loss_fn_perceptual, perceptual_label = perceptual_term(config)
        units = build_units(model, scope)
        for unit in units:
            set_unit_quantized(unit, True)

        n = len(calibration)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.data_seed))
        n_sel = int(round(config.selection_fraction * n)) if n >= 2 else 0
        n_sel = min(n_sel, n - 1)
        selection = sorted(order[:n_sel].tolist())
        train = sorted(order[n_sel:].tolist())
        bs = config.batch_size
        eval_bs = max(bs, 4)
        init_idx = train[: config.init_crops]

        def report(stage, done, total):
            if progress is not None:
                progress(stage, done, total)

        checkpoint = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        fingerprint = _fingerprint(config, qmodel, calibration)
        state = load_checkpoint(checkpoint, model, fingerprint) if checkpoint else None
        resumed_from = None if state is None else list(state.get("done_units", []))
        record_init: dict = {}
        curves: dict = {}
        sweep_record = None

        if state is None:
            # 1. quantizer initialisation
            t0 = time.perf_counter()
            record_init = initialise_quantizers(
                model, calibration, config, init_idx, teacher_t, eval_bs, report
            )
            timings["init_s"] = time.perf_counter() - t0
            initial = snapshot(model)

            # 2. TRQ
            t0 = time.perf_counter()
            if not config.trq:
                tstar, how = 999, "trq disabled: T* = 999"
            elif config.timestep is not None:
                tstar, how = int(config.timestep), "fixed by config.timestep"
            else:
                sweep_record, sweep_curves = self._tstar_sweep(
                    model, calibration, config, units, initial, train, selection, teacher_t, report
                )
                curves.update(sweep_curves)
                tstar = sweep_record["selected"]
                how = sweep_record["selected_by"]
            restore(model, initial)
            if tstar != teacher_t:
                init_activation_ranges(model, calibration, init_idx, tstar, scope, config, eval_bs)
            timings["trq_s"] = time.perf_counter() - t0
            progress_record = {
                "fingerprint": fingerprint,
                "tstar": tstar,
                "tstar_how": how,
                "sweep": sweep_record,
                "init": record_init,
                "curves": curves,
                "done_units": [],
                "rpq_modules": [],
                "stage": "rpq",
                "timings": timings,
            }
            if checkpoint:
                save_checkpoint(checkpoint, model, progress_record)
        else:
            progress_record = state
            tstar = int(state["tstar"])
            how = state["tstar_how"]
            sweep_record = state.get("sweep")
            record_init = state.get("init", {})
            curves = dict(state.get("curves", {}))
            timings = dict(state.get("timings", {}))

        holdout = {"after_init": None, "after_rpq": None, "after_et": None}
        if progress_record.get("stage") == "rpq":
            for unit in units:
                set_unit_quantized(unit, True)
            if "holdout_after_init" not in progress_record:
                progress_record["holdout_after_init"] = image_loss_on(
                    model, calibration, selection, tstar, scope, eval_bs
                )
            holdout["after_init"] = progress_record["holdout_after_init"]
            # 3. RPQ
            t0 = time.perf_counter()
            rpq_curve = list(curves.get("rpq", []))
            if config.rpq:
                self._rpq(
                    model, calibration, config, units, train, tstar, teacher_t, progress_record,
                    rpq_curve, checkpoint, report,
                )  # fmt: skip
                curves["rpq"] = rpq_curve
            for unit in units:
                set_unit_quantized(unit, True)
            holdout["after_rpq"] = image_loss_on(
                model, calibration, selection, tstar, scope, eval_bs
            )
            timings["rpq_s"] = timings.get("rpq_s", 0.0) + time.perf_counter() - t0

            # 4. ET
            t0 = time.perf_counter()
            if config.et and config.et_iters:
                curves["et"] = self._et(
                    model, calibration, config, units, train, tstar, loss_fn_perceptual, report
                )
            holdout["after_et"] = image_loss_on(
                model, calibration, selection, tstar, scope, eval_bs
            )
            timings["et_s"] = time.perf_counter() - t0
            progress_record.update(stage="done", curves=curves, timings=timings, holdout=holdout)
            if checkpoint:
                save_checkpoint(checkpoint, model, progress_record)
        else:
            holdout = progress_record.get("holdout", holdout)

        # finalize: everything quantized, the model runs at T*
        for unit in units:
            set_unit_quantized(unit, True)
        self._bind_timestep(model, calibration, tstar, scope)
        qmodel.settings = dataclasses.replace(model.settings, timestep=tstar)
        timings["total_s"] = time.perf_counter() - started
        record = {
            "quantizer": "Y = L1L2·X (16-bit) + Q_A(φ⊙X)·Q_W((W − L1L2 + F1F2)⊘φ), LBQ boundaries",
            "budget": config.budget,
            "budget_values": config.budget_values(),
            "teacher_timestep": teacher_t,
            "timestep": tstar,
            "timestep_selected_by": how,
            "trq": config.trq,
            "rpq": config.rpq,
            "rpq_order": config.rpq_order if config.rpq else None,
            "rpq_units": progress_record.get("rpq_modules", []),
            "et": config.et,
            "perceptual_term": perceptual_label,
            "loss_weights": {
                "module": config.module_loss_weight,
                "image": config.image_loss_weight,
                "et_perceptual": config.lpips_weight,
                "et_mse": config.mse_weight,
            },
            "split": {"train": train, "selection": selection},
            "init": record_init,
            "holdout_image_loss": holdout,
            "curves": curves,
            "resumed_after_units": resumed_from,
            "timings": timings,
        }
        if sweep_record is not None:
            record["tstar_sweep"] = {
                "timestep": sweep_record["timesteps"],
                "image_loss": sweep_record["image_loss"],
            }
            record["tstar_sweep_detail"] = sweep_record
        if config.report_size:
            record["size"] = lowrank_size_report(model)
        return record

    # -- stages
    def _tstar_sweep(
        self, model, calibration, config, units, initial, train, selection, teacher_t, report
    ):
        scope = config.scope
        unet_units = [u for u in units if u.name.startswith("unet.")]
        eval_idx = selection or train
        eval_bs = max(config.batch_size, 4)
        init_idx = train[: config.init_crops]
        losses, curves = [], {}
        grid = list(config.tstar_grid)
        for i, t in enumerate(grid):
            restore(model, initial)
            for unit in units:
                set_unit_quantized(unit, True)
            if t != teacher_t:
                init_activation_ranges(model, calibration, init_idx, t, scope, config, eval_bs)
            params = unit_parameter_groups(unet_units)

            def latent_loss(batch, t=t):
                with torch.no_grad():
                    z_l = encode_per_sample(model, batch.x) if scope == "UV" else batch.z_l
                eps = model.predict_eps(z_l, t)
                z_h = model.x0_from_eps(z_l, eps, t)
                return (z_h - batch.z_h).pow(2).mean()

            batches = batch_schedule(
                train, config.batch_size, config.sweep_iters, config.data_seed + 7919 * (i + 1)
            )
            curve = train_steps(
                model, params, config, batches, calibration, latent_loss,
                f"qartsr T* sweep T={t} ({i + 1}/{len(grid)})", report,
            )  # fmt: skip
            curves[f"sweep_T{t}"] = curve
            losses.append(image_loss_on(model, calibration, eval_idx, t, scope, eval_bs))
        best = min(range(len(grid)), key=lambda j: (losses[j], -grid[j]))
        record = {
            "timesteps": grid,
            "image_loss": losses,
            "selected": grid[best],
            "selected_by": (
                "lowest image loss ‖I_q − I_fp‖² on the selection split "
                f"({len(eval_idx)} crops) after {config.sweep_iters} UNet retraining steps per T"
            ),
            "selection_crops": eval_idx,
        }
        return record, curves

    def _rpq(
        self,
        model,
        calibration,
        config,
        units,
        train,
        tstar,
        teacher_t,
        progress_record,
        curve,
        checkpoint,
        report,
    ):
        scope = config.scope
        order = list(reversed(units)) if config.rpq_order == "reverse" else list(units)
        done = list(progress_record.get("done_units", []))
        visited: list[UnitParts] = [u for u in order if u.name in done]
        for k, unit in enumerate(order):
            if unit.name in done:
                continue
            visited.append(unit)
            for other in units:
                set_unit_quantized(other, any(other is v for v in visited))
            params = unit_parameter_groups(visited)
            members = unit.loss_members

            def loss_fn(batch, members=members):
                total = 0.0
                if config.module_loss_weight > 0 and members:
                    target = teacher_module_outputs(model, batch, members, teacher_t, scope)
                    with capture_outputs(model, members) as captured:
                        out = student_forward(model, batch, tstar, scope)
                    total = total + config.module_loss_weight * relative_mse(
                        captured.tensors(), target
                    )
                else:
                    out = student_forward(model, batch, tstar, scope)
                if config.image_loss_weight > 0:
                    total = (
                        total
                        + config.image_loss_weight * (out["image"] - batch.image).pow(2).mean()
                    )
                return total

            batches = batch_schedule(
                train, config.batch_size, config.rpq_iters, config.data_seed + 104729 * (k + 1)
            )
            stage = f"qartsr RPQ {k + 1}/{len(order)}: {unit.name}"
            unit_curve = train_steps(
                model, params, config, batches, calibration, loss_fn, stage, report,
                lr_scale=config.rpq_lr_scale,
            )  # fmt: skip
            curve.extend(unit_curve)
            done.append(unit.name)
            progress_record["done_units"] = list(done)
            progress_record.setdefault("rpq_modules", []).append(
                {
                    "unit": unit.name,
                    "position": k,
                    "trained_units": [v.name for v in visited],
                    "loss_first": unit_curve[0] if unit_curve else None,
                    "loss_last": unit_curve[-1] if unit_curve else None,
                }
            )
            progress_record["curves"] = {**progress_record.get("curves", {}), "rpq": list(curve)}
            if checkpoint:
                save_checkpoint(checkpoint, model, progress_record)

    def _et(self, model, calibration, config, units, train, tstar, perceptual, report):
        scope = config.scope
        for unit in units:
            set_unit_quantized(unit, True)
        params = unit_parameter_groups(units)

        def loss_fn(batch):
            image = student_forward(model, batch, tstar, scope)["image"]
            total = config.mse_weight * (image - batch.image).pow(2).mean()
            if perceptual is not None and config.lpips_weight > 0:
                a01 = (image * 0.5 + 0.5).clamp(0, 1)
                b01 = (batch.image * 0.5 + 0.5).clamp(0, 1)
                total = total + config.lpips_weight * perceptual(a01, b01)
            return total

        batches = batch_schedule(
            train, config.batch_size, config.et_iters, config.data_seed + 15485863
        )
        return train_steps(
            model, params, config, batches, calibration, loss_fn, "qartsr ET", report
        )

    @torch.no_grad()
    def _bind_timestep(self, model, calibration, tstar, scope) -> None:
        guards = [m for _, m in model.named_modules() if isinstance(m, TimestepBoundLinear)]
        if not guards:
            return
        seen = []
        handles = [
            g.register_forward_pre_hook(lambda _m, i: seen.append(i[0][:1].detach().clone()))
            for g in guards
        ]
        for g in guards:
            g.unbind()
        try:
            z = calibration.z_l[:1].to(model.alphas_cumprod.device)
            model.predict_eps(z, tstar)
        finally:
            for handle in handles:
                handle.remove()
        for guard, value in zip(guards, seen, strict=False):
            guard.bind(tstar, value)


# ---------------------------------------------------------------------------- variants

register_variant(
    "qartsr-no-trq", base="qartsr", trq=False,
    description="QArtSR ablation: no timestep retraining (T* = 999)",
)  # fmt: skip
register_variant(
    "qartsr-no-rpq", base="qartsr", rpq=False,
    description="QArtSR ablation: no per-module stage (extended end-to-end training only)",
)  # fmt: skip
register_variant(
    "qartsr-forward-pq", base="qartsr", rpq_order="forward",
    description="QArtSR ablation: per-module quantization in forward order (input end first)",
)  # fmt: skip
register_variant(
    "qartsr-no-et", base="qartsr", et=False,
    description="QArtSR ablation: no extended end-to-end training",
)  # fmt: skip
register_variant(
    "qartsr-module-loss-only", base="qartsr", image_loss_weight=0.0,
    description="QArtSR ablation: RPQ with the module loss only",
)  # fmt: skip
register_variant(
    "qartsr-image-loss-only", base="qartsr", module_loss_weight=0.0,
    description="QArtSR ablation: RPQ with the image loss only",
)  # fmt: skip
register_variant(
    "qartsr-no-lowrank", base="qartsr", lowrank=False,
    description="QArtSR ablation: no 16-bit low-rank branch (smoothing + adapter + LBQ only)",
)  # fmt: skip
for _t in DEFAULT_TSTAR_GRID:
    register_variant(
        f"qartsr-t{_t}", base="qartsr", timestep=_t,
        description=f"QArtSR T* sweep: fixed retraining timestep T* = {_t} (no selection)",
    )  # fmt: skip

"""``passionsr``: PassionSR (Zhu et al., CVPR 2025, arXiv 2411.17106) — LBQ + LET + DQC.

Reference: the released code (methods.md §6; ``quantization/saw/*``) and the paper's overview figure.
Pieces: :mod:`harness.quant.lbq` (Learnable Boundary Quantizer: learnable x_min/x_max, Δ and z
recomputed every forward, STE rounding), :mod:`harness.quant.let` (Learnable Equivalent
Transformation: per-input-channel s and δ for conv/linear, s_qk and s_vw for attention), and here the
Distributed Quantization Calibration (DQC):

0. **Init pass** over the calibration set (batch ``init_batch_size`` = 4): LET scales
   s = max|X|^α/max|W|^α (α = 0.3, EMA 0.1 over batches), then quantizer ranges (weights
   per-output-channel min/max of W·s; activations and attention operands per tensor).
1. For each component in order **VAE encoder → UNet → VAE decoder** (only the UNet for scope ``U``):
   a **LET phase** (s, δ, s_qk, s_vw trained; boundaries frozen), then an **LBQ phase** (boundaries
   trained; LET frozen). Each component is trained on the outputs of the already-quantized upstream
   components (precomputed without gradients), batch ``train_batch_size`` = 1, Adam, MultiStepLR at
   epoch ``lr_milestone``.
2. Losses (MSE): encoder → FP latent z_L; UNet: LET phase on ε (ε_q vs ε_fp), LBQ phase on
   x0 (x0(z_q, ε_q) vs x0_fp) as the released UV code; decoder → the FP decoder's image (the paper's
   figure, ``decoder_target="fp"``) or → the HR crop (``"hr"``, the released code, quirk Q6).

Quirks of the released code (methods.md §6.7) and what ``faithful=True`` does (default False = fixed):

- Q1 linear LET sign (X + δ)/s with +Wδ: faithful reproduces it (buffer ``let_shift_sign``);
  fixed: (X − δ)/s, exact.
- Q2 conv/linear activation ranges from the *first init batch only* (attention EMA 0.95): faithful
  reproduces it in one init pass where each layer initializes s, its weight ranges and its input range
  on the first batch, and s keeps EMA-updating afterwards. Fixed: two passes — LET statistics on the
  FP model, then weight ranges from the final W·s and every activation/attention range as an EMA
  (momentum ``act_range_momentum`` = 0.95, the released attention rule) over the whole init pass
  with quantization on.
- Q3 token-axis split of 3-D linear inputs: a core switch (``linear_split_axis="token"`` with
  ``split_all_unet_inputs=True``, PassionSR's literal ``split: True``); the ``passionsr-faithful``
  variant sets both. Default: the core's skip-connection split at the true concat boundary.
- Q4 ``zero_grad`` once per epoch (gradients accumulate over the epoch): faithful reproduces it;
  fixed: ``zero_grad`` every step.
- Q5 scope-U LET phase re-initializes every range from the current sample at every step: faithful
  reproduces it (scope U only, as released); fixed: ranges stay frozen in LET phases (as in UV).
- Q6 decoder target: ``decoder_target`` ("fp" default; "hr" = released; the faithful variant sets it).
- Q7 posterior-sample noise: fixed — the quantized encoder's latent uses the same seeded noise as the
  FP teacher latent (``settings.seed`` per crop, exactly what inference draws), so the encoder loss
  measures the quantization error only; faithful — fresh noise from one seeded global stream each step.
- Q8 s_vw length: per-key-token s_vw only for the fixed-length (77-token) cross-attention; none for
  self-attention, whose probabilities are instead quantized in units of 1/N_k so one range serves
  every tile size (:mod:`harness.quant.let`).

Hyper-parameters: ``profile="paper"`` = released configs (lr 1e-5 for LET and LBQ, 2 epochs per
phase, batch 1, MultiStepLR milestone 1, γ 0.2 for the UNet in UV and 0.1 in U, no scheduler for the
VAE parts). ``profile="tiny"`` = the CPU budget of the embedded tiny model (docs/passionsr.md §5):
64 crops instead of 500 (the demo matrices; 16 when these rates were tuned), so 128 instead of 1,000
optimizer steps per phase; LET lr 1e-3; the LBQ step
is measured in range widths (``boundary_step="relative"``: each Adam update of a boundary is scaled
by its quantizer's range width at the start of the phase, lr 0.0033 = 1/300 of the width per step,
≈ 0.05 of a 4-bit quantization step), because one absolute lr cannot suit weight ranges (~0.1) and
activation ranges (~10) at once within a few dozen steps. ``profile="auto"`` (default) picks ``tiny`` for the
embedded ``tiny`` model and ``paper`` otherwise; the resolved values are recorded. Explicit ``lr``
(both phases), ``let_lr``, ``lbq_lr``, ``epochs`` and ``boundary_step`` override the profile.

Other [RECON] choices: the shuffling order is one seeded permutation (``seed`` 42, as
``seed_everything(42)``) reused by every phase; LBQ boundaries are kept ordered
(:meth:`~harness.quant.lbq.LearnableBoundaryQuantizer.enforce_order_`, inactive unless they cross);
biases are fake-quantized per tensor at the weight bits with a learnable-boundary quantizer
(PassionSR quantizes biases with a weight-config quantizer), trained in the LBQ phase.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError, DivergedError
from harness.quant.api import MethodConfig, QuantMethod, component_of
from harness.quant.calibration import encode_per_sample, pipeline_forward
from harness.quant.lbq import convert_to_lbq, enforce_lbq_order, iter_lbq, lbq_parameters
from harness.quant.let import (
    LETAttentionQuantizers,
    LETLayerMixin,
    LETQuantLinear,
    let_layer_for,
    let_parameters,
    set_let_observing,
)
from harness.quant.quantizer import EmaMinMaxObserver, MinMaxObserver, observed_min_max
from harness.quant.state import (
    attach_observers,
    detach_observers,
    iter_attention_quantizers,
    iter_quant_layers,
    set_quant_state,
)
from harness.registry import register_method, register_variant

PROFILES: dict[str, dict] = {
    # released configs (methods.md §6.6)
    "paper": {"let_lr": 1e-5, "lbq_lr": 1e-5, "epochs": 2, "boundary_step": "absolute"},
    # embedded tiny model on a 2-core CPU (docs/passionsr.md, "tiny budget")
    "tiny": {"let_lr": 1e-3, "lbq_lr": 0.0033, "epochs": 2, "boundary_step": "relative"},
}
PROFILE_CHOICES = ("auto", "paper", "tiny")
DECODER_TARGETS = ("fp", "hr")
BOUNDARY_STEPS = ("absolute", "relative")
COMPONENT_ORDER = ("vae.encoder", "unet", "vae.decoder")


@dataclass(frozen=True)
class PassionSRConfig(MethodConfig):
    """PassionSR fields on top of :class:`MethodConfig` (module docstring)."""

    method: str = "passionsr"
    quantize_bias: bool = True
    profile: str = "auto"
    lr: float | None = None
    let_lr: float | None = None
    lbq_lr: float | None = None
    epochs: int | None = None
    train_batch_size: int = 1
    init_batch_size: int = 4
    lr_milestone: int = 1
    unet_lr_gamma: float | None = None
    vae_lr_gamma: float = 1.0
    let_alpha: float = 0.3
    let_momentum: float = 0.1
    act_range_momentum: float = 0.95
    decoder_target: str = "fp"
    train_let: bool = True
    train_lbq: bool = True
    faithful: bool = False
    seed: int = 42
    max_train_samples: int | None = None
    boundary_step: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.profile not in PROFILE_CHOICES:
            raise ConfigError(f"profile must be one of {PROFILE_CHOICES}, got {self.profile!r}")
        for name in ("lr", "let_lr", "lbq_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("train_batch_size", "init_batch_size", "lr_milestone"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("unet_lr_gamma", "vae_lr_gamma"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if not self.let_alpha > 0:
            raise ConfigError(f"let_alpha must be > 0, got {self.let_alpha}")
        if not 0 < self.let_momentum <= 1:
            raise ConfigError(f"let_momentum must be in (0, 1], got {self.let_momentum}")
        if not 0 <= self.act_range_momentum < 1:
            raise ConfigError(
                f"act_range_momentum must be in [0, 1), got {self.act_range_momentum}"
            )
        if self.decoder_target not in DECODER_TARGETS:
            raise ConfigError(
                f"decoder_target must be one of {DECODER_TARGETS}, got {self.decoder_target!r}"
            )
        if self.boundary_step is not None and self.boundary_step not in BOUNDARY_STEPS:
            raise ConfigError(
                f"boundary_step must be one of {BOUNDARY_STEPS}, got {self.boundary_step!r}"
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1, got {self.max_train_samples}")


@dataclass(frozen=True)
class Schedule:
    """Resolved optimisation settings of one run (recorded)."""

    profile: str
    let_lr: float
    lbq_lr: float
    epochs: int
    unet_gamma: float
    vae_gamma: float
    boundary_step: str

    def lr(self, phase: str) -> float:
        return self.let_lr if phase == "LET" else self.lbq_lr

    def gamma(self, component: str) -> float:
        return self.unet_gamma if component == "unet" else self.vae_gamma


def resolve_schedule(config: PassionSRConfig, base_model: str | None) -> Schedule:
    """Profile → lr/epochs/γ (explicit fields win). ``auto`` = ``tiny`` for the embedded tiny model."""
    profile = config.profile
    if profile == "auto":
        profile = "tiny" if base_model == "tiny" else "paper"
    values = PROFILES[profile]
    unet_gamma = config.unet_lr_gamma
    if unet_gamma is None:
        unet_gamma = 0.2 if config.scope == "UV" else 0.1
    let_lr = next(v for v in (config.let_lr, config.lr, values["let_lr"]) if v is not None)
    lbq_lr = next(v for v in (config.lbq_lr, config.lr, values["lbq_lr"]) if v is not None)
    return Schedule(
        profile=profile,
        let_lr=let_lr,
        lbq_lr=lbq_lr,
        epochs=config.epochs if config.epochs is not None else values["epochs"],
        unet_gamma=unet_gamma,
        vae_gamma=config.vae_lr_gamma,
        boundary_step=config.boundary_step or values["boundary_step"],
    )


# --------------------------------------------------------------------------- component views


def component_modules(model: nn.Module, component: str) -> list[nn.Module]:
    """The quant layers and attention quantizers of one component (``unet``, ``vae.encoder``, …)."""
    mods: list[nn.Module] = [
        layer for name, layer in iter_quant_layers(model) if component_of(name) == component
    ]
    mods += [q for name, q in iter_attention_quantizers(model) if component_of(name) == component]
    return mods


def _params(modules: list[nn.Module], kind: str) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        found = let_parameters(module) if kind == "LET" else lbq_parameters(module)
        for p in found:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _boundary_step_scales(modules: list[nn.Module]) -> dict[int, torch.Tensor]:
    """``{id(boundary): w0}``: each LBQ's range width x_max − x_min at the start of the phase (per
    element of its range), for ``boundary_step="relative"``."""
    scales: dict[int, torch.Tensor] = {}
    for module in modules:
        for quantizer in iter_lbq(module):
            width = (quantizer.x_max - quantizer.x_min).detach().clamp(min=1e-8)
            for p in quantizer.boundaries():
                scales[id(p)] = width
    return scales


@torch.no_grad()
def _rescale_updates(
    params: list[nn.Parameter], previous: list[torch.Tensor], scales: dict[int, torch.Tensor]
) -> None:
    """p ← p_prev + (p − p_prev)·w0: the Adam step measured in range widths, not in units."""
    for p, prev in zip(params, previous, strict=True):
        scale = scales.get(id(p))
        if scale is not None:
            p.copy_(prev + (p - prev) * scale)


def _set_minmax(quantizer, tensor) -> None:
    quantizer.set_range(*observed_min_max(tensor, quantizer.spec))


def _finite_or_raise(value: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise DivergedError(f"passionsr: non-finite {where}")


# --------------------------------------------------------------------------- the method


@register_method(
    "passionsr",
    config_cls=PassionSRConfig,
    description="PassionSR: learnable boundaries + learnable equivalent transform, DQC",
)
class PassionSR(QuantMethod):
    """PassionSR's LBQ + LET layers and the DQC calibration (module docstring)."""

    def make_layer(self, module: nn.Module, target):
        layer = let_layer_for(module, target.layer)
        convert_to_lbq(layer)
        return layer

    def make_attention_quantizers(self, attn: nn.Module, target):
        quantizers = LETAttentionQuantizers.for_attention(attn, target.attention)
        convert_to_lbq(quantizers)
        return quantizers

    # ------------------------------------------------------------------ calibrate
    def calibrate(self, qmodel, calibration, config: PassionSRConfig, progress=None) -> dict:
        runner = _DQC(qmodel, calibration, config, progress)
        return runner.run()


class _DQC:
    """One run of Distributed Quantization Calibration (state shared by the phases)."""

    def __init__(self, qmodel, calibration, config: PassionSRConfig, progress):
        self.qmodel = qmodel
        self.model = qmodel.model
        self.calibration = calibration
        self.config = config
        self.progress: Callable[[str, int, int], None] | None = progress
        self.schedule = resolve_schedule(config, getattr(qmodel, "base_model", None))
        self.device = self.model.alphas_cumprod.device
        self.components = list(COMPONENT_ORDER) if config.scope == "UV" else ["unet"]
        n = len(calibration)
        if config.max_train_samples is not None:
            n = min(n, config.max_train_samples)
        order = torch.randperm(
            len(calibration), generator=torch.Generator().manual_seed(config.seed)
        )
        self.train_order = order[:n].tolist()
        self.noise_stream = torch.Generator().manual_seed(config.seed)  # faithful Q7 only
        self.curves: dict[str, list[float]] = {}
        self.phases: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def _init_batches(self):
        return self.calibration.batches(self.config.init_batch_size, device=self.device)

    def _run_init_forward(self, batch) -> None:
        if self.config.scope == "UV":
            out = pipeline_forward(self.model, batch.x)["image"]
        else:
            out = self.model.predict_eps(batch.z_l)
        _finite_or_raise(out, "output during the init pass")

    # ------------------------------------------------------------------ init pass
    def init_pass(self) -> dict:
        cfg = self.config
        model = self.model
        let_layers = [m for m in model.modules() if isinstance(m, LETLayerMixin)]
        for layer in let_layers:
            if isinstance(layer, LETQuantLinear):
                layer.set_faithful_linear_sign(cfg.faithful)  # Q1
        total = self.calibration.num_batches(cfg.init_batch_size)
        start = time.perf_counter()
        with torch.no_grad():
            if cfg.faithful:
                self._faithful_init(total)
            else:
                self._clean_init(total)
        return {
            "mode": "faithful (first-batch ranges, Q2)" if cfg.faithful else "two-pass (fixed Q2)",
            "batches": total,
            "seconds": time.perf_counter() - start,
        }

    def _clean_init(self, total: int) -> None:
        cfg, model = self.config, self.model
        # pass A: LET statistics on the FP model
        set_quant_state(model, False, False)
        set_let_observing(model, True, cfg.let_alpha, cfg.let_momentum)
        for k, batch in enumerate(self._init_batches()):
            self._run_init_forward(batch)
            self.report("passionsr init: LET statistics", k + 1, total)
        set_let_observing(model, False, cfg.let_alpha, cfg.let_momentum)
        # weight ranges from the final W·s
        for _, layer in iter_quant_layers(model):
            layer.init_weight_ranges(_set_minmax)
        # pass B: activation/attention ranges, EMA over the pass, quantization on
        set_quant_state(model, True, True)
        attach_observers(model, lambda *_: EmaMinMaxObserver(cfg.act_range_momentum))
        try:
            for k, batch in enumerate(self._init_batches()):
                self._run_init_forward(batch)
                self.report("passionsr init: activation ranges", k + 1, total)
        finally:
            detach_observers(model)

    def _faithful_init(self, total: int) -> None:
        cfg, model = self.config, self.model
        set_quant_state(model, True, True)
        set_let_observing(model, True, cfg.let_alpha, cfg.let_momentum)
        # first batch: every layer sets s, then its weight and input ranges, in forward order
        attach_observers(
            model, lambda *_: MinMaxObserver(running=False), kinds=("weight", "bias", "act")
        )
        attach_observers(model, lambda *_: EmaMinMaxObserver(cfg.act_range_momentum), ("attn",))
        try:
            for k, batch in enumerate(self._init_batches()):
                self._run_init_forward(batch)
                if k == 0:  # conv/linear ranges stay those of the first batch (Q2)
                    for _, layer in iter_quant_layers(model):
                        for quantizer in layer.quantizers().values():
                            quantizer.observer = None
                self.report("passionsr init (faithful)", k + 1, total)
        finally:
            detach_observers(model)
            set_let_observing(model, False, cfg.let_alpha, cfg.let_momentum)

    # ------------------------------------------------------------------ component forward
    def _forward(self, component: str, phase: str, idx: list[int], inputs) -> torch.Tensor:
        """Loss of ``component`` on crops ``idx`` (``inputs``: upstream outputs or None)."""
        cfg, model = self.config, self.model
        batch = self.calibration.batch(idx, device=self.device)
        if component == "vae.encoder":
            if cfg.faithful:  # Q7: fresh posterior noise from one global stream
                moments = model.encode_moments(batch.x)
                mean, logvar = moments.chunk(2, dim=1)
                if model.settings.sample_posterior:
                    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
                    noise = torch.randn(mean.shape, generator=self.noise_stream).to(mean.device)
                    mean = mean + std * noise
                z = mean * model.scaling_factor
            else:
                z = encode_per_sample(model, batch.x)
            return F.mse_loss(z, batch.z_l)
        if component == "unet":
            z_in = batch.z_l if inputs is None else inputs[idx].to(self.device)
            eps = model.predict_eps(z_in)
            if phase == "LET":
                return F.mse_loss(eps, batch.eps)
            return F.mse_loss(model.x0_from_eps(z_in, eps), batch.z_h)
        z_h = inputs[idx].to(self.device)
        image = model.decode(z_h)
        if cfg.decoder_target == "hr":
            return F.mse_loss(image * 0.5 + 0.5, batch.hr)
        return F.mse_loss(image, batch.image)

    @torch.no_grad()
    def _component_outputs(self, component: str, inputs) -> torch.Tensor:
        """Quantized outputs of ``component`` for every crop (the next component's inputs)."""
        model = self.model
        outs = []
        bs = self.config.init_batch_size
        for start in range(0, len(self.calibration), bs):
            idx = list(range(start, min(start + bs, len(self.calibration))))
            batch = self.calibration.batch(idx, device=self.device)
            if component == "vae.encoder":
                out = encode_per_sample(model, batch.x)
            else:
                z_in = batch.z_l if inputs is None else inputs[idx].to(self.device)
                out = model.x0_from_eps(z_in, model.predict_eps(z_in))
            _finite_or_raise(out, f"{component} output")
            outs.append(out.cpu())
        return torch.cat(outs)

    # ------------------------------------------------------------------ one phase
    def train_phase(self, component: str, phase: str, inputs) -> dict:
        cfg, sched = self.config, self.schedule
        modules = component_modules(self.model, component)
        params = _params(modules, phase)
        key = f"{component}/{phase}"
        if not params:
            return {"component": component, "phase": phase, "params": 0, "skipped": "no params"}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        before = [p.detach().clone() for p in params]
        step_scales = (
            _boundary_step_scales(modules) if phase == "LBQ" and sched.boundary_step == "relative"
            else {}
        )  # fmt: skip
        optimizer = torch.optim.Adam(params, lr=sched.lr(phase))
        gamma = sched.gamma(component)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[cfg.lr_milestone], gamma=gamma
        )
        dynamic_ranges = cfg.faithful and cfg.scope == "U" and phase == "LET"  # Q5
        if dynamic_ranges:
            attach_observers(
                self.model,
                lambda *_: MinMaxObserver(running=False),
                kinds=("weight", "bias", "act", "attn"),
            )
        bs = cfg.train_batch_size
        steps_per_epoch = math.ceil(len(self.train_order) / bs)
        total = steps_per_epoch * sched.epochs
        every = max(1, total // 100)
        losses: list[float] = []
        epoch_means: list[float] = []
        lrs: list[float] = []
        repaired = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        self.model.eval()
        try:
            done = 0
            for epoch in range(sched.epochs):
                lrs.append(optimizer.param_groups[0]["lr"])
                if cfg.faithful:
                    optimizer.zero_grad(set_to_none=True)  # Q4: once per epoch
                epoch_losses = []
                for s in range(steps_per_epoch):
                    idx = self.train_order[s * bs : (s + 1) * bs]
                    if not cfg.faithful:
                        optimizer.zero_grad(set_to_none=True)
                    loss = self._forward(component, phase, idx, inputs)
                    if not bool(torch.isfinite(loss)):
                        raise DivergedError(
                            f"passionsr: non-finite loss in {component} {phase} phase, epoch "
                            f"{epoch + 1}, step {s + 1} (crops {idx})"
                        )
                    loss.backward()
                    if step_scales:
                        previous = [p.detach().clone() for p in params]
                    optimizer.step()
                    if step_scales:
                        _rescale_updates(params, previous, step_scales)
                    if phase == "LBQ":
                        repaired += enforce_lbq_order(self.model)
                    value = float(loss.detach())
                    losses.append(value)
                    epoch_losses.append(value)
                    done += 1
                    if done % every == 0 or s == steps_per_epoch - 1:
                        self.report(
                            f"passionsr {component} {phase} epoch {epoch + 1}/{sched.epochs} "
                            f"loss {value:.4g}",
                            done,
                            total,
                        )
                scheduler.step()
                epoch_means.append(sum(epoch_losses) / len(epoch_losses))
        finally:
            if dynamic_ranges:
                detach_observers(self.model)
            for p in params:
                p.requires_grad_(False)
        for p in params:
            _finite_or_raise(p.detach(), f"{phase} parameter after {component} training")
        change = sum(
            float((p.detach() - b).abs().sum()) for p, b in zip(params, before, strict=True)
        )
        numel = sum(p.numel() for p in params)
        self.curves[key] = losses
        return {
            "component": component,
            "phase": phase,
            "params": numel,
            "tensors": len(params),
            "epochs": sched.epochs,
            "steps": len(losses),
            "lr_per_epoch": lrs,
            "gamma": gamma,
            "epoch_mean_loss": epoch_means,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_abs_param_change": change / max(1, numel),
            "boundary_order_repairs": repaired,
            "dynamic_ranges_q5": dynamic_ranges,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
        }

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        cfg, model = self.config, self.model
        t0, cpu0 = time.perf_counter(), time.process_time()
        for p in model.parameters():
            p.requires_grad_(False)
        init = self.init_pass()
        set_quant_state(model, True, True)
        inputs = None  # upstream outputs for the current component (None: FP teacher z_L)
        for component in self.components:
            if cfg.train_let:
                self.phases.append(self.train_phase(component, "LET", inputs))
            if cfg.train_lbq:
                self.phases.append(self.train_phase(component, "LBQ", inputs))
            if component != self.components[-1]:
                inputs = self._component_outputs(component, inputs)
        model.eval()
        set_quant_state(model, True, True)
        return {
            "algorithm": "PassionSR DQC: init pass, then per component LET phase, LBQ phase",
            "components": self.components,
            "schedule": {
                "profile": self.schedule.profile,
                "let_lr": self.schedule.let_lr,
                "lbq_lr": self.schedule.lbq_lr,
                "boundary_step": self.schedule.boundary_step,
                "epochs_per_phase": self.schedule.epochs,
                "lr_milestone": cfg.lr_milestone,
                "unet_gamma": self.schedule.unet_gamma,
                "vae_gamma": self.schedule.vae_gamma,
                "train_batch_size": cfg.train_batch_size,
                "init_batch_size": cfg.init_batch_size,
                "optimizer": "Adam (default betas)",
            },
            "faithful": cfg.faithful,
            "decoder_target": cfg.decoder_target,
            "train_samples": len(self.train_order),
            "calibration_crops": len(self.calibration),
            "init": init,
            "phases": self.phases,
            "curves": {k: list(v) for k, v in self.curves.items()},
            "lbq_quantizers": sum(1 for _ in iter_lbq(model)),
            "let_parameters": sum(p.numel() for p in let_parameters(model)),
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
        }


register_variant(
    "passionsr-faithful",
    base="passionsr",
    description="PassionSR with the released code's quirks Q1-Q7 (split C//2, token split, HR target)",
    faithful=True,
    split_all_unet_inputs=True,
    linear_split_axis="token",
    decoder_target="hr",
)

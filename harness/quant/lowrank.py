"""QArtSR's quantized layer: a 16-bit low-rank branch plus a smoothed low-bit residual with a merged
fine-tuning adapter.

Reference: Zhu et al., "QArtSR" (arXiv 2503.05584), figure "Quantizer Design" (methods.md §7.3); its
ancestors SVDQuant (Li et al., ICLR 2025: smoothing + 16-bit low-rank branch + low-bit residual),
SmoothQuant (per-channel smoothing) and EfficientDM (a LoRA merged into the weight before
quantization). QArtSR's code is not released; every choice below marked [RECON] is documented in
``docs/qartsr.md``.

Training-time form (the figure's "Simulation")::

    Y = L1·L2·X  +  Q_A(φ ⊙ X) · Q_W((W − L1·L2 + F1·F2) ⊘ φ)  (+ b)

- ``φ`` (``log_smooth`` = log φ, one per input channel): the smoothing factor. Stored as a logarithm
  so that it stays positive whatever the optimizer does (a reparameterisation of the same trainable φ).
- ``L1`` (``lowrank_up``, [O, r]) and ``L2`` (``lowrank_down``, [r, I] or [r, I, kh, kw]): the
  low-rank branch, evaluated in 16 bit (``lowrank_precision``: both factors are rounded to fp16 with a
  straight-through gradient, in training and at inference, so the simulation is what would be
  deployed). For a convolution the branch is a kh×kw convolution to r channels (L2, with the layer's
  stride/padding/dilation) followed by a 1×1 convolution (L1), i.e. a rank-r factorisation of W viewed
  as [O, I·kh·kw].
- ``F1`` (``finetune_up``, [O, r_f]) and ``F2`` (``finetune_down``, shaped like L2 with r_f rows): the
  fine-tuning adapter added to the quantized residual; F2 = 0 at initialisation, F1 Kaiming-uniform
  (a LoRA's usual init with the roles of the factors as in the figure: the input-side factor is zero).
- ``W`` and ``b`` are the float module's own Parameters (frozen by the method); the weight and
  activation quantizers are PassionSR's Learnable Boundary Quantizers (:mod:`harness.quant.lbq`):
  their learnable ``x_min``/``x_max`` set the step, which is how QArtSR's "learnable quantizer steps"
  are realised here (the issue asks to reuse PassionSR's learnable quantizer).

The layer subclasses the core :class:`~harness.quant.layers.QuantConv2d`/``QuantLinear`` through its
hooks: ``transform_input`` = φ ⊙ X, ``effective_weight`` = (W − L1L2 + F1F2) ⊘ φ, ``extra_output`` =
the 16-bit branch on the original input. Split inputs (Q-Diffusion's shortcut split) work unchanged:
the quantizers see the smoothed halves. ``set_fp(True)`` makes the layer compute exactly the float
module (``F.conv2d(x, W, b)``): the "full precision" state of RPQ's not-yet-quantized modules and of
the FP teacher.

Initialisation (pure functions, called by the method): :func:`init_smoothing` sets
φ_j = max|W_{:,j}|^(1−α) / max|X_j|^α (SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α) with φ = 1/s,
because the figure multiplies X by φ and divides W by φ); :func:`init_lowrank` sets L1L2 from a
truncated SVD of the smoothed weight W ⊘ φ (SVDQuant's choice, ``svd_source="smoothed"``) or of W
(``"raw"``), with the singular values split evenly (L1 = U√S, L2 = √S Vᵀ, then L2 ← L2 ⊙ φ for the
smoothed source so that L1L2 lives in W's space as in the figure).

Inference (:func:`merge_for_inference`): F1F2 is folded into the stored residual R = (W − L1L2 + F1F2)
⊘ φ (quantized by the same weight quantizer) and φ is kept as a per-input-channel scale of the
activation quantizer's input (an integer kernel folds it into the quantize step); the branch keeps
its 16-bit factors. The merged layer computes bit-identical outputs to the training form.

Size and BOPs (:func:`lowrank_size_report`, :func:`lowrank_bops_report`) extend the core reports
honestly: the branch factors and φ are counted at 16 bit (not as free), F1F2 at zero (merged), the
float baseline excludes the added tensors, and the branch's MACs are counted at 16×16 bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError, ModelError
from harness.quant.layers import LayerQuantSpec, QuantConv2d, QuantLayer, QuantLinear
from harness.quant.lbq import convert_to_lbq

LOWRANK_PRECISIONS = ("fp16", "bf16", "fp32")
SVD_SOURCES = ("smoothed", "raw")
MIN_SMOOTH = 1e-5
MAX_SMOOTH = 1e5
LOWRANK_STORAGE_BITS = 16
SMOOTH_STORAGE_BITS = 16
TIME_EMBEDDING_LAYER = "unet.time_embedding.linear_1"


def round_to_precision(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t`` rounded to fp16/bf16 (values, kept in t's dtype) with a straight-through gradient."""
    if precision == "fp32":
        return t
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def lowrank_ranks(
    weight_shape: tuple[int, ...],
    rank: int,
    rank_fraction: float,
    finetune_rank: int,
    lowrank: bool = True,
) -> tuple[int, int]:
    """(r, r_f) for a weight of ``weight_shape`` ([O, I] or [O, I, kh, kw]) [RECON].

    r = min(rank, max(1, round(rank_fraction · min(O, I·kh·kw)))) (0 without the branch): SVDQuant's
    rank 32 applies to SD layers of width ≥ 320 (fraction 0.1 of 320 = 32), and the fraction keeps the
    branch from becoming full rank on narrow layers (a tiny model's 32-channel convs), where it would
    simply keep the layer in 16 bit. r_f = min(finetune_rank, min(O, I·kh·kw)).
    """
    out_dim = weight_shape[0]
    in_dim = math.prod(weight_shape[1:])
    smallest = min(out_dim, in_dim)
    r = min(rank, max(1, round(rank_fraction * smallest))) if lowrank and rank > 0 else 0
    r_f = min(finetune_rank, smallest) if finetune_rank > 0 else 0
    return r, r_f


class LowRankQuantMixin:
    """Shared state and hooks of :class:`LowRankQuantConv2d` and :class:`LowRankQuantLinear`."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _setup_lowrank(self, rank: int, finetune_rank: int, precision: str, seed: int) -> None:
        if precision not in LOWRANK_PRECISIONS:
            raise ConfigError(
                f"lowrank_precision must be one of {LOWRANK_PRECISIONS}, got {precision!r}"
            )
        weight = self.weight
        out_dim, in_dim = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        self.lowrank_precision = precision
        self.rank = int(rank)
        self.finetune_rank = int(finetune_rank)
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.log_smooth = nn.Parameter(torch.zeros(in_dim, **factory))
        if self.rank > 0:
            self.lowrank_up = nn.Parameter(torch.zeros(out_dim, self.rank, **factory))
            self.lowrank_down = nn.Parameter(torch.zeros(self.rank, in_dim, *kernel, **factory))
        else:
            self.lowrank_up = None
            self.lowrank_down = None
        if self.finetune_rank > 0:
            # F1 is random (F2 = 0 keeps F1F2 = 0 at the start) and drawn from its own generator:
            # torch's global generator starts from a different seed in every process, and an F1
            # drawn from it made two identical `qbench quantize` runs end ±0.1 dB apart.
            up = torch.empty(out_dim, self.finetune_rank, dtype=weight.dtype)
            generator = torch.Generator().manual_seed(seed)
            nn.init.kaiming_uniform_(up, a=math.sqrt(5), generator=generator)
            self.finetune_up = nn.Parameter(up.to(weight.device))
            self.finetune_down = nn.Parameter(
                torch.zeros(self.finetune_rank, in_dim, *kernel, **factory)
            )
        else:
            self.finetune_up = None
            self.finetune_down = None
        self.fp_mode = False

    # ------------------------------------------------------------------ pieces
    def smooth(self) -> torch.Tensor:
        """φ (positive, one per input channel)."""
        return torch.exp(self.log_smooth).clamp(MIN_SMOOTH, MAX_SMOOTH)

    def _weight_view(self, per_in: torch.Tensor) -> torch.Tensor:
        """A per-input-channel vector shaped to broadcast against the weight."""
        shape = [1, -1] + [1] * (self.weight.dim() - 2)
        return per_in.reshape(shape)

    def _input_view(self, per_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-input-channel vector shaped to broadcast against an input ``x``."""
        axis = self._input_channel_axis(x)
        shape = [1] * x.dim()
        shape[axis] = -1
        return per_in.reshape(shape)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L1, L2) as the 16-bit branch uses them (rounded to ``lowrank_precision``)."""
        if self.lowrank_up is None:
            return None
        return (
            round_to_precision(self.lowrank_up, self.lowrank_precision),
            round_to_precision(self.lowrank_down, self.lowrank_precision),
        )

    @staticmethod
    def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return (up @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])

    def lowrank_weight(self) -> torch.Tensor | None:
        """L1·L2 in W's shape (with the 16-bit rounded factors), or None without a branch."""
        factors = self.lowrank_factors()
        return None if factors is None else self._product(*factors)

    def finetune_weight(self) -> torch.Tensor | None:
        """F1·F2 in W's shape, or None without an adapter."""
        if self.finetune_up is None:
            return None
        return self._product(self.finetune_up, self.finetune_down)

    def residual_weight(self) -> torch.Tensor:
        """(W − L1L2 + F1F2) ⊘ φ: what the weight quantizer sees."""
        weight = self.weight
        lowrank = self.lowrank_weight()
        if lowrank is not None:
            weight = weight - lowrank
        finetune = self.finetune_weight()
        if finetune is not None:
            weight = weight + finetune
        return weight / self._weight_view(self.smooth())

    def branch(self, x: torch.Tensor, factors=None) -> torch.Tensor | None:
        """The 16-bit low-rank branch L1·L2·X (conv: kh×kw conv to r channels, then 1×1 conv)."""
        factors = self.lowrank_factors() if factors is None else factors
        if factors is None:
            return None
        up, down = factors
        if isinstance(self, QuantConv2d):
            hidden = self._op(x, down, None)
            return F.conv2d(hidden, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    # ------------------------------------------------------------------ hooks
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._input_view(self.smooth(), x)

    def effective_weight(self) -> torch.Tensor:
        return self.residual_weight()

    def extra_output(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.branch(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp_mode:
            return self._op(x, self.weight, self.bias)
        return super().forward(x)

    # ------------------------------------------------------------------ switches / groups
    def set_fp(self, fp: bool) -> None:
        """Compute exactly the float module (``True``) or the QArtSR form (``False``)."""
        self.fp_mode = bool(fp)

    def finetune_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trainable QArtSR parameters by group: ``lowrank`` (L1, L2), ``finetune`` (F1, F2),
        ``smooth`` (log φ) and ``quant`` (the LBQ boundaries of this layer's quantizers)."""
        groups: dict[str, list[nn.Parameter]] = {"lowrank": [], "finetune": [], "smooth": []}
        if self.lowrank_up is not None:
            groups["lowrank"] = [self.lowrank_up, self.lowrank_down]
        if self.finetune_up is not None:
            groups["finetune"] = [self.finetune_up, self.finetune_down]
        groups["smooth"] = [self.log_smooth]
        groups["quant"] = [
            p
            for q in self.quantizers().values()
            for p in (q.x_min, q.x_max)
            if isinstance(p, nn.Parameter)
        ]
        return groups

    def added_tensors(self) -> list[torch.Tensor]:
        """Tensors this layer adds to the float module (for the size report)."""
        out = [self.log_smooth]
        for t in (self.lowrank_up, self.lowrank_down, self.finetune_up, self.finetune_down):
            if t is not None:
                out.append(t)
        return out

    def deployed_extra_elements(self) -> int:
        """Elements stored in 16 bit at inference: L1, L2 and φ (F1F2 is merged: 0)."""
        n = self.log_smooth.numel()
        if self.lowrank_up is not None:
            n += self.lowrank_up.numel() + self.lowrank_down.numel()
        return n

    def branch_macs(self, output: torch.Tensor) -> int:
        """MACs of the low-rank branch for one forward producing ``output``."""
        if self.lowrank_up is None:
            return 0
        per_position_in = math.prod(self.lowrank_down.shape[1:])
        out_dim = self.lowrank_up.shape[0]
        positions = output.numel() // out_dim
        return positions * self.rank * (per_position_in + out_dim)

    def lowrank_extra_repr(self) -> str:
        return f"rank={self.rank}, finetune_rank={self.finetune_rank}, fp_mode={self.fp_mode}"


def _check_groups(module: nn.Module) -> None:
    if getattr(module, "groups", 1) != 1:
        raise ConfigError(
            "QArtSR's low-rank quantized layer supports only convolutions with groups=1 "
            f"(got groups={module.groups}); exclude this layer from the QArtSR targets"
        )


class LowRankQuantConv2d(LowRankQuantMixin, QuantConv2d):
    """QArtSR's quantized ``nn.Conv2d`` (module docstring)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        spec: LayerQuantSpec,
        rank: int,
        finetune_rank: int,
        lowrank_precision: str = "fp16",
        seed: int = 0,
    ):
        _check_groups(conv)
        super().__init__(conv, spec)
        self._setup_lowrank(rank, finetune_rank, lowrank_precision, seed)
        convert_to_lbq(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.lowrank_extra_repr()}"


class LowRankQuantLinear(LowRankQuantMixin, QuantLinear):
    """QArtSR's quantized ``nn.Linear`` (module docstring)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: LayerQuantSpec,
        rank: int,
        finetune_rank: int,
        lowrank_precision: str = "fp16",
        seed: int = 0,
    ):
        super().__init__(linear, spec)
        self._setup_lowrank(rank, finetune_rank, lowrank_precision, seed)
        convert_to_lbq(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.lowrank_extra_repr()}"


class TimestepBoundLinear(LowRankQuantLinear):
    """:class:`LowRankQuantLinear` for the UNet's ``time_embedding.linear_1`` that also records the
    timestep embedding the model was calibrated at (TRQ's T*).

    Its input is the sinusoidal projection of the timestep, so after :meth:`bind` it can tell whether
    the model runs at T*: a forward at another timestep raises :class:`ModelError` instead of silently
    producing outputs with parameters retrained for T* (for example when a saved model is loaded and
    ``settings.timestep`` was not set back to T*; see :func:`methods.qartsr.apply_retrain_timestep`).
    ``bound_timestep`` = −1 means unbound (during calibration).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("bound_timestep", torch.full((), -1, dtype=torch.long))
        self.register_buffer("bound_input", torch.zeros(self.in_features))

    @torch.no_grad()
    def bind(self, timestep: int, time_input: torch.Tensor) -> None:
        """Record T* and the (1-D) time projection the layer sees at T*."""
        self.bound_timestep.fill_(int(timestep))
        self.bound_input.copy_(time_input.reshape(-1)[: self.in_features])

    def unbind(self) -> None:
        self.bound_timestep.fill_(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.bound_timestep) >= 0 and not self.fp_mode:
            rows = x.detach().reshape(-1, x.shape[-1])
            expected = self.bound_input.to(rows.dtype)
            if not torch.allclose(rows, expected.expand_as(rows), atol=1e-4, rtol=1e-4):
                raise ModelError(
                    "this QArtSR model was retrained at timestep T*="
                    f"{int(self.bound_timestep)} (TRQ) but the UNet is being run at another "
                    "timestep; set model.settings.timestep to T* "
                    "(methods.qartsr.apply_retrain_timestep(qmodel) does it)"
                )
        return super().forward(x)


LOWRANK_LAYER_TYPES = (LowRankQuantConv2d, LowRankQuantLinear)


def layer_seed(name: str, seed: int) -> int:
    """A 63-bit seed from a layer name and a run seed, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_lowrank_layer(
    module: nn.Module,
    spec: LayerQuantSpec,
    *,
    rank: int,
    rank_fraction: float,
    finetune_rank: int,
    lowrank: bool = True,
    lowrank_precision: str = "fp16",
    name: str = "",
    seed: int = 0,
) -> LowRankQuantMixin:
    """The QArtSR replacement of an ``nn.Conv2d``/``nn.Linear`` (ranks by :func:`lowrank_ranks`).

    The adapter's random F1 is drawn from a generator seeded by :func:`layer_seed` (``seed`` and the
    layer's ``name``): the same model, config and seed give the same layers in every process.
    """
    r, r_f = lowrank_ranks(
        tuple(module.weight.shape), rank, rank_fraction, finetune_rank, lowrank=lowrank
    )
    init_seed = layer_seed(name, seed)
    if type(module) is nn.Conv2d:
        return LowRankQuantConv2d(module, spec, r, r_f, lowrank_precision, init_seed)
    if type(module) is nn.Linear:
        cls = TimestepBoundLinear if name == TIME_EMBEDDING_LAYER else LowRankQuantLinear
        return cls(module, spec, r, r_f, lowrank_precision, init_seed)
    raise ConfigError(f"no QArtSR layer for {type(module).__name__} ({name or 'unnamed'})")


# ---------------------------------------------------------------------------- initialisation


@torch.no_grad()
def weight_absmax_per_input(weight: torch.Tensor) -> torch.Tensor:
    """max|W_{:,j}| over output channels and kernel positions, per input channel j."""
    return weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)


@torch.no_grad()
def smoothing_factors(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """φ_j = max|W_j|^(1−α) / max|X_j|^α, clamped to [1e-5, 1e5]; channels whose activation or
    weight is all zero get φ = 1 (nothing to balance)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be in [0, 1], got {alpha}")
    act = act_absmax.float()
    wgt = weight_absmax.float()
    phi = wgt.pow(1.0 - alpha) / act.pow(alpha)
    dead = (act <= 0) | (wgt <= 0) | ~torch.isfinite(phi)
    phi = torch.where(dead, torch.ones_like(phi), phi)
    return phi.clamp(MIN_SMOOTH, MAX_SMOOTH)


@torch.no_grad()
def init_smoothing(layer: LowRankQuantMixin, act_absmax: torch.Tensor | None, alpha: float) -> None:
    """Set φ SmoothQuant-style from the per-input-channel activation maxima (None: φ = 1)."""
    if act_absmax is None:
        layer.log_smooth.zero_()
        return
    if act_absmax.numel() != layer.log_smooth.numel():
        raise ValueError(
            f"activation statistics have {act_absmax.numel()} channels, the layer "
            f"{layer.log_smooth.numel()}"
        )
    phi = smoothing_factors(act_absmax, weight_absmax_per_input(layer.weight), alpha)
    layer.log_smooth.copy_(phi.log().to(layer.log_smooth.dtype))


@torch.no_grad()
def init_lowrank(layer: LowRankQuantMixin, svd_source: str = "smoothed") -> dict:
    """L1L2 from the truncated SVD of W ⊘ φ (``smoothed``) or W (``raw``); F2 = 0. Returns the share
    of the (source) weight's energy captured by the branch."""
    if svd_source not in SVD_SOURCES:
        raise ConfigError(f"svd_source must be one of {SVD_SOURCES}, got {svd_source!r}")
    if layer.finetune_down is not None:
        layer.finetune_down.zero_()
    if layer.lowrank_up is None:
        return {"rank": 0, "energy": 0.0}
    weight = layer.weight.detach().double()
    phi = layer.smooth().detach().double()
    shape = [1, -1] + [1] * (weight.dim() - 2)
    source = weight / phi.reshape(shape) if svd_source == "smoothed" else weight
    matrix = source.reshape(source.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = layer.rank
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = (root[:, None] * vh[:r]).reshape(r, *source.shape[1:])
    if svd_source == "smoothed":
        down = down * phi.reshape([1, -1] + [1] * (weight.dim() - 2))
    layer.lowrank_up.copy_(up.to(layer.lowrank_up.dtype))
    layer.lowrank_down.copy_(down.to(layer.lowrank_down.dtype))
    energy = float((s[:r] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    return {"rank": r, "energy": energy}


# ---------------------------------------------------------------------------- walking / modes


def iter_lowrank_layers(model: nn.Module) -> Iterator[tuple[str, LowRankQuantMixin]]:
    """``(name, layer)`` for every QArtSR layer (training or merged form) under ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (LowRankQuantMixin, MergedLowRankMixin)):
            yield name, module


@contextlib.contextmanager
def fp_mode(model: nn.Module):
    """Compute the exact float model inside the block: QArtSR layers bypass (``set_fp``), other quant
    layers and attention quantizers are switched off. Restores every switch after."""
    from harness.quant.state import iter_attention_quantizers, iter_quant_layers

    saved_fp = {n: layer.fp_mode for n, layer in iter_lowrank_layers(model)}
    saved_q = {
        n: (layer.quant_weights, layer.quant_activations) for n, layer in iter_quant_layers(model)
    }
    saved_a = {n: q.quant_activations for n, q in iter_attention_quantizers(model)}
    for _, layer in iter_lowrank_layers(model):
        layer.set_fp(True)
    for _, layer in iter_quant_layers(model):
        layer.set_quant_state(False, False)
    for _, q in iter_attention_quantizers(model):
        q.quant_activations = False
    try:
        yield model
    finally:
        for n, layer in iter_lowrank_layers(model):
            layer.set_fp(saved_fp[n])
        for n, layer in iter_quant_layers(model):
            layer.set_quant_state(*saved_q[n])
        for n, q in iter_attention_quantizers(model):
            q.quant_activations = saved_a[n]


# ---------------------------------------------------------------------------- merged form


class MergedLowRankMixin:
    """Inference form: stored residual R (F1F2 folded), φ as an input scale, 16-bit branch factors."""

    def _setup_merged(self, source: LowRankQuantMixin) -> None:
        self.register_buffer("smooth_scale", source.smooth().detach().clone())
        factors = source.lowrank_factors()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            source.lowrank_precision
        ]
        if factors is None:
            self.branch_up = None
            self.branch_down = None
        else:
            self.register_buffer("branch_up", factors[0].detach().to(dtype).clone())
            self.register_buffer("branch_down", factors[1].detach().to(dtype).clone())
        self.rank = source.rank
        self.lowrank_precision = source.lowrank_precision
        self.fp_mode = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        axis = self._input_channel_axis(x)
        shape = [1] * x.dim()
        shape[axis] = -1
        return x * self.smooth_scale.reshape(shape)

    def extra_output(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.branch_up is None:
            return None
        up = self.branch_up.to(x.dtype)
        down = self.branch_down.to(x.dtype)
        if isinstance(self, QuantConv2d):
            return F.conv2d(self._op(x, down, None), up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    def set_fp(self, fp: bool) -> None:
        if fp:
            raise ModelError("a merged QArtSR layer no longer holds the float weight W")

    def added_tensors(self) -> list[torch.Tensor]:
        out = [self.smooth_scale]
        if self.branch_up is not None:
            out += [self.branch_up, self.branch_down]
        return out

    def deployed_extra_elements(self) -> int:
        return sum(t.numel() for t in self.added_tensors())

    def branch_macs(self, output: torch.Tensor) -> int:
        if self.branch_up is None:
            return 0
        per_position_in = math.prod(self.branch_down.shape[1:])
        out_dim = self.branch_up.shape[0]
        return (output.numel() // out_dim) * self.rank * (per_position_in + out_dim)


class MergedLowRankConv2d(MergedLowRankMixin, QuantConv2d):
    """Merged (inference) form of :class:`LowRankQuantConv2d`."""


class MergedLowRankLinear(MergedLowRankMixin, QuantLinear):
    """Merged (inference) form of :class:`LowRankQuantLinear`."""


@torch.no_grad()
def merge_for_inference(layer: LowRankQuantMixin) -> QuantLayer:
    """The inference form of a trained QArtSR layer: weight = R = (W − L1L2 + F1F2) ⊘ φ (a frozen
    Parameter, quantized by copies of the layer's own quantizers), φ as the activation quantizer's
    input scale, the branch factors stored in 16 bit. Outputs are identical to ``layer``'s."""
    import copy

    if not isinstance(layer, LowRankQuantMixin):
        raise TypeError(f"expected a QArtSR layer, got {type(layer).__name__}")
    residual = layer.residual_weight().detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, QuantConv2d):
        float_module = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, bias is not None, layer.padding_mode,
        )  # fmt: skip
        cls = MergedLowRankConv2d
    else:
        float_module = nn.Linear(layer.in_features, layer.out_features, bias is not None)
        cls = MergedLowRankLinear
    float_module = float_module.to(residual.device, residual.dtype)
    float_module.weight = nn.Parameter(residual, requires_grad=False)
    if bias is not None:
        float_module.bias = nn.Parameter(bias, requires_grad=False)
    merged = cls(float_module, layer.spec)
    merged.weight_quantizers = copy.deepcopy(layer.weight_quantizers)
    merged.act_quantizers = copy.deepcopy(layer.act_quantizers)
    merged.bias_quantizer = copy.deepcopy(layer.bias_quantizer)
    for q in merged.quantizers().values():
        q.observer = None
        for p in q.parameters():
            p.requires_grad_(False)
    merged.set_quant_state(layer.quant_weights, layer.quant_activations)
    merged._setup_merged(layer)
    return merged


def merge_model_for_inference(model: nn.Module) -> int:
    """Replace every training-form QArtSR layer under ``model`` by its merged form (in place).
    Returns the number of merged layers."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankQuantMixin):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, merge_for_inference(module))
            count += 1
    return count


# ---------------------------------------------------------------------------- reports


def lowrank_size_report(model: nn.Module) -> dict:
    """The core :func:`~harness.quant.packing.size_report` with the QArtSR additions counted honestly.

    The core report counts every tensor a layer adds (L1, L2, F1, F2, log φ) as other float32 state
    and includes it in the float baseline. Here: the baseline is the float model (added tensors
    removed), the deployed model stores the packed residual (the core's codes of
    (W − L1L2 + F1F2) ⊘ φ), L1, L2 and φ at 16 bit, and nothing for F1F2 (merged into the residual).
    Guard buffers (the bound timestep) are settings, not weights, and are not counted.
    """
    from harness.quant.packing import size_report

    base = size_report(model)
    added_fp32 = 0
    deployed_16 = 0
    branch_16 = 0
    seen: set[int] = set()
    layers = 0
    for _, layer in iter_lowrank_layers(model):
        layers += 1
        tensors = list(layer.added_tensors())
        for name in ("bound_timestep", "bound_input"):
            if hasattr(layer, name):
                tensors.append(getattr(layer, name))
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                added_fp32 += 4 * t.numel()
        deployed_16 += layer.deployed_extra_elements()
        branch_16 += layer.deployed_extra_elements() - (
            layer.log_smooth.numel() if hasattr(layer, "log_smooth") else layer.smooth_scale.numel()
        )
    bytes_16 = LOWRANK_STORAGE_BITS // 8
    lowrank_bytes = deployed_16 * bytes_16
    other = base["other_fp32_bytes"] - added_fp32
    quant_packed = base["quantized_layers_packed_bytes"] + lowrank_bytes
    quant_fp32 = base["quantized_layers_fp32_bytes"]
    model_fp32 = quant_fp32 + other
    model_packed = quant_packed + other
    return {
        **base,
        "note": "QArtSR: low-rank branch (L1, L2) and smoothing φ stored at 16 bit; F1F2 merged",
        "lowrank_layers": layers,
        "lowrank_branch_bytes": branch_16 * bytes_16,
        "smoothing_bytes": (deployed_16 - branch_16) * bytes_16,
        "residual_packed_bytes": base["quantized_layers_packed_bytes"],
        "quantized_layers_packed_bytes": quant_packed,
        "quantized_layers_ratio": quant_packed / quant_fp32 if quant_fp32 else None,
        "other_fp32_bytes": other,
        "model_fp32_bytes": model_fp32,
        "model_packed_bytes": model_packed,
        "model_ratio": model_packed / model_fp32 if model_fp32 else None,
    }


@torch.no_grad()
def lowrank_bops_report(qmodel, size: int = 512) -> dict:
    """The core :func:`~harness.quant.packing.bops_report` plus the low-rank branch MACs at 16×16 bit
    (the float baseline has no branch, so ``fp32_bops`` is unchanged)."""
    from harness.quant.packing import bops_report

    model = getattr(qmodel, "model", qmodel)
    branch: dict[str, int] = {}
    handles = []

    def hook(name):
        def fn(module, _inputs, output):
            branch[name] = branch.get(name, 0) + module.branch_macs(output)

        return fn

    for name, layer in iter_lowrank_layers(model):
        handles.append(layer.register_forward_hook(hook(name)))
    try:
        report = bops_report(qmodel, size=size)
    finally:
        for handle in handles:
            handle.remove()
    branch_macs = sum(branch.values())
    bits = LOWRANK_STORAGE_BITS
    report = dict(report)
    report["lowrank_branch_macs"] = branch_macs
    report["lowrank_branch_bops"] = branch_macs * bits * bits
    report["macs"] = report["macs"] + branch_macs
    report["bops"] = report["bops"] + branch_macs * bits * bits
    report["bops_ratio"] = report["bops"] / report["fp32_bops"] if report["fp32_bops"] else None
    return report


__all__ = [
    "LOWRANK_LAYER_TYPES",
    "LowRankQuantConv2d",
    "LowRankQuantLinear",
    "MergedLowRankConv2d",
    "MergedLowRankLinear",
    "TimestepBoundLinear",
    "fp_mode",
    "init_lowrank",
    "init_smoothing",
    "iter_lowrank_layers",
    "lowrank_bops_report",
    "lowrank_ranks",
    "lowrank_size_report",
    "make_lowrank_layer",
    "merge_for_inference",
    "merge_model_for_inference",
    "round_to_precision",
    "smoothing_factors",
    "weight_absmax_per_input",
]

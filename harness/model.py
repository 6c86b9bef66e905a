"""``OneStepSR``: OSEDiff's one-step super-resolution inference, with a variable timestep.

Reference: Wu et al., "One-Step Effective Diffusion Network for Real-World Image Super-Resolution"
(OSEDiff, NeurIPS 2024), ``test_osediff.py`` and ``osediff.py:OSEDiff_test``; PassionSR's fp32 variant
with a constant empty-prompt embedding ("PassionSR-FP", Zhu et al. CVPR 2025). The steps
(methods.md §2.2):

1. LR → bicubic ×``upscale`` (PIL, as OSEDiff) → [-1, 1];
2. VAE encoder → posterior ``sample()`` with a seeded generator (``mode()`` as an option) × scaling factor
   = z_L;
3. one UNet pass at timestep T (OSEDiff: 999) with the constant prompt embedding → ε;
4. x0 = (z_L − √(1−ᾱ_T)·ε)/√ᾱ_T in float64 with the scheduler's ᾱ (what ``DDPMScheduler.step`` returns
   for a single inference step, and what PassionSR computes directly);
5. VAE decoder → clamp to [-1, 1];
6. colour fix against the upsampled LR (``adain`` default, ``wavelet``, ``none``).

T is a parameter because QArtSR's TRQ runs the quantized UNet at another timestep.

Deviations, all recorded in :class:`InferenceSettings` with every result:
- OSEDiff pre-resizes LR images whose short side is below 128 px and then calls ``resize`` on the output
  without using the result (a bug). qbench never resizes silently: small inputs are processed as they
  are.
- OSEDiff runs fp16 by default; qbench (like PassionSR) runs fp32 by default; ``bf16``/``fp16`` use
  autocast and are options.
- Tiling: see :mod:`harness.tiling` (per-tile GroupNorm statistics in the VAE, unlike OSEDiff's VAEHook).
- The posterior noise is drawn once for the whole latent (not per tile), so tiled and untiled encoding
  share the same noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from harness.errors import ConfigError, DivergedError
from harness.tiling import tiled_apply

COLOR_FIXES = ("adain", "wavelet", "none")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    """Every setting of one-step inference; stored with each result.

    Tile sizes are in the space each stage works in: ``latent_tile``/``latent_overlap`` in latent
    pixels (OSEDiff 96/32, PassionSR 64/32), ``vae_encoder_tile`` in image pixels (OSEDiff/PassionSR
    1024), ``vae_decoder_tile`` in latent pixels (224). A tile of 0 disables tiling for that stage.
    """

    timestep: int = 999
    upscale: int = 4
    latent_tile: int = 64
    latent_overlap: int = 32
    vae_encoder_tile: int = 1024
    vae_encoder_overlap: int = 64
    vae_decoder_tile: int = 224
    vae_decoder_overlap: int = 32
    color_fix: str = "adain"
    precision: str = "fp32"
    sample_posterior: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0 <= self.timestep <= 999:
            raise ConfigError(f"timestep must be in [0, 999], got {self.timestep}")
        if self.color_fix not in COLOR_FIXES:
            raise ConfigError(f"color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("latent_tile", "vae_encoder_tile", "vae_decoder_tile"):
            tile = getattr(self, name)
            overlap = getattr(self, name.replace("tile", "overlap"))
            if tile < 0 or (tile and not 0 <= overlap < tile):
                raise ConfigError(f"{name}={tile} with overlap {overlap} is invalid")
        if self.upscale < 1:
            raise ConfigError(f"upscale must be >= 1, got {self.upscale}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InferenceSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown inference setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def check_finite(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """Raise :class:`DivergedError` if ``tensor`` holds NaN or Inf (e.g. fp16 overflow, a broken quantizer)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise DivergedError(f"non-finite values in the {stage} output: {bad} of {tensor.numel()}")
    return tensor


def pil_bicubic_upsample(lr01: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic ×``scale`` with PIL, as OSEDiff does; input/output 1×3×H×W float in [0, 1].

    The input is rounded to 8-bit levels first (OSEDiff upsamples the decoded PIL image).
    """
    if lr01.dim() != 4 or lr01.shape[0] != 1 or lr01.shape[1] != 3:
        raise ValueError(f"expected a 1x3xHxW image, got shape {tuple(lr01.shape)}")
    array = (lr01[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    image = Image.fromarray(array)
    up = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
    return torch.from_numpy(np.asarray(up, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def adain_color_fix(image: torch.Tensor, source: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match the per-channel mean and std of ``image`` to ``source`` (OSEDiff's ``adain_color_fix``)."""
    dims = (2, 3)
    img_mean, img_std = image.mean(dims, keepdim=True), image.std(dims, keepdim=True) + eps
    src_mean, src_std = source.mean(dims, keepdim=True), source.std(dims, keepdim=True) + eps
    return (image - img_mean) / img_std * src_std + src_mean


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    low = x
    for level in range(levels):
        blurred = _wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Keep the high frequencies of ``image`` and the low frequencies of ``source`` (5-level à-trous
    wavelet decomposition, as OSEDiff's ``wavelet_color_fix``)."""
    high, _ = _wavelet_split(image)
    _, low = _wavelet_split(source)
    return high + low


def apply_color_fix(image01: torch.Tensor, source01: torch.Tensor, method: str) -> torch.Tensor:
    """Apply a colour fix to an image in [0, 1] against the upsampled LR in [0, 1]; clamp to [0, 1]."""
    if method == "none":
        return image01
    if method == "adain":
        return adain_color_fix(image01, source01).clamp(0, 1)
    if method == "wavelet":
        return wavelet_color_fix(image01, source01).clamp(0, 1)
    raise ConfigError(f"unknown colour fix {method!r}; choose one of {COLOR_FIXES}")


@dataclass(frozen=True)
class ModuleUnit:
    """A block of the pipeline in forward order: what RPQ quantizes one at a time."""

    name: str
    members: tuple[str, ...]  # fully qualified module names under the OneStepSR root
    component: str  # "vae.encoder", "unet" or "vae.decoder"

    def contains(self, module_name: str) -> bool:
        """True if ``module_name`` is one of the members or lies under one."""
        return any(is_under(module_name, member) for member in self.members)


def is_under(name: str, prefix: str) -> bool:
    """True if module ``name`` is ``prefix`` or one of its submodules."""
    return name == prefix or name.startswith(prefix + ".")


class OneStepSR(nn.Module):
    """OSEDiff-style one-step SR model: ``vae`` (AutoencoderKL), ``unet`` (UNet2DConditionModel).

    ``alphas_cumprod`` comes from the model's DDPM scheduler (SD-2.1: scaled-linear β 0.00085→0.012,
    1000 steps). ``prompt_embeds`` is the constant text context ([1, L, D]): the empty-prompt CLIP
    embedding for the real model (PassionSR-FP), a fixed tensor for the tiny model.
    """

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        alphas_cumprod: torch.Tensor,
        prompt_embeds: torch.Tensor,
        settings: InferenceSettings | None = None,
        identity: dict | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.register_buffer(
            "alphas_cumprod", alphas_cumprod.detach().double().clone(), persistent=False
        )
        self.register_buffer(
            "prompt_embeds", prompt_embeds.detach().float().clone(), persistent=False
        )
        self.settings = settings or InferenceSettings()
        self.identity = dict(identity or {})
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ----------------------------------------------------------------- stages
    def _autocast(self):
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        device_type = "cuda" if self.alphas_cumprod.is_cuda else "cpu"
        return torch.autocast(device_type, dtype=dtype)

    def upsample_lr(self, lr01: torch.Tensor) -> torch.Tensor:
        """LR in [0, 1] → bicubic ×upscale (PIL) in [0, 1]."""
        return pil_bicubic_upsample(lr01, self.settings.upscale).to(self.alphas_cumprod.device)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """VAE encoder + quant_conv: image in [-1, 1] → posterior moments (mean, logvar) channels."""
        with self._autocast():
            h = self.vae.encoder(x)
            if getattr(self.vae, "quant_conv", None) is not None:
                h = self.vae.quant_conv(h)
        return h.float()

    def latent_from_moments(
        self, moments: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior sample (or mode) × scaling factor, with diffusers' logvar clamp [-30, 20]."""
        mean, logvar = moments.chunk(2, dim=1)
        if not self.settings.sample_posterior:
            return mean * self.scaling_factor
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(
            mean.device
        )
        return (mean + std * noise) * self.scaling_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] → z_L (untiled)."""
        if generator is None and self.settings.sample_posterior:
            generator = torch.Generator().manual_seed(self.settings.seed)
        return self.latent_from_moments(self.encode_moments(x), generator)

    def predict_eps(self, z: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """One UNet pass at ``timestep`` (default: the settings' T) with the constant prompt embedding."""
        t = self.settings.timestep if timestep is None else int(timestep)
        context = self.prompt_embeds.expand(z.shape[0], -1, -1)
        t_tensor = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        with self._autocast():
            eps = self.unet(z, t_tensor, encoder_hidden_states=context).sample
        return eps.float()

    def x0_from_eps(
        self, z: torch.Tensor, eps: torch.Tensor, timestep: int | None = None
    ) -> torch.Tensor:
        """x0 = (z − √(1−ᾱ_T)·ε)/√ᾱ_T in float64, returned as float32 (OSEDiff/PassionSR)."""
        t = self.settings.timestep if timestep is None else int(timestep)
        abar = self.alphas_cumprod[t]
        x0 = (z.double() - torch.sqrt(1.0 - abar) * eps.double()) / torch.sqrt(abar)
        return x0.float()

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """z_H → image in [-1, 1] (post_quant_conv + decoder, clamped)."""
        with self._autocast():
            h = z_h / self.scaling_factor
            if getattr(self.vae, "post_quant_conv", None) is not None:
                h = self.vae.post_quant_conv(h)
            image = self.vae.decoder(h)
        return image.float().clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Differentiable untiled path: image in [-1, 1] → SR image in [-1, 1], no colour fix."""
        z_l = self.encode(x)
        eps = self.predict_eps(z_l, timestep)
        return self.decode(self.x0_from_eps(z_l, eps, timestep))

    # -------------------------------------------------------- full pipeline
    @torch.no_grad()
    def super_resolve(self, lr01: torch.Tensor, *, return_stages: bool = False):
        """The evaluation pipeline: LR in [0, 1] (1×3×h×w) → SR in [0, 1] (1×3×sh×sw).

        Tiles each stage per :class:`InferenceSettings`, checks every stage for NaN/Inf and applies the
        colour fix against the bicubic-upsampled LR. With ``return_stages`` also returns a dict of
        intermediate tensors (``lr_up``, ``z_l``, ``eps``, ``z_h``).
        """
        s = self.settings
        lr_up = self.upsample_lr(lr01)
        f = self.vae_factor
        height, width = lr_up.shape[-2:]
        if height % f or width % f:
            # OSEDiff crops/resizes to a multiple of 8; qbench refuses instead of resizing silently.
            raise ConfigError(
                f"upsampled size {width}x{height} is not a multiple of the VAE factor {f}; "
                f"crop the LR image so that {s.upscale}·size is divisible by {f}"
            )
        x = lr_up * 2.0 - 1.0
        if s.vae_encoder_tile:
            moments = tiled_apply(
                self.encode_moments,
                x,
                tile=s.vae_encoder_tile,
                overlap=s.vae_encoder_overlap,
                scale=1.0 / f,
                multiple=f,
            )
        else:
            moments = self.encode_moments(x)
        check_finite(moments, "VAE encoder")
        generator = torch.Generator().manual_seed(s.seed)
        z_l = self.latent_from_moments(moments, generator)

        def unet_x0(z: torch.Tensor) -> torch.Tensor:
            return self.x0_from_eps(z, self.predict_eps(z))

        if s.latent_tile:
            z_h = tiled_apply(unet_x0, z_l, tile=s.latent_tile, overlap=s.latent_overlap)
        else:
            z_h = unet_x0(z_l)
        check_finite(z_h, "UNet")
        if s.vae_decoder_tile:
            image = tiled_apply(
                self.decode, z_h, tile=s.vae_decoder_tile, overlap=s.vae_decoder_overlap, scale=f
            )
        else:
            image = self.decode(z_h)
        check_finite(image, "VAE decoder")
        sr01 = apply_color_fix((image * 0.5 + 0.5).clamp(0, 1), lr_up, s.color_fix)
        if return_stages:
            return sr01, {"lr_up": lr_up, "z_l": z_l, "z_h": z_h}
        return sr01

    # ------------------------------------------------------------- structure
    def ordered_modules(self, scope: str = "UV") -> list[ModuleUnit]:
        """The pipeline's blocks in forward order (VAE encoder, UNet, VAE decoder for ``UV``; UNet for
        ``U``). Small head/tail layers are grouped with their neighbouring block so every quantizable
        layer belongs to exactly one unit."""
        if scope not in ("U", "UV"):
            raise ConfigError(f"scope must be 'U' or 'UV', got {scope!r}")
        units: list[ModuleUnit] = []
        if scope == "UV":
            units.extend(self._vae_units("encoder"))
        units.extend(self._unet_units())
        if scope == "UV":
            units.extend(self._vae_units("decoder"))
        return units

    def _unet_units(self) -> list[ModuleUnit]:
        u = self.unet
        n_down, n_up = len(u.down_blocks), len(u.up_blocks)
        head = ["unet.time_proj", "unet.time_embedding", "unet.conv_in", "unet.down_blocks.0"]
        units = [ModuleUnit("unet.down_blocks.0", tuple(head), "unet")]
        units += [
            ModuleUnit(f"unet.down_blocks.{i}", (f"unet.down_blocks.{i}",), "unet")
            for i in range(1, n_down)
        ]
        units.append(ModuleUnit("unet.mid_block", ("unet.mid_block",), "unet"))
        units += [
            ModuleUnit(f"unet.up_blocks.{i}", (f"unet.up_blocks.{i}",), "unet")
            for i in range(n_up - 1)
        ]
        last = f"unet.up_blocks.{n_up - 1}"
        tail = (last, "unet.conv_norm_out", "unet.conv_out")
        units.append(ModuleUnit(last, tail, "unet"))
        return [self._existing(unit) for unit in units]

    def _vae_units(self, part: str) -> list[ModuleUnit]:
        component = f"vae.{part}"
        module = getattr(self.vae, part)
        units: list[ModuleUnit] = []
        if part == "encoder":
            blocks = [f"{component}.down_blocks.{i}" for i in range(len(module.down_blocks))]
            units.append(ModuleUnit(blocks[0], (f"{component}.conv_in", blocks[0]), component))
            units += [ModuleUnit(b, (b,), component) for b in blocks[1:]]
            tail = (
                f"{component}.mid_block",
                f"{component}.conv_norm_out",
                f"{component}.conv_out",
                "vae.quant_conv",
            )
            units.append(ModuleUnit(f"{component}.mid_block", tail, component))
        else:
            head = ("vae.post_quant_conv", f"{component}.conv_in", f"{component}.mid_block")
            units.append(ModuleUnit(f"{component}.mid_block", head, component))
            blocks = [f"{component}.up_blocks.{i}" for i in range(len(module.up_blocks))]
            units += [ModuleUnit(b, (b,), component) for b in blocks[:-1]]
            tail = (blocks[-1], f"{component}.conv_norm_out", f"{component}.conv_out")
            units.append(ModuleUnit(blocks[-1], tail, component))
        return [self._existing(unit) for unit in units]

    def _existing(self, unit: ModuleUnit) -> ModuleUnit:
        names = dict(self.named_modules())
        members = tuple(m for m in unit.members if m in names and names[m] is not None)
        return dataclasses.replace(unit, members=members)

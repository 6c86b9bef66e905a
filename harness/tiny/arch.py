"""Architecture of the embedded tiny OSEDiff-like model.

Same classes as Stable Diffusion 2.1 / OSEDiff (diffusers ``AutoencoderKL``, ``UNet2DConditionModel``
with ResNet blocks, cross-attention transformer blocks with linear projections, a time embedding,
``conv_in``/``conv_out``; a DDPM schedule with SD-2.1's scaled-linear betas), shrunk to train on a
2-core CPU. Choices (docs/model.md):

- VAE downsampling factor 2 (SD: 8) with 12 latent channels (SD: 4): a 2×2×3 patch maps to 12
  latent values, no compression, where SD compresses 48×. The VAE's reconstruction bounds the SR
  fidelity, and the issue's target is an FP model that beats bicubic (33 dB Y-PSNR on ``demo``).
  Measured here, 8 minutes of single-thread training each (``/tmp`` trials, demo HR reconstruction
  Y-PSNR): f=4/16 ch 25.4 dB, f=2/8 ch 31.1 dB, f=2/12 ch 31.8 dB (924 steps); the first shipped
  model (f=4/8 ch, 1100 steps) reached 27.9 dB and its SR 18.3 dB.
- UNet widths 48/48/64/96 (four levels), and no output GroupNorm (:data:`UNET_OUTPUT_NORM`). Before
  that change the top level carried the 12-channel latent to ``conv_out`` through GroupNorm → SiLU: at
  T=999, x0 = (z − √(1−ᾱ)·ε)/√ᾱ needs ε to about 1% to beat
  the identity map, and GroupNorm's per-sample statistics over 2 channels per group (the earlier
  width 16 with 8 groups) lose exactly the scale information that precision needs. Measured here
  (stage 3a objective, 400 steps from scratch, held-out latent MSE, a throwaway script): width 16
  0.79, width 48 0.11. With bench.one_step_fit's setup (``--scratch --variant full --lr 1e-3``,
  2026-12-04) width 48 gave 0.29: the setups differ, and the 0.11 was not reproduced. (SD-2.1
  carries 4 latent channels in 320.) A UNet pass at a 128² latent (a 256² image) costs 0.13 s instead of 0.07 s.
- No VAE mid-block attention: at f=2 its token count is (H/2)·(W/2), the full-resolution attention
  DEVELOPERS.md warns costs 10× on this CPU. PassionSR does not quantize the VAE attention matmuls
  anyway (methods.md §6.1).
- UNet attention only at the two lowest resolutions (latent/4, latent/8) and the mid block: SD-2.1's
  pattern (attention in all but its lowest level) inverted for cost.
- The constant text context is a fixed seeded Gaussian tensor of shape [1, 77, 64] standing in for the
  CLIP empty-prompt embedding (the tiny model has no text encoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

CONTEXT_TOKENS = 77
CONTEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 48),
    layers_per_block=1,
    latent_channels=12,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
    scaling_factor=1.0,  # replaced by 1/std of the trained latents (SD: 0.18215)
)

UNET_CONFIG = dict(
    sample_size=64,
    in_channels=12,
    out_channels=12,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(48, 48, 64, 96),
    layers_per_block=1,
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=(2, 2, 4, 6),
    use_linear_projection=True,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


# The tiny UNet has no output GroupNorm (``conv_norm_out``/``conv_act`` are ``None``, a state diffusers'
# own forward supports: it skips them when ``norm_num_groups`` is None). Why: every ResNet and
# transformer block adds to a residual stream that carries the latent's absolute level, and
# ``conv_norm_out`` was the one place that normalised it away just before ``conv_out``, so ε could
# not follow the latent's level to the ~1% x0 at T=999 needs (docs/model.md). Measured with
# ``python -m bench.one_step_fit --variant full --steps 1600`` on the same stage-2 UNet: held-out
# latent MSE 0.111 → 0.093 (lr 1e-3) and 0.106 → 0.090 (lr 2e-3) without it. diffusers' config cannot
# say this (``norm_num_groups=None`` also reaches the ResNet blocks and fails), so directories written
# by ``train-tiny`` carry ``unet/qbench_unet.json`` and :mod:`harness.loaders` applies it.
UNET_OUTPUT_NORM = False
UNET_ARCH_FILE = "qbench_unet.json"


def drop_output_norm(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Remove ``conv_norm_out`` and ``conv_act``: ``conv_out`` then reads the residual stream."""
    unet.conv_norm_out = None
    unet.conv_act = None
    return unet


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return unet if UNET_OUTPUT_NORM else drop_output_norm(unet)


def save_unet(unet: UNet2DConditionModel, directory: str | Path) -> None:
    """``save_pretrained`` plus ``qbench_unet.json`` (the departure diffusers' config cannot hold)."""
    unet.save_pretrained(directory, safe_serialization=True)
    record = {"conv_norm_out": unet.conv_norm_out is not None}
    (Path(directory) / UNET_ARCH_FILE).write_text(json.dumps(record) + "\n")


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_context(seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, CONTEXT_TOKENS, CONTEXT_DIM), generator=generator)

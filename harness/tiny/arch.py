"""Architecture of the embedded tiny OSEDiff-like model.

Same classes as Stable Diffusion 2.1 / OSEDiff (diffusers ``AutoencoderKL``, ``UNet2DConditionModel``
with ResNet blocks, cross-attention transformer blocks with linear projections, a time embedding,
``conv_in``/``conv_out``; a DDPM schedule with SD-2.1's scaled-linear betas), shrunk to train on a
2-core CPU. Choices (docs/model.md):

- VAE downsampling factor 4 (SD: 8) with 8 latent channels (SD: 4), i.e. 6× compression instead of
  SD's 48×: the VAE's reconstruction bounds the SR quality, and a VAE this small trained for minutes
  reconstructs too poorly at higher compression (an f=4, 4-channel trial here plateaued near 21 dB
  after 350 steps; issue 3 reports 22.6 dB for another f=4 trial).
- No VAE mid-block attention: at f=4 its token count is (H/4)·(W/4), which is the full-resolution
  attention DEVELOPERS.md warns costs 10× on this CPU. PassionSR does not quantize the VAE attention
  matmuls anyway (methods.md §6.1).
- UNet attention only at the two lower resolutions (latent/2 and latent/4) and the mid block, like
  SD-2.1's pattern of no attention at its last (lowest) level inverted for cost.
- The constant text context is a fixed seeded Gaussian tensor of shape [1, 77, 64] standing in for the
  CLIP empty-prompt embedding (the tiny model has no text encoder).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

CONTEXT_TOKENS = 77
CONTEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 48, 64),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
    scaling_factor=1.0,  # replaced by 1/std of the trained latents (SD: 0.18215)
)

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=8,
    out_channels=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=(2, 4, 6),
    use_linear_projection=True,
    norm_num_groups=16,
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


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_context(seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, CONTEXT_TOKENS, CONTEXT_DIM), generator=generator)

"""Shared fixtures: small random OneStepSR models built from the tiny architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"evaluation images not found at {SHARED_DATA}")
    return SHARED_DATA


def make_random_model(seed: int = 0, **settings):
    """A OneStepSR with the tiny architecture and random (seeded) weights."""
    from harness.model import InferenceSettings, OneStepSR
    from harness.tiny import arch

    vae = arch.build_vae(seed)
    vae.register_to_config(scaling_factor=0.5)
    unet = arch.build_unet(seed)
    scheduler = arch.build_scheduler()
    model = OneStepSR(
        vae, unet, scheduler.alphas_cumprod, arch.build_context(), InferenceSettings(**settings)
    )
    return model.eval().requires_grad_(False)


@pytest.fixture
def random_model():
    return make_random_model()


def build_toy_model(seed: int = 0):
    """A tiny random SD-shaped OneStepSR (UNet with cross-attention, VAE with mid-block attention)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from harness.model import InferenceSettings, OneStepSR

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        layers_per_block=1,
    )  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed))
    settings = InferenceSettings(latent_tile=0, vae_encoder_tile=0, vae_decoder_tile=0)
    return OneStepSR(vae, unet, scheduler.alphas_cumprod, context, settings)


def quantize_toy_model(root: Path, n: int, bits: str = "W4A4"):
    """MinMax on :func:`build_toy_model`, calibrated on two seeded random images written to ``root``.
    Returns ``(qmodel, calibration)``."""
    import numpy as np
    from PIL import Image

    from harness.quant import CalibrationSettings, build_calibration_set, quantize
    from harness.registry import get_method

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = root / f"hr{i}.png"
        Image.fromarray((rng.random((9, 11, 3)) * 255).astype(np.uint8)).resize((88, 72)).save(path)
        paths.append(path)
    model = build_toy_model()
    calibration = build_calibration_set(
        model, hr_images=paths, settings=CalibrationSettings(n=n, lr_crop=8, seed=0), cache=False
    )
    config = get_method("minmax").make_config(bits=bits)
    return quantize(model, config, calibration, base_model="toy-seed-0"), calibration

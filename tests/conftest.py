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

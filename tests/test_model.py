"""OneStepSR: the OSEDiff inference path, tiling, colour fix, NaN detection, module order."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from harness.errors import ConfigError, DivergedError
from harness.model import (
    InferenceSettings,
    adain_color_fix,
    pil_bicubic_upsample,
    wavelet_color_fix,
)
from harness.tiling import tiled_apply
from harness.tiny import arch
from tests.conftest import make_random_model


def test_x0_matches_diffusers_scheduler_single_step(random_model):
    """OSEDiff calls DDPMScheduler.step with one inference step; its prev_sample is our x0."""
    scheduler = DDPMScheduler(**arch.SCHEDULER_CONFIG)
    scheduler.set_timesteps(timesteps=[999])  # OSEDiff: one inference step at t=999, prev_t = -1
    torch.manual_seed(0)
    z, eps = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    expected = scheduler.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
    ours = random_model.x0_from_eps(z, eps, 999)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-5)
    # the closed form with SD-2.1's constants (methods.md §2.3): 14.6488·z − 14.6146·ε
    closed = 14.6488 * z - 14.6146 * eps
    assert torch.allclose(ours, closed, atol=2e-3 * closed.abs().max())


def test_x0_depends_on_timestep(random_model):
    z, eps = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    a = random_model.x0_from_eps(z, eps, 999)
    b = random_model.x0_from_eps(z, eps, 499)
    assert not torch.allclose(a, b)
    abar = random_model.alphas_cumprod[499]
    assert torch.allclose(
        b.double(), (z.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt(), atol=1e-5
    )


def test_super_resolve_is_deterministic_and_scaled(random_model):
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    a = random_model.super_resolve(lr)
    b = random_model.super_resolve(lr)
    assert a.shape == (1, 3, 96, 80)
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_different_seed_changes_posterior_sample():
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model = make_random_model(color_fix="none")
    a = model.super_resolve(lr)
    model.settings = dataclasses.replace(model.settings, seed=7)
    b = model.super_resolve(lr)
    assert not torch.equal(a, b)
    model.settings = dataclasses.replace(model.settings, sample_posterior=False)
    c1, c2 = model.super_resolve(lr), model.super_resolve(lr)
    assert torch.equal(c1, c2)


def test_tiled_apply_identity_and_scaling_are_exact():
    x = torch.randn(1, 3, 70, 53)
    out = tiled_apply(lambda t: t * 2, x, tile=32, overlap=8)
    assert torch.allclose(out, x * 2, atol=1e-5)
    up = tiled_apply(
        lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest"),
        x[:, :, :64, :48],
        tile=16,
        overlap=8,
        scale=2,
    )
    ref = torch.nn.functional.interpolate(x[:, :, :64, :48], scale_factor=2, mode="nearest")
    assert torch.allclose(up, ref, atol=1e-5)
    down = tiled_apply(
        lambda t: t[:, :, ::4, ::4], x[:, :, :64, :48], tile=32, overlap=16, scale=0.25, multiple=4
    )
    assert torch.allclose(down, x[:, :, :64:4, :48:4], atol=1e-5)


def test_tiled_and_untiled_inference_agree_on_the_tiny_model(shared_data):
    """Acceptance (issue 3): tiled and untiled inference agree within 0.5 dB (trained tiny model)."""
    from harness.images import load_image, to_tensor
    from harness.loaders import TINY_DIR, load_model

    if not (TINY_DIR / "unet" / "config.json").is_file():
        pytest.skip("the embedded tiny model is not installed")
    model = load_model("tiny")
    lr = to_tensor(load_image(shared_data / "Urban100" / "LR" / "img_001.png").array)[
        :, :, :128, :192
    ]
    hr = to_tensor(load_image(shared_data / "Urban100" / "HR" / "img_001.png").array)[
        :, :, :512, :768
    ]
    base = model.settings
    model.settings = dataclasses.replace(
        base, latent_tile=0, vae_encoder_tile=0, vae_decoder_tile=0
    )
    untiled = model.super_resolve(lr)
    model.settings = base  # the shipped tiles (inference.json): several latent and decoder tiles
    tiled = model.super_resolve(lr)

    def psnr(a, b):
        return float(10 * torch.log10(1 / torch.mean((a - b) ** 2)))

    assert abs(psnr(untiled, hr) - psnr(tiled, hr)) < 0.5


def test_nan_in_a_layer_is_reported_as_diverged(random_model):
    with torch.no_grad():
        random_model.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError, match="UNet"):
        random_model.super_resolve(torch.rand(1, 3, 16, 16))


def test_non_multiple_size_is_refused_not_resized():
    model = make_random_model(upscale=1)
    with pytest.raises(ConfigError, match="multiple"):
        model.super_resolve(torch.rand(1, 3, 17, 16))


def test_color_fixes():
    torch.manual_seed(0)
    image, source = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32) * 0.5 + 0.2
    fixed = adain_color_fix(image, source)
    assert torch.allclose(fixed.mean((2, 3)), source.mean((2, 3)), atol=1e-5)
    assert torch.allclose(fixed.std((2, 3)), source.std((2, 3)), atol=1e-4)
    # wavelet: a constant image takes the source's low frequencies
    same = wavelet_color_fix(source, source)
    assert torch.allclose(same, source, atol=1e-5)


def test_pil_bicubic_upsample_matches_pil():
    import numpy as np
    from PIL import Image

    array = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(array).resize((48, 40), Image.BICUBIC))
    ours = pil_bicubic_upsample(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, 4)
    assert np.array_equal(
        (ours[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected
    )


def test_settings_validation():
    with pytest.raises(ConfigError):
        InferenceSettings(timestep=1000)
    with pytest.raises(ConfigError):
        InferenceSettings(color_fix="histogram")
    with pytest.raises(ConfigError):
        InferenceSettings.from_dict({"tile": 3})
    settings = InferenceSettings(timestep=499)
    assert InferenceSettings.from_dict(settings.to_dict()) == settings


def test_ordered_modules_cover_every_layer_once(random_model):
    units = random_model.ordered_modules("UV")
    components = [u.component for u in units]
    assert components == sorted(components, key=["vae.encoder", "unet", "vae.decoder"].index)
    covered: dict[str, str] = {}
    for unit in units:
        for member in unit.members:
            for name, module in random_model.get_submodule(member).named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    full = f"{member}.{name}" if name else member
                    assert full not in covered, f"{full} in {covered.get(full)} and {unit.name}"
                    covered[full] = unit.name
    all_layers = {
        n for n, m in random_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert set(covered) == all_layers
    unet_only = random_model.ordered_modules("U")
    assert all(u.component == "unet" for u in unet_only)
    with pytest.raises(ConfigError):
        random_model.ordered_modules("V")

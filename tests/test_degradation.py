"""Tests for harness.degradation: determinism, recorded parameters, presets, kernels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from harness.degradation import (
    KERNEL_TYPES,
    PADDED_KERNEL_SIZE,
    PRESETS,
    REALESRGAN_TRAIN,
    STABLESR_TEST,
    degrade,
    derive_seed,
    gaussian_kernel,
    generalized_gaussian_kernel,
    get_preset,
    kernel_from_params,
    plateau_kernel,
    sample_params,
    sinc_kernel,
    usm_sharpen,
)
from harness.errors import ImageError, UnknownNameError


@pytest.fixture(scope="module")
def hr() -> np.ndarray:
    """A 160 x 192 synthetic photo-like image: smooth gradients, edges and texture."""
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:160, 0:192] / 160.0
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.4 * xx], 2)
    base[40:90, 60:120] = [0.9, 0.2, 0.1]
    base += rng.normal(0, 0.03, base.shape)
    return np.clip(base, 0, 1).astype(np.float32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_gives_identical_bytes_and_params(hr, preset):
    lr_a, params_a = degrade(hr, preset, seed=7)
    lr_b, params_b = degrade(hr, preset, seed=7)
    assert lr_a.dtype == np.uint8
    assert lr_a.tobytes() == lr_b.tobytes()
    assert params_a == params_b


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_different_seeds_give_different_lr(hr, preset):
    outputs = {degrade(hr, preset, seed=s)[0].tobytes() for s in range(4)}
    assert len(outputs) == 4


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("scale", [4, 2])
def test_output_size_is_hr_over_scale(hr, preset, scale):
    lr, params = degrade(hr, preset, seed=1, scale=scale)
    assert lr.shape == (160 // scale, 192 // scale, 3)
    assert params["lr_size"] == [160 // scale, 192 // scale]
    assert params["final"]["resize"]["size"] == [160 // scale, 192 // scale]


def test_same_seed_is_independent_of_torch_thread_count(hr):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = degrade(hr, "stablesr-test", seed=11)[0]
        torch.set_num_threads(2)
        two = degrade(hr, "stablesr-test", seed=11)[0]
    finally:
        torch.set_num_threads(previous)
    assert one.tobytes() == two.tobytes()


def _check_kernel_params(kernel, preset, second):
    sigma = preset.blur_sigma2 if second else preset.blur_sigma
    assert kernel["size"] in preset.kernel_sizes
    if kernel["type"] == "sinc":
        low = math.pi / 3 if kernel["size"] < 13 else math.pi / 5
        assert low <= kernel["omega_c"] <= math.pi
        return
    assert kernel["type"] in KERNEL_TYPES
    assert sigma[0] <= kernel["sigma_x"] <= sigma[1]
    assert sigma[0] <= kernel["sigma_y"] <= sigma[1]
    if "aniso" not in kernel["type"]:
        assert kernel["sigma_x"] == kernel["sigma_y"] and kernel["theta"] == 0.0
    if kernel["type"].startswith("generalized"):
        bounds = preset.betag_range2 if second else preset.betag_range
        assert bounds[0] <= kernel["beta"] <= bounds[1]
    if kernel["type"].startswith("plateau"):
        bounds = preset.betap_range2 if second else preset.betap_range
        assert bounds[0] <= kernel["beta"] <= bounds[1]


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_params_record_every_sampled_value_within_preset_ranges(hr, preset_name):
    preset = get_preset(preset_name)
    for seed in range(6):
        lr, params = degrade(hr, preset_name, seed=seed)
        json.dumps(params)  # JSON-ready
        assert params["preset"] == preset_name and params["seed"] == seed
        assert params["usm_sharpen_gt"] is preset.usm_sharpen_gt
        _check_kernel_params(params["stage1"]["blur"], preset, second=False)
        _check_kernel_params(params["stage2"]["blur"], preset, second=True)
        assert isinstance(params["stage2"]["blur"]["applied"], bool)
        for stage, ranges in (
            ("stage1", (preset.resize_range, preset.noise_range, preset.poisson_scale_range)),
            ("stage2", (preset.resize_range2, preset.noise_range2, preset.poisson_scale_range2)),
        ):
            resize = params[stage]["resize"]
            assert resize["mode"] in ("area", "bilinear", "bicubic")
            assert ranges[0][0] <= resize["factor"] <= ranges[0][1]
            assert {"up": resize["factor"] >= 1, "down": resize["factor"] <= 1}.get(
                resize["direction"], resize["factor"] == 1
            )
            assert len(resize["size"]) == 2 and min(resize["size"]) >= 1
            noise = params[stage]["noise"]
            assert isinstance(noise["gray"], bool)
            if noise["type"] == "gaussian":
                assert ranges[1][0] <= noise["sigma"] <= ranges[1][1]
            else:
                assert noise["type"] == "poisson"
                assert ranges[2][0] <= noise["scale"] <= ranges[2][1]
        for jpeg, bounds in (
            (params["stage1"]["jpeg"], preset.jpeg_range),
            (params["final"]["jpeg"], preset.jpeg_range2),
        ):
            assert bounds[0] <= jpeg["quality_sampled"] <= bounds[1]
            assert jpeg["quality"] == math.floor(jpeg["quality_sampled"] + 0.5)
        assert params["final"]["order"] in ("resize+sinc,jpeg", "jpeg,resize+sinc")
        assert params["final"]["sinc"]["type"] in ("sinc", "pulse")


def test_presets_match_methods_md_section_10():
    s, r = STABLESR_TEST, REALESRGAN_TRAIN
    # 10.1 StableSR
    assert s.usm_sharpen_gt is True
    assert s.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert s.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (s.sinc_prob, s.sinc_prob2, s.final_sinc_prob) == (0.1, 0.1, 0.8)
    assert (s.blur_sigma, s.betag_range, s.betap_range) == ((0.2, 1.5), (0.5, 2.0), (1, 1.5))
    assert (s.blur_sigma2, s.betag_range2, s.betap_range2) == ((0.2, 1.0), (0.5, 2.0), (1, 1.5))
    assert (s.resize_prob, s.resize_range) == ((0.2, 0.7, 0.1), (0.3, 1.5))
    assert (s.gaussian_noise_prob, s.noise_range, s.poisson_scale_range) == (
        0.5,
        (1, 15),
        (0.05, 2.0),
    )
    assert (s.gray_noise_prob, s.jpeg_range) == (0.4, (60, 95))
    assert (s.second_blur_prob, s.resize_prob2, s.resize_range2) == (
        0.5,
        (0.3, 0.4, 0.3),
        (0.6, 1.2),
    )
    assert (s.gaussian_noise_prob2, s.noise_range2, s.poisson_scale_range2) == (
        0.5,
        (1, 12),
        (0.05, 1.0),
    )
    assert (s.gray_noise_prob2, s.jpeg_range2) == (0.4, (60, 100))
    # 10.2 stock Real-ESRGAN (OSEDiff training)
    assert r.usm_sharpen_gt is False
    assert (r.resize_prob, r.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (r.noise_range, r.poisson_scale_range, r.gray_noise_prob, r.jpeg_range) == (
        (1, 30),
        (0.05, 3.0),
        0.4,
        (30, 95),
    )
    assert (r.second_blur_prob, r.resize_prob2, r.resize_range2) == (
        0.8,
        (0.3, 0.4, 0.3),
        (0.3, 1.2),
    )
    assert (r.noise_range2, r.poisson_scale_range2, r.gray_noise_prob2, r.jpeg_range2) == (
        (1, 25),
        (0.05, 2.5),
        0.4,
        (30, 95),
    )
    assert (r.blur_sigma, r.betag_range, r.betap_range, r.blur_sigma2) == (
        (0.2, 3),
        (0.5, 4),
        (1, 2),
        (0.2, 1.5),
    )
    assert r.final_sinc_prob == 0.8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.noise_range = (0, 1)  # type: ignore[misc]


def test_sampling_frequencies_follow_the_preset_probabilities():
    preset = REALESRGAN_TRAIN
    kinds, second_blur, final_sinc, gaussian, gray, up_down_keep = (
        Counter(),
        0,
        0,
        0,
        0,
        Counter(),
    )
    draws = 4000
    for seed in range(draws):
        params = sample_params(preset, np.random.Generator(np.random.PCG64(seed)))
        kinds[params["stage1"]["blur"]["type"]] += 1
        second_blur += params["stage2"]["blur"]["applied"]
        final_sinc += params["final"]["sinc"]["type"] == "sinc"
        gaussian += params["stage1"]["noise"]["type"] == "gaussian"
        gray += params["stage1"]["noise"]["gray"]
        up_down_keep[params["stage1"]["resize"]["direction"]] += 1
    tolerance = 4 * math.sqrt(0.25 / draws)  # 4 sigma of a proportion
    assert abs(kinds["sinc"] / draws - 0.1) < tolerance
    for kind, prob in zip(KERNEL_TYPES, preset.kernel_probs, strict=True):
        assert abs(kinds[kind] / draws - 0.9 * prob) < tolerance, kind
    assert abs(second_blur / draws - 0.8) < tolerance
    assert abs(final_sinc / draws - 0.8) < tolerance
    assert abs(gaussian / draws - 0.5) < tolerance
    assert abs(gray / draws - 0.4) < tolerance
    for direction, prob in zip(("up", "down", "keep"), preset.resize_prob, strict=True):
        assert abs(up_down_keep[direction] / draws - prob) < tolerance


def test_kernels_are_normalized_and_shaped():
    iso = gaussian_kernel(21, 2.0, 2.0, 0.0)
    assert iso.shape == (21, 21) and abs(iso.sum() - 1) < 1e-12
    np.testing.assert_allclose(iso, iso.T, atol=1e-15)
    # independent formula for the isotropic Gaussian
    axis = np.arange(21) - 10
    expected = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * 2.0**2))
    np.testing.assert_allclose(iso, expected / expected.sum(), atol=1e-15)
    # generalized Gaussian with beta = 1 is the Gaussian; anisotropic rotated by 90 degrees = swap
    np.testing.assert_allclose(
        generalized_gaussian_kernel(15, 1.3, 2.1, 0.4, 1.0), gaussian_kernel(15, 1.3, 2.1, 0.4)
    )
    np.testing.assert_allclose(
        gaussian_kernel(15, 1.0, 3.0, math.pi / 2), gaussian_kernel(15, 3.0, 1.0, 0.0), atol=1e-12
    )
    plateau = plateau_kernel(21, 2.0, 2.0, 0.0, 1.5)
    assert abs(plateau.sum() - 1) < 1e-12 and plateau.argmax() == 21 * 10 + 10
    sinc = sinc_kernel(13, math.pi / 2)
    assert abs(sinc.sum() - 1) < 1e-12
    assert sinc.min() < 0  # a true sinc has negative lobes
    padded = kernel_from_params({"type": "sinc", "size": 7, "omega_c": 2.0})
    assert padded.shape == (PADDED_KERNEL_SIZE, PADDED_KERNEL_SIZE)
    assert padded[:7].sum() == 0 and abs(padded.sum() - 1) < 1e-12
    pulse = kernel_from_params({"type": "pulse", "size": 21})
    assert pulse.sum() == 1 and pulse[10, 10] == 1


def test_usm_leaves_flat_image_unchanged():
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(usm_sharpen(flat), flat)


def test_derive_seed_is_a_stable_hash():
    expected = int.from_bytes(hashlib.sha256(b"0:0801_00").digest()[:8], "big") & ((1 << 63) - 1)
    assert derive_seed(0, "0801_00") == expected
    assert derive_seed(0, "a") != derive_seed(0, "b")
    assert derive_seed(0, "a") != derive_seed(1, "a")


def test_invalid_inputs_raise_clear_errors(hr):
    with pytest.raises(UnknownNameError, match="stablesr-test"):
        degrade(hr, "stablesr", seed=0)
    with pytest.raises(ImageError, match="H x W x 3"):
        degrade(hr[:, :, 0], "stablesr-test", seed=0)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        degrade(hr * 2, "stablesr-test", seed=0)
    with pytest.raises(ImageError, match="not divisible by scale 4"):
        degrade(hr[:158], "stablesr-test", seed=0)
    with pytest.raises(ImageError, match="too small"):
        degrade(hr[:64, :64], "stablesr-test", seed=0)

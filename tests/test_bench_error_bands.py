"""bench.error_bands: the band split puts smooth error in the low band and pixel noise in the high band."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.error_bands import band_errors, pooled_psnr, y_channel


def test_constant_offset_is_all_low_band():
    hr = np.full((64, 64), 100.0)
    sums = band_errors(hr + 3.0, hr)
    assert sums["low"] == pytest.approx(sums["all"], rel=1e-9)
    assert sums["mid"] == pytest.approx(0.0, abs=1e-9)
    assert sums["high"] == pytest.approx(0.0, abs=1e-9)
    assert sums["pixels"] == 64 * 64
    assert pooled_psnr(sums)["all"] == pytest.approx(10 * math.log10(255.0**2 / 9.0))


def test_checkerboard_error_is_almost_all_high_band():
    hr = np.zeros((64, 64))
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 2.0 - 1.0
    sums = band_errors(hr + checker, hr)
    assert sums["high"] > 0.99 * sums["all"]
    assert sums["low"] < 1e-6 * sums["all"]


def test_y_channel_matches_the_bt601_formula_on_8bit_values():
    image = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]])  # one RGB pixel: 255, 127.5 → 128, 0
    expected = 16.0 + (65.481 * 255 + 128.553 * 128 + 24.966 * 0) / 255.0
    assert y_channel(image)[0, 0] == pytest.approx(expected)

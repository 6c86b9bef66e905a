"""Independent numpy reference for Y-channel PSNR and SSIM (BasicSR / MATLAB formulas).

Written from the published formulas, not from pyiqa's code, so the tests can check that qbench's
pyiqa-backed ``psnr`` / ``ssim`` compute what the super-resolution papers report.

Formulas:

* **Y channel** (ITU-R BT.601 "studio swing", as MATLAB ``rgb2ycbcr`` and BasicSR
  ``rgb2ycbcr(img, y_only=True)``): for RGB in [0, 1],
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` on the 0..255 scale.
  MATLAB applies this to ``uint8`` images and returns ``uint8``, i.e. **rounds** Y to an integer;
  BasicSR works on floats and does **not** round. ``round_y`` selects the convention.
* **PSNR**: ``10 log10(255^2 / MSE)`` over all pixels of the Y channel (crop border 0).
  ``eps`` is added to the MSE on the [0, 1] scale (pyiqa adds ``1e-8``; BasicSR adds nothing).
* **SSIM** (Wang et al. 2004, MATLAB ``ssim_index``): 11x11 Gaussian window with sigma 1.5
  normalised to sum 1, ``valid`` filtering (no padding), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with
  ``L = 255``, mean of the SSIM map. Options: ``downsample`` = average ``f x f`` blocks with
  ``f = max(1, round(min(H, W) / 256))`` before filtering (the rule of Wang's ``ssim.m``, here with
  non-overlapping blocks and trailing rows/columns dropped); ``clip_negative_cs`` clamps the contrast-
  structure term at 0 before the product.
"""

from __future__ import annotations

import math

import numpy as np

Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def y_channel_255(rgb01: np.ndarray, *, round_y: bool) -> np.ndarray:
    """H x W x 3 RGB in [0, 1] -> H x W luma on the 0..255 scale (float64)."""
    rgb = np.asarray(rgb01, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected H x W x 3, got {rgb.shape}")
    y = 16.0 + rgb[..., 0] * Y_WEIGHTS[0] + rgb[..., 1] * Y_WEIGHTS[1] + rgb[..., 2] * Y_WEIGHTS[2]
    if round_y:
        # MATLAB's uint8 output: round half away from zero (values are positive, so half up).
        y = np.floor(y + 0.5)
    return y


def psnr_y(sr01: np.ndarray, hr01: np.ndarray, *, eps: float = 0.0, round_y: bool = False) -> float:
    """Y-channel PSNR in dB; ``eps`` is added to the MSE measured on the [0, 1] scale."""
    if sr01.shape != hr01.shape:
        raise ValueError(f"shape mismatch {sr01.shape} vs {hr01.shape}")
    y_sr = y_channel_255(sr01, round_y=round_y) / 255.0
    y_hr = y_channel_255(hr01, round_y=round_y) / 255.0
    mse = float(np.mean((y_sr - y_hr) ** 2))
    return 10.0 * math.log10(1.0 / (mse + eps))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 2-D Gaussian, as MATLAB ``fspecial('gaussian', size, sigma)``."""
    half = (size - 1) / 2.0
    coords = np.arange(size, dtype=np.float64) - half
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2.0 * sigma * sigma))
    g[g < np.finfo(np.float64).eps * g.max()] = 0.0
    return g / g.sum()


def filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlation of a 2-D image with a window, keeping only fully covered positions."""
    patches = np.lib.stride_tricks.sliding_window_view(image, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window, optimize=True)


def block_average(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of non-overlapping ``factor x factor`` blocks; incomplete trailing blocks dropped."""
    h, w = image.shape
    hh, ww = h // factor, w // factor
    trimmed = image[: hh * factor, : ww * factor]
    return trimmed.reshape(hh, factor, ww, factor).mean(axis=(1, 3))


def ssim_gray(
    a: np.ndarray,
    b: np.ndarray,
    *,
    data_range: float = 255.0,
    downsample: bool = False,
    clip_negative_cs: bool = False,
) -> float:
    """SSIM of two single-channel images on the ``data_range`` scale."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if downsample:
        factor = max(1, round(min(a.shape) / 256))
        if factor > 1:
            a, b = block_average(a, factor), block_average(b, factor)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    win = gaussian_window(11, 1.5)
    mu_a = filter_valid(a, win)
    mu_b = filter_valid(b, win)
    var_a = filter_valid(a * a, win) - mu_a**2
    var_b = filter_valid(b * b, win) - mu_b**2
    cov_ab = filter_valid(a * b, win) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    contrast_structure = (2 * cov_ab + c2) / (var_a + var_b + c2)
    if clip_negative_cs:
        contrast_structure = np.maximum(contrast_structure, 0.0)
    return float(np.mean(luminance * contrast_structure))


def ssim_y(
    sr01: np.ndarray,
    hr01: np.ndarray,
    *,
    round_y: bool = True,
    downsample: bool = False,
    clip_negative_cs: bool = False,
) -> float:
    """Y-channel SSIM of two H x W x 3 RGB images in [0, 1]."""
    return ssim_gray(
        y_channel_255(sr01, round_y=round_y),
        y_channel_255(hr01, round_y=round_y),
        downsample=downsample,
        clip_negative_cs=clip_negative_cs,
    )


def negative_cs_fraction(sr01: np.ndarray, hr01: np.ndarray, *, round_y: bool = True) -> float:
    """Fraction of SSIM-map positions whose contrast-structure term is negative (diagnostic)."""
    a = y_channel_255(sr01, round_y=round_y)
    b = y_channel_255(hr01, round_y=round_y)
    c2 = (0.03 * 255.0) ** 2
    win = gaussian_window(11, 1.5)
    mu_a, mu_b = filter_valid(a, win), filter_valid(b, win)
    var_a = filter_valid(a * a, win) - mu_a**2
    var_b = filter_valid(b * b, win) - mu_b**2
    cov_ab = filter_valid(a * b, win) - mu_a * mu_b
    cs = (2 * cov_ab + c2) / (var_a + var_b + c2)
    return float(np.mean(cs < 0))

"""Real-ESRGAN-style second-order degradation, seeded per image, written in numpy/torch.

Reference behaviour (Wang et al., "Real-ESRGAN", ICCVW 2021; BasicSR ``degradations.py`` and
``RealESRGANModel.feed_data``; StableSR ``LatentDiffusionSRTextWT``; OSEDiff
``dataloaders/realesrgan.py``), re-implemented here without BasicSR:

1. optional USM sharpening of the HR image (StableSR ``use_usm: True``; OSEDiff has it commented out);
2. first order: blur with ``kernel1`` -> random resize (up/down/keep, mode area/bilinear/bicubic,
   ``scale_factor``) -> Gaussian or Poisson noise (colour or gray) -> clamp -> JPEG;
3. second order: blur with ``kernel2`` with probability ``second_blur_prob`` -> random resize to
   ``(int(H/scale*f), int(W/scale*f))`` -> noise -> then, in random order (50/50),
   ``[resize to (H//scale, W//scale) + final sinc filter]`` and JPEG;
4. clamp and quantize to uint8.

Kernels: size uniform over {7, 9, ..., 21}; with probability ``sinc_prob`` a circular low-pass
(sinc) kernel with cut-off ``omega_c`` uniform in [pi/3, pi] (size < 13) or [pi/5, pi]; otherwise one
of iso/aniso Gaussian, generalized Gaussian (``exp(-0.5 q^beta)``), plateau (``1/(q^beta + 1)``) with
``q = x^T Sigma^-1 x``; beta is drawn from [beta_min, 1] or [1, beta_max] with equal probability;
every kernel is zero-padded to 21 x 21. The final sinc kernel (probability ``final_sinc_prob``,
otherwise a pulse) has a size drawn from the same range and ``omega_c`` in [pi/3, pi], padded to 21
(methods.md's "size 21" is read as this padded size, as in the reference code). Filtering pads with
reflection and correlates each channel (BasicSR ``filter2D``).

Deviations from the reference, all deliberate and recorded in the parameters:

- JPEG uses Pillow's libjpeg with an integer quality (the sampled float quality rounded half-up,
  both recorded), 4:2:0 chroma subsampling, on the image quantized to uint8; the reference uses the
  differentiable-JPEG module of BasicSR (``DiffJPEG``) on float input with a float quality.
- All random numbers come from numpy ``PCG64`` generators seeded from ``seed`` (two independent
  streams: one for the parameters, one for the noise fields), not from Python's ``random``,
  numpy's global state and ``torch.rand``. The same seed gives byte-identical output; the random
  *values* differ from any BasicSR run.
- The final quantization is round-half-up (``harness.images.to_uint8``) instead of ``torch.round``
  (half to even); they differ only on exact .5 values.
- No random crop, flip, gray conversion or colour jitter (OSEDiff's training loader has a random
  horizontal flip; here the caller decides the crop, and ``gray_prob``/``color_jitter_prob`` are 0 in
  both presets). StableSR's training-only ``no_degradation_prob`` (0.01) is not applied.
- The input must be at least 128 px per side and divisible by ``scale`` (the reference crops to
  ``gt_size`` first); nothing is cropped silently here.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import special

from harness.errors import ImageError, UnknownNameError
from harness.images import to_uint8

DEGRADATION_VERSION = "1"
"""Bumped whenever the algorithm changes in a way that changes output bytes (part of cache keys)."""

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
KERNEL_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)
RESIZE_MODES = ("area", "bilinear", "bicubic")
PADDED_KERNEL_SIZE = 21
USM_RADIUS = 50  # BasicSR USMSharp: 51-tap Gaussian, sigma from OpenCV's rule = 8.0
USM_WEIGHT = 0.5
USM_THRESHOLD = 10
MIN_HR_SIDE = 128


@dataclass(frozen=True)
class DegradationPreset:
    """Every setting of the second-order pipeline; values are from the cited configs."""

    name: str
    reference: str
    usm_sharpen_gt: bool
    # kernels of the first and second blur
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    kernel_types2: tuple[str, ...] = KERNEL_TYPES
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    # first degradation
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    resize_modes: tuple[str, ...] = field(default=RESIZE_MODES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


STABLESR_TEST = DegradationPreset(
    name="stablesr-test",
    reference=(
        "methods.md 10.1: StableSR configs/stableSRNew/v2-finetune_text_T_512.yaml (degradation + "
        "dataset kernel settings), use_usm: True"
    ),
    usm_sharpen_gt=True,
    blur_sigma=(0.2, 1.5),
    betag_range=(0.5, 2.0),
    betap_range=(1.0, 1.5),
    blur_sigma2=(0.2, 1.0),
    betag_range2=(0.5, 2.0),
    betap_range2=(1.0, 1.5),
    resize_range=(0.3, 1.5),
    noise_range=(1.0, 15.0),
    poisson_scale_range=(0.05, 2.0),
    jpeg_range=(60.0, 95.0),
    second_blur_prob=0.5,
    resize_range2=(0.6, 1.2),
    noise_range2=(1.0, 12.0),
    poisson_scale_range2=(0.05, 1.0),
    jpeg_range2=(60.0, 100.0),
)

REALESRGAN_TRAIN = DegradationPreset(
    name="realesrgan-train",
    reference=(
        "methods.md 10.2: stock Real-ESRGAN as in OSEDiff dataloaders/params_realesrgan.yml "
        "(USM sharpening commented out in OSEDiff's loader)"
    ),
    usm_sharpen_gt=False,
)

PRESETS: dict[str, DegradationPreset] = {p.name: p for p in (STABLESR_TEST, REALESRGAN_TRAIN)}


def get_preset(name: str) -> DegradationPreset:
    """The named preset; :class:`UnknownNameError` with close matches otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError("degradation preset", name, list(PRESETS)) from None


def derive_seed(base_seed: int, name: str) -> int:
    """Per-image seed from ``(base_seed, name)`` by SHA-256 (stable across runs and machines).

    Python's ``hash()`` is salted per process and must not be used for this.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """``q = x^T Sigma^-1 x`` on a centred ``size x size`` grid, Sigma = R diag(sx^2, sy^2) R^T."""
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    rotation = np.array([[cos_t, -sin_t], [sin_t, cos_t]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    inverse = np.linalg.inv(covariance)
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(axis, axis)
    return (
        inverse[0, 0] * xx * xx
        + (inverse[0, 1] + inverse[1, 0]) * xx * yy
        + inverse[1, 1] * yy * yy
    )


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalized bivariate Gaussian ``exp(-q/2)``."""
    kernel = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return kernel / kernel.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Normalized generalized Gaussian ``exp(-0.5 q^beta)`` (beta = 1 is the Gaussian)."""
    kernel = np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta))
    return kernel / kernel.sum()


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """Normalized plateau-shaped kernel ``1 / (q^beta + 1)``."""
    kernel = 1.0 / (np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return kernel / kernel.sum()


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Normalized circular low-pass kernel ``omega_c J1(omega_c r) / (2 pi r)``.

    The centre (r = 0) takes the limit ``omega_c^2 / (4 pi)``.
    """
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(axis, axis)
    radius = np.sqrt(xx * xx + yy * yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = omega_c * special.j1(omega_c * radius) / (2.0 * np.pi * radius)
    centre = (size - 1) // 2
    kernel[centre, centre] = omega_c**2 / (4.0 * np.pi)
    return kernel / kernel.sum()


def pad_kernel(kernel: np.ndarray, size: int = PADDED_KERNEL_SIZE) -> np.ndarray:
    """Zero-pad an odd square kernel symmetrically to ``size x size``."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0:
        raise ValueError(f"kernel of size {kernel.shape[0]} is larger than {size}")
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def kernel_from_params(params: dict[str, Any]) -> np.ndarray:
    """Rebuild the padded 21 x 21 kernel described by a recorded kernel-parameter dict."""
    kind = params["type"]
    size = int(params["size"])
    if kind == "pulse":
        kernel = np.zeros((size, size))
        kernel[size // 2, size // 2] = 1.0
    elif kind == "sinc":
        kernel = sinc_kernel(size, params["omega_c"])
    elif kind in ("iso", "aniso"):
        kernel = gaussian_kernel(size, params["sigma_x"], params["sigma_y"], params["theta"])
    elif kind.startswith("generalized_"):
        kernel = generalized_gaussian_kernel(
            size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"]
        )
    elif kind.startswith("plateau_"):
        kernel = plateau_kernel(
            size, params["sigma_x"], params["sigma_y"], params["theta"], params["beta"]
        )
    else:
        raise ValueError(f"unknown kernel type {kind!r}")
    return pad_kernel(kernel)


# ----------------------------------------------------------------------------------------------
# parameter sampling (pure: depends only on the preset and the generator)
# ----------------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _sample_beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Beta below or above 1 with equal probability (BasicSR's scheme)."""
    if rng.uniform() < 0.5:
        return float(rng.uniform(bounds[0], 1.0))
    return float(rng.uniform(1.0, bounds[1]))


def _sample_blur_kernel(
    rng: np.random.Generator,
    *,
    sizes: tuple[int, ...],
    sinc_prob: float,
    types: tuple[str, ...],
    probs: tuple[float, ...],
    sigma: tuple[float, float],
    betag: tuple[float, float],
    betap: tuple[float, float],
) -> dict[str, Any]:
    size = int(rng.choice(np.asarray(sizes)))
    if rng.uniform() < sinc_prob:
        omega_range = (math.pi / 3, math.pi) if size < 13 else (math.pi / 5, math.pi)
        return {"type": "sinc", "size": size, "omega_c": _uniform(rng, omega_range)}
    weights = np.asarray(probs, dtype=np.float64)
    kind = str(types[int(rng.choice(len(types), p=weights / weights.sum()))])
    sigma_x = _uniform(rng, sigma)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = _uniform(rng, sigma)
        theta = _uniform(rng, (-math.pi, math.pi))
    params: dict[str, Any] = {
        "type": kind,
        "size": size,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
    }
    if kind.startswith("generalized_"):
        params["beta"] = _sample_beta(rng, betag)
    elif kind.startswith("plateau_"):
        params["beta"] = _sample_beta(rng, betap)
    return params


def _sample_resize(
    rng: np.random.Generator, probs: tuple[float, float, float], bounds: tuple[float, float]
) -> dict[str, Any]:
    weights = np.asarray(probs, dtype=np.float64)
    direction = ("up", "down", "keep")[int(rng.choice(3, p=weights / weights.sum()))]
    if direction == "up":
        factor = _uniform(rng, (1.0, bounds[1]))
    elif direction == "down":
        factor = _uniform(rng, (bounds[0], 1.0))
    else:
        factor = 1.0
    mode = str(RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))])
    return {"direction": direction, "factor": factor, "mode": mode}


def _sample_noise(
    rng: np.random.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> dict[str, Any]:
    if rng.uniform() < gaussian_prob:
        params: dict[str, Any] = {"type": "gaussian", "sigma": _uniform(rng, sigma_range)}
    else:
        params = {"type": "poisson", "scale": _uniform(rng, poisson_range)}
    params["gray"] = bool(rng.uniform() < gray_prob)
    return params


def _sample_jpeg(rng: np.random.Generator, bounds: tuple[float, float]) -> dict[str, Any]:
    sampled = _uniform(rng, bounds)
    quality = int(min(100, max(1, math.floor(sampled + 0.5))))
    return {"quality_sampled": sampled, "quality": quality}


def sample_params(preset: DegradationPreset, rng: np.random.Generator) -> dict[str, Any]:
    """Draw every random choice of the pipeline, in a fixed documented order.

    Order: kernel1, kernel2, final sinc kernel (as the reference samples kernels in the data
    loader), then stage 1 (resize, noise, JPEG), stage 2 (blur on/off, resize, noise), and the final
    stage (order, resize mode, JPEG). Sizes are filled in by :func:`apply_degradation`.
    """
    kernel1 = _sample_blur_kernel(
        rng,
        sizes=preset.kernel_sizes,
        sinc_prob=preset.sinc_prob,
        types=preset.kernel_types,
        probs=preset.kernel_probs,
        sigma=preset.blur_sigma,
        betag=preset.betag_range,
        betap=preset.betap_range,
    )
    kernel2 = _sample_blur_kernel(
        rng,
        sizes=preset.kernel_sizes,
        sinc_prob=preset.sinc_prob2,
        types=preset.kernel_types2,
        probs=preset.kernel_probs2,
        sigma=preset.blur_sigma2,
        betag=preset.betag_range2,
        betap=preset.betap_range2,
    )
    if rng.uniform() < preset.final_sinc_prob:
        size = int(rng.choice(np.asarray(preset.kernel_sizes)))
        final_kernel: dict[str, Any] = {
            "type": "sinc",
            "size": size,
            "omega_c": _uniform(rng, (math.pi / 3, math.pi)),
        }
    else:
        final_kernel = {"type": "pulse", "size": PADDED_KERNEL_SIZE}

    stage1 = {
        "blur": kernel1,
        "resize": _sample_resize(rng, preset.resize_prob, preset.resize_range),
        "noise": _sample_noise(
            rng,
            preset.gaussian_noise_prob,
            preset.noise_range,
            preset.poisson_scale_range,
            preset.gray_noise_prob,
        ),
        "jpeg": _sample_jpeg(rng, preset.jpeg_range),
    }
    kernel2["applied"] = bool(rng.uniform() < preset.second_blur_prob)
    stage2 = {
        "blur": kernel2,
        "resize": _sample_resize(rng, preset.resize_prob2, preset.resize_range2),
        "noise": _sample_noise(
            rng,
            preset.gaussian_noise_prob2,
            preset.noise_range2,
            preset.poisson_scale_range2,
            preset.gray_noise_prob2,
        ),
    }
    order = "resize+sinc,jpeg" if rng.uniform() < 0.5 else "jpeg,resize+sinc"
    final = {
        "order": order,
        "resize": {"mode": str(RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))])},
        "sinc": final_kernel,
        "jpeg": _sample_jpeg(rng, preset.jpeg_range2),
    }
    return {"stage1": stage1, "stage2": stage2, "final": final}


# ----------------------------------------------------------------------------------------------
# operations on 1 x 3 x H x W float32 tensors
# ----------------------------------------------------------------------------------------------


def filter2d(image: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Correlate every channel with ``kernel`` after reflection padding (BasicSR ``filter2D``)."""
    size = kernel.shape[0]
    pad = size // 2
    _, channels, height, width = image.shape
    if min(height, width) <= pad:
        raise ImageError(
            f"image of {width}x{height} px is too small for a {size}x{size} reflection-padded filter"
        )
    weight = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))
    weight = weight.view(1, 1, size, size).expand(channels, 1, size, size)
    padded = F.pad(image, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight, groups=channels)


def _separable_filter(image: torch.Tensor, taps: np.ndarray) -> torch.Tensor:
    """Reflection-padded separable filtering with the 1-D ``taps`` along both axes."""
    size = taps.shape[0]
    pad = size // 2
    channels = image.shape[1]
    weight = torch.from_numpy(np.ascontiguousarray(taps, dtype=np.float32))
    padded = F.pad(image, (pad, pad, pad, pad), mode="reflect")
    horizontal = F.conv2d(
        padded, weight.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels
    )
    return F.conv2d(
        horizontal, weight.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels
    )


def usm_sharpen(image: torch.Tensor) -> torch.Tensor:
    """Unsharp masking as BasicSR ``USMSharp`` (radius 50, weight 0.5, threshold 10).

    The 51 x 51 Gaussian (sigma 8.0 from OpenCV's ``0.3*((k-1)/2 - 1) + 0.8`` rule) is applied as
    two 1-D passes, which is mathematically identical and 25x cheaper.
    """
    size = 2 * USM_RADIUS + 1
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(axis**2) / (2 * sigma**2))
    taps /= taps.sum()
    blurred = _separable_filter(image, taps)
    residual = image - blurred
    mask = (residual.abs() * 255 > USM_THRESHOLD).to(image.dtype)
    soft_mask = _separable_filter(mask, taps)
    sharp = torch.clamp(image + USM_WEIGHT * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str, scale: float | None = None):
    kwargs: dict[str, Any] = {"mode": mode}
    if mode != "area":
        kwargs["align_corners"] = False
    if scale is not None:
        return F.interpolate(image, scale_factor=scale, **kwargs)
    return F.interpolate(image, size=size, **kwargs)


def _add_noise(
    image: torch.Tensor, params: dict[str, Any], rng: np.random.Generator
) -> torch.Tensor:
    """Gaussian (``sigma/255``) or Poisson noise, colour or gray, then clip to [0, 1]."""
    _, _, height, width = image.shape
    pixels = image[0].double().numpy()
    if params["type"] == "gaussian":
        shape = (1, height, width) if params["gray"] else (3, height, width)
        noise = rng.standard_normal(shape) * (params["sigma"] / 255.0)
    else:
        if params["gray"]:  # torchvision rgb_to_grayscale weights
            source = (0.2989 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2])[None]
        else:
            source = pixels
        source = np.clip(np.round(source * 255.0), 0, 255) / 255.0
        levels = len(np.unique(source))
        vals = 2.0 ** math.ceil(math.log2(levels)) if levels > 1 else 1.0
        params["poisson_levels"] = float(vals)
        noise = (rng.poisson(source * vals) / vals - source) * params["scale"]
    noisy = np.clip(pixels + noise, 0.0, 1.0)  # a gray (1-channel) noise broadcasts to RGB
    return torch.from_numpy(noisy.astype(np.float32))[None]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip through Pillow JPEG (4:2:0) at an integer quality."""
    pixels = to_uint8(torch.clamp(image, 0, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].contiguous()


def apply_degradation(
    hr: np.ndarray, params: dict[str, Any], noise_rng: np.random.Generator, scale: int
) -> np.ndarray:
    """Run the pipeline described by ``params`` on ``hr``; fills in the sizes; returns uint8 LR."""
    height, width = hr.shape[:2]
    image = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        if params["usm_sharpen_gt"]:
            image = usm_sharpen(image)
        # first degradation
        stage1 = params["stage1"]
        image = filter2d(image, kernel_from_params(stage1["blur"]))
        resize1 = stage1["resize"]
        image = _resize(image, (0, 0), resize1["mode"], scale=resize1["factor"])
        resize1["size"] = [int(image.shape[2]), int(image.shape[3])]
        image = _add_noise(image, stage1["noise"], noise_rng)
        image = _jpeg(image, stage1["jpeg"]["quality"])
        # second degradation
        stage2 = params["stage2"]
        if stage2["blur"]["applied"]:
            image = filter2d(image, kernel_from_params(stage2["blur"]))
        resize2 = stage2["resize"]
        size2 = (
            max(1, int(height / scale * resize2["factor"])),
            max(1, int(width / scale * resize2["factor"])),
        )
        image = _resize(image, size2, resize2["mode"])
        resize2["size"] = list(size2)
        image = _add_noise(image, stage2["noise"], noise_rng)
        # final: [resize back + sinc] and JPEG in the sampled order
        final = params["final"]
        lr_size = (height // scale, width // scale)
        final["resize"]["size"] = list(lr_size)
        final_kernel = kernel_from_params(final["sinc"])
        if final["order"] == "resize+sinc,jpeg":
            image = _resize(image, lr_size, final["resize"]["mode"])
            image = filter2d(image, final_kernel)
            image = _jpeg(image, final["jpeg"]["quality"])
        else:
            image = _jpeg(image, final["jpeg"]["quality"])
            image = _resize(image, lr_size, final["resize"]["mode"])
            image = filter2d(image, final_kernel)
        image = torch.clamp(image, 0, 1)
    return to_uint8(image)


def degrade(
    hr: np.ndarray, preset: str, seed: int, scale: int = 4
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade an HR image (float32 ``H x W x 3`` in [0, 1]) into a uint8 LR of ``(H/scale, W/scale)``.

    Returns ``(lr, params)`` where ``params`` is a JSON-ready record of every sampled value (kernel
    types, sizes, sigmas, betas, cut-offs; resize directions, factors, modes and sizes; noise types,
    levels and gray flags; JPEG qualities; the final order) plus the preset name, seed, scale and
    :data:`DEGRADATION_VERSION`. The same ``(hr, preset, seed, scale)`` gives byte-identical output.
    Use :func:`derive_seed` for per-image seeds.
    """
    settings = get_preset(preset)
    if not isinstance(hr, np.ndarray) or hr.ndim != 3 or hr.shape[2] != 3:
        raise ImageError(
            f"degrade expects an H x W x 3 array, got {getattr(hr, 'shape', type(hr))}"
        )
    if not np.isfinite(hr).all() or hr.min() < 0.0 or hr.max() > 1.0:
        raise ImageError("degrade expects finite values in [0, 1]")
    if int(scale) != scale or scale < 1:
        raise ImageError(f"scale must be a positive integer, got {scale!r}")
    height, width = hr.shape[:2]
    min_side = max(MIN_HR_SIDE, PADDED_KERNEL_SIZE * scale)
    if min(height, width) < min_side:
        raise ImageError(
            f"HR of {width}x{height} px is too small for the degradation (each side must be at "
            f"least {min_side} px)"
        )
    if height % scale or width % scale:
        raise ImageError(
            f"HR of {width}x{height} px is not divisible by scale {scale}; crop it first "
            "(nothing is cropped silently)"
        )
    param_seq, noise_seq = np.random.SeedSequence(int(seed)).spawn(2)
    params = sample_params(settings, np.random.Generator(np.random.PCG64(param_seq)))
    params = {
        "preset": settings.name,
        "degradation_version": DEGRADATION_VERSION,
        "seed": int(seed),
        "scale": int(scale),
        "hr_size": [int(height), int(width)],
        "usm_sharpen_gt": settings.usm_sharpen_gt,
        **params,
    }
    lr = apply_degradation(hr, params, np.random.Generator(np.random.PCG64(noise_seq)), int(scale))
    params["lr_size"] = [int(lr.shape[0]), int(lr.shape[1])]
    return lr, params

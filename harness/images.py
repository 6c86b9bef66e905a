"""Decoding and validating image files, with every conversion explicit and recorded.

One entry point, :func:`load_image`, turns an image file into a float32 ``H x W x 3`` RGB array in
[0, 1] and returns, next to the pixels, the list of conversions it applied. Nothing is resized,
cropped or re-ordered here: pairing and the HR crop policy live in :mod:`harness.datasets`.

Reference behaviour: OSEDiff's scorer and BasicSR read images with ``cv2.imread`` (8-bit, BGR ->
RGB, ``/255``), pyiqa with PIL ``.convert('RGB')``. For 8-bit RGB files all three give the same
values ``k/255``. Deviations, all deliberate:

- 16-bit PNGs are decoded at full precision (``k/65535``) with OpenCV, because Pillow silently
  truncates 16-bit RGB/RGBA PNGs to 8 bits (checked with Pillow 13) and ``cv2.imread`` without
  ``IMREAD_UNCHANGED`` does the same. The conversion is recorded.
- Grayscale (``L``, ``I;16``) is replicated to three channels; alpha (``RGBA``, ``LA``, ``PA``,
  palette transparency) is dropped, not composited; palette images are expanded; ``CMYK`` uses
  Pillow's conversion (no ICC colour management). Each of these is recorded in
  :attr:`LoadedImage.conversions`.
- ICC profiles are ignored (as by cv2 and PIL). An EXIF orientation tag other than 1 is *not*
  applied (pixels are used as stored, like PIL and unlike ``cv2.imread``); its presence is recorded.

Limits, checked from the header before any pixel data is decoded:

- :data:`MAX_PIXELS` = 40,000,000 pixels (e.g. 8000 x 5000; a full DIV2K image is 2040 x 1356 =
  2.8 MP, a RealSR HR about 6 MP). Larger images are refused with :class:`ImageError`: one float32
  copy of such an image is 480 MB and a one-step diffusion model would need hours on CPU.
- :data:`MIN_SIDE` = 4 pixels: smaller images (e.g. 1 x 1) cannot be a meaningful SR input or
  target and are refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from harness.errors import DivergedError, ImageError

MAX_PIXELS: int = 40_000_000
"""Largest accepted image (width x height), checked from the header before decoding."""

MIN_SIDE: int = 4
"""Smallest accepted width or height."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG IHDR colour types (PNG spec, section 11.2.2).
_PNG_COLOR_TYPES = {0: "I;16", 2: "RGB;16", 4: "LA;16", 6: "RGBA;16"}


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: float32 RGB pixels in [0, 1] plus how they were obtained.

    ``array`` is ``H x W x 3`` float32 with values ``k/255`` (8-bit sources) or ``k/65535``
    (16-bit sources). ``source_mode`` is the file's pixel mode: Pillow's mode name for 8-bit files
    (``"RGB"``, ``"RGBA"``, ``"P"``, ``"L"``, ``"CMYK"`` ...) and ``"I;16"``, ``"LA;16"``,
    ``"RGB;16"`` or ``"RGBA;16"`` for 16-bit PNGs. ``conversions`` lists every explicit conversion
    applied, e.g. ``"RGBA->RGB (alpha dropped)"``; it is empty for a plain 8-bit RGB file.
    """

    path: Path
    array: np.ndarray
    source_mode: str
    bit_depth: int
    conversions: tuple[str, ...]

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])


def _open_header(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` with Pillow (header only) and check the documented size limits."""
    if not path.exists():
        raise ImageError(f"{path}: file does not exist")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is stricter; Pillow's bomb warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{path}: image is larger than the limit of {max_pixels:,} pixels ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        head = path.read_bytes()[:16]
        raise ImageError(
            f"{path}: not a readable image (unrecognised format; first bytes {head!r})"
        ) from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image header ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (harness.images.MAX_PIXELS); refused before decoding"
        )
    if min(width, height) < MIN_SIDE:
        image.close()
        raise ImageError(
            f"{path}: {width}x{height} is too small (each side must be at least {MIN_SIDE} px)"
        )
    return image


def image_size(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only.

    Raises :class:`ImageError` naming the file if it is missing, empty, not an image, smaller than
    :data:`MIN_SIDE` or larger than ``max_pixels``.
    """
    path = Path(path)
    image = _open_header(path, max_pixels)
    try:
        return image.size
    finally:
        image.close()


def _png_ihdr(path: Path) -> tuple[int, int] | None:
    """``(bit_depth, colour_type)`` from a PNG's IHDR chunk, or None if not a PNG."""
    with path.open("rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _verify_png(path: Path) -> None:
    """Walk all PNG chunks and check their CRCs (catches truncated and corrupted files)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # Pillow raises SyntaxError, OSError, struct.error ...
        raise ImageError(
            f"{path}: corrupted or truncated PNG ({type(exc).__name__}: {exc})"
        ) from exc


def _decode_png16(path: Path, colour_type: int) -> tuple[np.ndarray, str, list[str]]:
    """Decode a 16-bit PNG at full precision with OpenCV; return RGB float32 and conversions."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        raise ImageError(f"{path}: cannot decode 16-bit PNG (OpenCV returned no 16-bit image)")
    mode = _PNG_COLOR_TYPES.get(colour_type, f"PNG16-type{colour_type}")
    scaled = decoded.astype(np.float32) / np.float32(65535.0)
    conversions: list[str] = []
    if scaled.ndim == 2:
        rgb = np.repeat(scaled[:, :, None], 3, axis=2)
        conversions.append(f"{mode}->RGB (16-bit gray scaled by 1/65535, replicated to 3 channels)")
    elif scaled.shape[2] == 2:
        rgb = np.repeat(scaled[:, :, :1], 3, axis=2)
        conversions.append(
            f"{mode}->RGB (16-bit gray scaled by 1/65535, alpha dropped, replicated to 3 channels)"
        )
    elif scaled.shape[2] == 3:
        rgb = scaled[:, :, ::-1]
        conversions.append(f"{mode}->RGB (16-bit scaled by 1/65535)")
    elif scaled.shape[2] == 4:  # BGRA; OpenCV may also expand gray+alpha to BGRA
        rgb = scaled[:, :, 2::-1]
        gray = " gray" if colour_type == 4 else ""
        conversions.append(f"{mode}->RGB (16-bit{gray} scaled by 1/65535, alpha dropped)")
    else:
        raise ImageError(f"{path}: unsupported 16-bit PNG with {scaled.shape[2]} channels")
    return np.ascontiguousarray(rgb, dtype=np.float32), mode, conversions


def _decode_pil(image: Image.Image, path: Path) -> tuple[np.ndarray, int, list[str]]:
    """Decode an opened Pillow image to RGB float32; return array, bit depth and conversions."""
    mode = image.mode
    conversions: list[str] = []
    if mode == "RGB":
        rgb8 = np.asarray(image)
    elif mode == "RGBA":
        rgb8 = np.asarray(image)[:, :, :3]
        conversions.append("RGBA->RGB (alpha dropped)")
    elif mode == "L":
        gray = np.asarray(image)
        rgb8 = np.repeat(gray[:, :, None], 3, axis=2)
        conversions.append("L->RGB (gray replicated to 3 channels)")
    elif mode == "LA":
        gray = np.asarray(image)[:, :, 0]
        rgb8 = np.repeat(gray[:, :, None], 3, axis=2)
        conversions.append("LA->RGB (alpha dropped, gray replicated to 3 channels)")
    elif mode == "1":
        rgb8 = np.asarray(image.convert("RGB"))
        conversions.append("1->RGB (bilevel expanded to 0/255)")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        rgb8 = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))[:, :, :3]
        detail = "palette expanded, alpha dropped" if has_alpha else "palette expanded"
        conversions.append(f"{mode}->RGB ({detail})")
    elif mode == "CMYK":
        rgb8 = np.asarray(image.convert("RGB"))
        conversions.append("CMYK->RGB (Pillow conversion, no ICC colour management)")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = np.asarray(image).astype(np.float32) / np.float32(65535.0)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        conversions.append(f"{mode}->RGB (16-bit gray scaled by 1/65535, replicated to 3 channels)")
        return np.ascontiguousarray(rgb), 16, conversions
    elif mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(
                f"{path}: 32-bit integer image with values outside [0, 65535] is not supported"
            )
        gray = values.astype(np.float32) / np.float32(65535.0)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        conversions.append("I->RGB (integer gray read as 16-bit, scaled by 1/65535, replicated)")
        return np.ascontiguousarray(rgb), 16, conversions
    else:
        raise ImageError(
            f"{path}: unsupported pixel mode {mode!r} (supported: RGB, RGBA, L, LA, 1, P, PA, "
            "CMYK, I;16 and 16-bit PNG)"
        )
    rgb = np.ascontiguousarray(rgb8, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return rgb, 8, conversions


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Decode an image file to float32 RGB in [0, 1], recording every conversion.

    Checks, in order: the file exists and is not empty; the header is a known image format; the
    size is within :data:`MIN_SIDE` and ``max_pixels`` (before decoding); PNG chunk CRCs (catches
    truncation); then decodes. Any failure raises :class:`ImageError` naming the file and the
    problem. See the module docstring for the conversions and the reference behaviour.
    """
    path = Path(path)
    image = _open_header(path, max_pixels)
    try:
        conversions: list[str] = []
        ihdr = _png_ihdr(path) if image.format == "PNG" else None
        if ihdr is not None:
            _verify_png(path)
        if ihdr is not None and ihdr[0] == 16:
            array, mode, extra = _decode_png16(path, ihdr[1])
            bit_depth = 16
        else:
            mode = image.mode
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise ImageError(
                    f"{path}: refusing to decode while PIL.ImageFile.LOAD_TRUNCATED_IMAGES is "
                    "True (another library enabled it); truncated files would load silently"
                )
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImageError(f"{path}: cannot decode image data ({exc})") from exc
            array, bit_depth, extra = _decode_pil(image, path)
            orientation = image.getexif().get(0x0112)
            if orientation not in (None, 1):
                conversions.append(
                    f"EXIF orientation {orientation} ignored (pixels used as stored, not rotated)"
                )
        conversions.extend(extra)
    finally:
        image.close()
    if array.shape[2] != 3 or not np.isfinite(array).all():
        raise ImageError(f"{path}: decoded to an invalid array of shape {array.shape}")
    return LoadedImage(
        path=path,
        array=array,
        source_mode=mode,
        bit_depth=bit_depth,
        conversions=tuple(conversions),
    )


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` array in [0, 1] -> ``1 x 3 x H x W`` float32 tensor (a copy)."""
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3:
        shape = getattr(array, "shape", None)
        raise ValueError(f"to_tensor expects an H x W x 3 numpy array, got shape {shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
    return tensor.permute(2, 0, 1).unsqueeze(0).contiguous()


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float image in [0, 1] -> ``H x W x 3`` uint8, computing ``floor(clamp(x, 0, 1)*255 + 0.5)``.

    Accepts a numpy ``H x W x 3`` array or a tensor ``1 x 3 x H x W`` / ``3 x H x W``. A uint8
    numpy array is returned as a copy. Round-half-up differs from ``torch.round`` (half to even)
    only on exact .5 values. NaN or Inf raises :class:`DivergedError`.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float64)
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(
                    f"to_uint8 expects a batch of one image, got shape {tuple(t.shape)}"
                )
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"to_uint8 expects a 3 x H x W tensor, got shape {tuple(x.shape)}")
        values = t.permute(1, 2, 0).numpy()
    elif isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"to_uint8 expects an H x W x 3 array, got shape {x.shape}")
        if x.dtype == np.uint8:
            return x.copy()
        values = x.astype(np.float64)
    else:
        raise TypeError(f"to_uint8 expects a numpy array or a torch tensor, got {type(x).__name__}")
    if not np.isfinite(values).all():
        raise DivergedError("image contains NaN or Inf values; refusing to convert to uint8")
    return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray | torch.Tensor) -> None:
    """Write ``image`` (float in [0, 1] or uint8 ``H x W x 3``) as an 8-bit RGB PNG, atomically.

    The file is written to a temporary file in the same directory and renamed over ``path``, so a
    crash never leaves a half-written PNG. Parent directories are created.
    """
    from harness.fsutil import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())

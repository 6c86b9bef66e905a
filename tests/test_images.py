"""Tests for harness.images: decoding, explicit conversions, limits and atomic PNG writing."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from harness.errors import DivergedError, ImageError
from harness.images import (
    MAX_PIXELS,
    MIN_SIDE,
    image_size,
    load_image,
    save_png,
    to_tensor,
    to_uint8,
)


def _rgb8(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR says ``width x height`` but whose IDAT holds only 16 zero bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_rgb8_values_are_k_over_255_without_conversions(tmp_path):
    pixels = _rgb8()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.array.dtype == np.float32
    assert loaded.array.shape == (12, 16, 3)
    np.testing.assert_array_equal(loaded.array, pixels.astype(np.float32) / np.float32(255))
    assert loaded.conversions == ()
    assert loaded.source_mode == "RGB"
    assert loaded.bit_depth == 8


def test_rgba_alpha_dropped_and_recorded(tmp_path):
    pixels = _rgb8()
    alpha = np.full(pixels.shape[:2] + (1,), 7, dtype=np.uint8)
    Image.fromarray(np.concatenate([pixels, alpha], axis=2)).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.conversions == ("RGBA->RGB (alpha dropped)",)
    np.testing.assert_array_equal(to_uint8(loaded.array), pixels)  # not composited


def test_gray_replicated_and_recorded(tmp_path):
    gray = _rgb8()[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.source_mode == "L"
    assert "L->RGB" in loaded.conversions[0]
    for channel in range(3):
        np.testing.assert_array_equal(to_uint8(loaded.array)[:, :, channel], gray)


def test_gray_alpha_dropped(tmp_path):
    gray = _rgb8()[:, :, 0]
    Image.fromarray(np.stack([gray, gray // 2], axis=2), mode=None).convert("LA").save(
        tmp_path / "la.png"
    )
    loaded = load_image(tmp_path / "la.png")
    assert loaded.source_mode == "LA"
    assert loaded.conversions == ("LA->RGB (alpha dropped, gray replicated to 3 channels)",)


def test_palette_expanded_with_and_without_transparency(tmp_path):
    pixels = _rgb8()
    palette_image = Image.fromarray(pixels).quantize(colors=16)
    palette_image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.conversions == ("P->RGB (palette expanded)",)
    np.testing.assert_array_equal(to_uint8(loaded.array), np.asarray(palette_image.convert("RGB")))
    palette_image.save(tmp_path / "pt.png", transparency=0)
    loaded_t = load_image(tmp_path / "pt.png")
    assert loaded_t.conversions == ("P->RGB (palette expanded, alpha dropped)",)


def test_cmyk_converted_and_recorded(tmp_path):
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    loaded = load_image(tmp_path / "c.jpg")
    assert loaded.source_mode == "CMYK"
    assert loaded.conversions[0].startswith("CMYK->RGB")
    red = loaded.array.mean(axis=(0, 1))
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1  # C=0, M=Y=100% is red


def test_16bit_gray_png_full_precision(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, (10, 14), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.bit_depth == 16
    assert loaded.source_mode == "I;16"
    assert "scaled by 1/65535" in loaded.conversions[0]
    np.testing.assert_array_equal(loaded.array[:, :, 1], values.astype(np.float32) / 65535)


def test_16bit_rgb_png_full_precision_and_channel_order(tmp_path):
    import cv2

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 65536, (10, 14, 3), dtype=np.uint16)
    rgb[:, :, 0] |= 0x8000  # red high, blue low: a BGR/RGB swap would show
    rgb[:, :, 2] &= 0x7FFF
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb[:, :, ::-1].copy())
    loaded = load_image(tmp_path / "c16.png")
    assert loaded.bit_depth == 16
    assert loaded.source_mode == "RGB;16"
    assert loaded.conversions == ("RGB;16->RGB (16-bit scaled by 1/65535)",)
    np.testing.assert_array_equal(loaded.array, rgb.astype(np.float32) / np.float32(65535))
    # Pillow alone would have truncated to 8 bits: make sure we did better than that.
    assert len(np.unique(loaded.array)) > 256


def test_16bit_rgba_png_drops_alpha(tmp_path):
    import cv2

    bgra = np.random.default_rng(3).integers(0, 65536, (8, 8, 4), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "c16a.png"), bgra)
    loaded = load_image(tmp_path / "c16a.png")
    assert loaded.source_mode == "RGBA;16"
    assert "alpha dropped" in loaded.conversions[0]
    np.testing.assert_array_equal(loaded.array[:, :, 0], bgra[:, :, 2].astype(np.float32) / 65535)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_text("this is not an image\n"), "not a readable image"),
        (lambda p: Image.new("RGB", (1, 1)).save(p), f"at least {MIN_SIDE} px"),
    ],
    ids=["zero-byte", "text-named-png", "1x1"],
)
def test_bad_files_raise_image_error_naming_the_file(tmp_path, make, expected):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(tmp_path / "cut.png")
    assert "cut.png" in str(info.value)


def test_truncated_jpeg(tmp_path):
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_truncated_jpeg_refused_even_if_pillow_is_told_to_accept_truncation(tmp_path, monkeypatch):
    Image.fromarray(_rgb8(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(tmp_path / "cut.jpg")


def test_oversized_image_refused_from_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 10_000, 10_000)  # 100 MP, and no pixel data to decode at all
    assert MAX_PIXELS < 10_000 * 10_000
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert str(path) in message and "10000x10000" in message and "40,000,000" in message
    with pytest.raises(ImageError, match="exceeds the limit"):
        image_size(path)
    # A smaller explicit limit applies too.
    Image.fromarray(_rgb8(20, 20)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match="exceeds the limit of 100 pixels"):
        load_image(tmp_path / "small.png", max_pixels=100)


def test_image_size_reads_the_header_only(tmp_path):
    path = tmp_path / "hdr.png"
    _png_header_only(path, 640, 480)
    assert image_size(path) == (640, 480)  # no pixel data, yet the size is known
    with pytest.raises(ImageError):
        load_image(path)  # decoding it must fail cleanly


def test_exif_orientation_is_recorded_not_applied(tmp_path):
    pixels = _rgb8(8, 12)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "o.jpg")
    assert loaded.array.shape == (8, 12, 3)
    assert any("EXIF orientation 6 ignored" in c for c in loaded.conversions)


def test_to_uint8_rounds_half_up_and_clamps():
    x = np.array([[[0.5 / 255, 1.5 / 255, -0.2], [1.2, 254.5 / 255, 0.499 / 255]]], np.float64)
    assert to_uint8(x).tolist() == [[[1, 2, 0], [255, 255, 0]]]
    # tensors: 1 x 3 x H x W or 3 x H x W, float32 values that are exact in binary
    tensor = torch.tensor([[[0.5, 1.5]], [[0.25, -1.0]], [[1.0, 0.0]]], dtype=torch.float32)
    assert to_uint8(tensor).tolist() == [[[128, 64, 255], [255, 0, 0]]]
    assert to_uint8(tensor.unsqueeze(0)).tolist() == [[[128, 64, 255], [255, 0, 0]]]
    with pytest.raises(DivergedError):
        to_uint8(np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError):
        to_uint8(np.zeros((2, 2)))


def test_to_tensor_layout():
    array = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    tensor = to_tensor(array)
    assert tensor.shape == (1, 3, 5, 7) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0, 2], torch.from_numpy(array[:, :, 2]))
    with pytest.raises(ValueError):
        to_tensor(np.zeros((3, 5, 7), np.float32))


def test_save_png_is_atomic_and_round_trips(tmp_path):
    pixels = _rgb8()
    target = tmp_path / "sub" / "out.png"
    save_png(target, pixels.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), pixels)
    save_png(target, torch.zeros(1, 3, 4, 4))  # overwrite via rename
    assert np.asarray(Image.open(target)).max() == 0
    assert [p.name for p in target.parent.iterdir()] == ["out.png"]  # no temp files left
    with pytest.raises(DivergedError):
        save_png(tmp_path / "nan.png", np.full((4, 4, 3), np.nan, np.float32))
    assert not (tmp_path / "nan.png").exists()

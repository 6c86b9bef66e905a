"""Reliability (issue 8): faults, bad input with clear errors, determinism.

Coverage map — what issue 8 lists and where it is tested (nothing is tested twice):

- ``kill -9`` of a Ray worker mid-cell (retried, or ``failed`` with "worker lost"):
  ``tests/test_runner.py::test_a_killed_worker_is_retried_or_the_cell_recorded_failed``.
- ``kill -9`` of the driver, resume with every cell exactly once:
  ``tests/test_runner.py::test_kill_9_of_the_driver_then_resume_matches_an_uninterrupted_run``.
- A full disk while writing a cell (``ENOSPC`` in the run store): ``tests/test_store.py``
  (``test_enospc_leaves_no_partial_file``, ``test_enospc_while_writing_a_cell_never_yields_a_result``)
  and ``tests/test_runner.py::test_enospc_during_a_run_stops_cleanly_and_the_rerun_resumes``. Here:
  the two other writers a cell depends on — :mod:`harness.fsutil` (FP reference PNGs) and
  :func:`harness.quant.io.save_quantized` (the calibrated-model cache).
- NaN injected into a layer: ``tests/test_runner.py::test_execute_cell_in_process_success_divergence_
  and_changed_data`` (a cell → ``diverged``) and ``tests/test_quant_api.py::test_nan_during_
  calibration_raises_diverged_with_its_cause``.
- Bad image files, one by one, at the decoder: ``tests/test_images.py``; mismatched HR/LR sizes and
  ``..`` in manifests at dataset resolution: ``tests/test_datasets.py``; config errors by key:
  ``tests/test_runconfig.py``; corrupt/truncated quantized models and one saved for another base
  model: ``tests/test_quant_io.py``. Here: the same bad inputs at the boundaries a user meets —
  ``evaluate_dataset`` on a folder holding the bad file, and the ``qbench`` entry point (one line,
  exit code 2, the file and key named).
- Determinism: the same quantizing cell twice (fresh caches) → bit-identical metrics, rows and crops;
  and once more from the calibrated-model cache, and once from a corrupted cache entry (rebuilt,
  recorded, same numbers).
"""

from __future__ import annotations

import errno
import shutil
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import DatasetError, ImageError, ModelError, QBenchError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _tmp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# full disk in the writers a cell depends on


def test_enospc_in_fsutil_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from harness import fsutil

    target = tmp_path / "ref.png"
    fsutil.atomic_write_bytes(target, b"complete old content")
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)  # the data reached the temp file, then ENOSPC
    with pytest.raises(OSError) as info:
        fsutil.atomic_write_bytes(target, b"new content" * 1000)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_bytes() == b"complete old content"
    assert _tmp_files(tmp_path) == []


def test_enospc_while_caching_an_fp_reference_never_leaves_a_reference(tmp_path, monkeypatch):
    """A reference PNG that failed to write must not exist: the cache would reuse it forever."""
    from harness import fsutil
    from harness.cells import FPReferences

    refs = FPReferences(tmp_path / "fp_refs")
    image = torch.rand(1, 3, 16, 16)
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    with pytest.raises(OSError):
        refs.put("img", image)
    monkeypatch.undo()
    assert "img" not in refs and _tmp_files(tmp_path) == []
    refs.put("img", image)  # space freed
    assert torch.equal(refs["img"], torch.floor(image.clamp(0, 1) * 255 + 0.5) / 255)


@pytest.fixture(scope="module")
def toy_quantized(tmp_path_factory):
    from tests.conftest import quantize_toy_model

    return quantize_toy_model(tmp_path_factory.mktemp("toyq"), n=2)[0]


@pytest.mark.parametrize("failing", ["params", "record"])
def test_enospc_while_saving_a_quantized_model_leaves_nothing_loadable(
    toy_quantized, tmp_path, monkeypatch, failing
):
    """The calibrated-model cache: a save that hits a full disk — even over an older complete save —
    leaves no record, no temporary file, and a clear ModelError on load; the next save works."""
    from harness import fsutil
    from harness.quant import io as quant_io
    from harness.quant.io import load_quantized, save_quantized
    from tests.conftest import build_toy_model

    out = tmp_path / "q"
    save_quantized(toy_quantized, out)  # an older, complete save in the same directory
    if failing == "params":
        real_save = quant_io.save_file

        def half_then_full(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(quant_io, "save_file", half_then_full)
    else:
        monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    with pytest.raises(OSError):
        save_quantized(toy_quantized, out)
    monkeypatch.undo()
    assert _tmp_files(out) == []
    assert not (out / "quantized.json").exists()
    with pytest.raises(ModelError, match="missing quantized.json"):
        load_quantized(out, build_toy_model())
    save_quantized(toy_quantized, out)
    reloaded = load_quantized(out, build_toy_model())
    assert reloaded.layer_bits() == toy_quantized.layer_bits()


# --------------------------------------------------------------------------------------------
# bad input at the evaluation boundary


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(path: Path, width: int, height: int) -> None:
    """A 100-byte PNG whose IHDR claims width×height (its IDAT holds 16 zero bytes): refusing it
    must not need the 300 MB of pixels the header announces."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _truncated_png(path: Path) -> None:
    Image.fromarray(_rgb(16, 16)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_LR = {
    "zero-byte": (lambda p: p.write_bytes(b""), "empty file"),
    "text-named-png": (lambda p: p.write_text("not an image\n"), "not a readable image"),
    "truncated": (_truncated_png, "truncated"),
    "1x1": (lambda p: Image.new("RGB", (1, 1)).save(p), "too small"),
    "10000x10000": (lambda p: _png_header(p, 10_000, 10_000), "exceeds the limit"),
}


def _folder_pair(root: Path, lr_maker, hr_size=(64, 64)) -> str:
    (root / "LR").mkdir(parents=True)
    (root / "HR").mkdir(parents=True)
    Image.fromarray(_rgb(*hr_size)).save(root / "HR" / "a.png")
    lr_maker(root / "LR" / "a.png")
    return f"folder:lr={root / 'LR'},hr={root / 'HR'}"


@pytest.mark.parametrize("case", sorted(BAD_LR))
def test_bad_image_in_a_dataset_is_a_clear_error_naming_the_file(tmp_path, case):
    from harness.datasets import get_dataset
    from harness.evaluate import evaluate_dataset
    from harness.loaders import load_model

    make, expected = BAD_LR[case]
    spec = _folder_pair(tmp_path, make)
    with pytest.raises(QBenchError) as info:  # at resolution or at evaluation, never later
        dataset = get_dataset(spec).resolve(strict=False)
        evaluate_dataset(load_model("bicubic"), dataset, ["psnr"])
    assert isinstance(info.value, (ImageError, DatasetError))
    message = str(info.value)
    assert str(tmp_path / "LR" / "a.png") in message or "LR/a.png" in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("mode", "conversion"),
    [("RGBA", "alpha dropped"), ("P", "palette expanded"), ("I;16", "16-bit")],
)
def test_accepted_unusual_formats_evaluate_and_record_the_conversion(tmp_path, mode, conversion):
    """16-bit, RGBA and palette LR images are decoded, and the per-image row says how."""
    from harness.datasets import get_dataset
    from harness.evaluate import evaluate_dataset
    from harness.loaders import load_model

    def make(path: Path) -> None:
        rgb = Image.fromarray(_rgb(16, 16, seed=1))
        if mode == "RGBA":
            rgb.convert("RGBA").save(path)
        elif mode == "P":
            rgb.convert("P").save(path)
        else:  # 16-bit RGB PNG (Pillow cannot write one; OpenCV can, in BGR order)
            import cv2

            assert cv2.imwrite(str(path), np.asarray(rgb, dtype=np.uint16)[:, :, ::-1] * 257)

    spec = _folder_pair(tmp_path, make)
    result = evaluate_dataset(load_model("bicubic"), get_dataset(spec).resolve(), ["psnr"])
    notes = " ".join(result.rows[0]["conversions"])
    assert conversion in notes, notes
    assert np.isfinite(result.means["psnr"])


def test_mismatched_hr_and_lr_sizes_are_refused_naming_both_files(tmp_path):
    from harness.datasets import get_dataset
    from harness.evaluate import evaluate_dataset
    from harness.loaders import load_model

    spec = _folder_pair(tmp_path, lambda p: Image.fromarray(_rgb(8, 8)).save(p), hr_size=(40, 40))
    with pytest.raises(DatasetError) as info:
        evaluate_dataset(load_model("bicubic"), get_dataset(spec).resolve(strict=False), ["psnr"])
    assert "a.png" in str(info.value) and "40" in str(info.value)


def test_empty_dataset_is_an_error(tmp_path):
    from harness.datasets import get_dataset
    from harness.evaluate import evaluate_dataset
    from harness.loaders import load_model

    (tmp_path / "LR").mkdir()
    (tmp_path / "HR").mkdir()
    spec = f"folder:lr={tmp_path / 'LR'},hr={tmp_path / 'HR'}"
    with pytest.raises(DatasetError) as info:
        evaluate_dataset(load_model("bicubic"), get_dataset(spec).resolve(strict=False), ["psnr"])
    assert "no image pairs" in str(info.value) or "no image" in str(info.value)


# --------------------------------------------------------------------------------------------
# the qbench entry point: one line, exit 2, file and key named

GOOD_CONFIG = """
name = "cli"
model = "tiny"
bits = ["W4A4"]
datasets = ["demo"]
metrics = ["psnr"]
[calibration]
n = 2
lr_crop = 32
[[methods]]
name = "minmax"
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('metrics = ["psnr"]', 'metrics = ["psnr"]\nmodell = "x"', "modell: unknown key"),
        ('bits = ["W4A4"]', 'bits = "W4A4"', "bits"),
        ('bits = ["W4A4"]', 'bits = ["W1A1"]', "bits[0]: weight bits must be in [2, 8]"),
        ('bits = ["W4A4"]', 'bits = ["W16A16"]', "bits[0]: weight bits must be in [2, 8]"),
        ('name = "minmax"', 'name = "minmaxx"', "unknown method 'minmaxx'"),
        ('datasets = ["demo"]', 'datasets = ["dem0"]', "unknown dataset 'dem0'"),
        ("n = 2", 'n = "two"', "calibration.n"),
    ],
    ids=["unknown-key", "wrong-type", "W1A1", "W16A16", "unknown-method", "unknown-dataset",
         "wrong-type-nested"],
)  # fmt: skip
def test_run_matrix_config_errors_are_one_line_with_exit_code_2(
    tmp_path, monkeypatch, capsys, old, new, expected
):
    from harness import cli

    assert old in GOOD_CONFIG
    path = tmp_path / "bad.toml"
    path.write_text(GOOD_CONFIG.replace(old, new, 1))
    monkeypatch.setattr(
        "sys.argv", ["qbench", "run-matrix", str(path), "--out", str(tmp_path / "run")]
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "bad.toml" in err and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------
# determinism of a real quantizing cell


def _quantizing_cell(tmp_path: Path):
    from harness.runconfig import dataset_manifests, expand_cells, load_run_config
    from tests.test_runner import _random_model_dir

    model_dir = _random_model_dir(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(_rgb(96, 96, seed=10 + i)).save(photos / f"p{i}.png")
    config = tmp_path / "det.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            model = "{model_dir}"
            bits = ["W4A4"]
            datasets = ["demo"]
            metrics = ["psnr", "ssim", "psnr_fp"]
            limit = 1
            [inference]
            latent_tile = 0
            vae_encoder_tile = 0
            vae_decoder_tile = 0
            [calibration]
            source = "hr:{photos}"
            n = 2
            lr_crop = 16
            [visual]
            images = 1
            crop = 32
            [[methods]]
            name = "minmax"
            """
        )
    )
    loaded = load_run_config(config)
    return expand_cells(loaded, dataset_manifests(loaded.datasets))[0]


def _comparable(outcome) -> dict:
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in outcome.rows]
    datasets = {
        name: {k: v for k, v in values.items() if k != "seconds"}
        for name, values in outcome.datasets.items()
    }
    crops = [(c.kind, c.image, c.box, c.png) for c in outcome.crops]
    return {"status": outcome.status, "datasets": datasets, "rows": rows, "crops": crops}


def test_the_same_cell_twice_gives_bit_identical_results_also_from_the_cache(tmp_path):
    from harness.cells import CellContext, execute_cell

    cell = _quantizing_cell(tmp_path)
    assert cell.quantizes and cell.seed == 0
    first = execute_cell(cell, CellContext(cache_dir=str(tmp_path / "cache-a")))
    assert first.status == "done", first.traceback
    assert first.model_record["calibration_cache"] == "miss"
    second = execute_cell(cell, CellContext(cache_dir=str(tmp_path / "cache-b")))
    assert second.model_record["calibration_cache"] == "miss"  # calibrated again, independently
    assert _comparable(second) == _comparable(first)
    means = first.datasets["demo"]["means"]
    assert {"psnr", "ssim", "psnr_fp"} <= set(means) and all(np.isfinite(list(means.values())))

    cached = execute_cell(cell, CellContext(cache_dir=str(tmp_path / "cache-a")))
    assert cached.model_record["calibration_cache"] == "hit"
    assert _comparable(cached) == _comparable(first)

    entries = list((tmp_path / "cache-a" / "quantized").iterdir())
    assert len(entries) == 1
    params = entries[0] / "quant_params.safetensors"
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])  # corrupt the entry
    rebuilt = execute_cell(cell, CellContext(cache_dir=str(tmp_path / "cache-a")))
    assert rebuilt.model_record["calibration_cache"].startswith("rebuilt (")
    assert "quant_params.safetensors" in rebuilt.model_record["calibration_cache"]
    assert _comparable(rebuilt) == _comparable(first)
    shutil.rmtree(tmp_path / "cache-b")

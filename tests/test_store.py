"""The run directory: atomic writes (also under ENOSPC), commit rules, lock, provenance, status."""

from __future__ import annotations

import errno
import json
import os

import pytest

from harness import store as store_module
from harness.cells import CellOutcome, CellSpec, CropImage, centre_box, png_crop
from harness.store import RunStore, StoreError, atomic_write, git_state, is_tmp_name


def make_cell(
    cell_id: str = "0123456789abcdef", label: str = "MinMax", bits: str = "W4A4"
) -> CellSpec:
    return CellSpec(
        cell_id=cell_id, model_key="fedcba9876543210", label=label, method="minmax", ablation_of=None,
        model="tiny", bits=bits, scope="UV", seed=0, method_config={"method": "minmax", "bits": bits},
        calibration={"source": "tiny-train", "n": 4, "lr_crop": 32, "teacher_batch_size": 4},
        inference={}, datasets=("demo",), manifests={"demo": "ab" * 32}, metrics=("psnr",), limit=2,
        visual={"images": 1, "crop": 8},
    )  # fmt: skip


def make_outcome(cell: CellSpec, psnr: float = 27.5) -> CellOutcome:
    import numpy as np

    image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    box = centre_box(16, 16, 8)
    return CellOutcome(
        cell_id=cell.cell_id,
        status="done",
        datasets={"demo": {"images": 2, "means": {"psnr": psnr}, "unavailable": {}}},
        rows=[
            {"dataset": "demo", "image": "a", "psnr": psnr - 1},
            {"dataset": "demo", "image": "b", "psnr": psnr + 1},
        ],
        curves={"loss": {"x": None, "y": [3.0, 2.0, 1.0], "xlabel": "step", "ylabel": "loss"}},
        crops=[CropImage("demo", "a", "sr", box, png_crop(image, box))],
        timings={"total_s": 1.5},
    )


def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "sub" / "file.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_enospc_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write(path, "old complete content")
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "write", full_disk)
    with pytest.raises(OSError) as info:
        atomic_write(path, "new content " * 1000)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == "old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_enospc_while_writing_a_cell_never_yields_a_result(tmp_path, monkeypatch):
    cell = make_cell()
    store = RunStore(tmp_path / "run")
    store.lock()
    real_write = os.write
    calls = {"n": 0}

    def fail_on_cell_json(fd, data):
        calls["n"] += 1
        if bytes(data[:1]) == b"{" and b'"rows_sha256"' in bytes(data):  # the commit record
            real_write(fd, bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", fail_on_cell_json)
    with pytest.raises(OSError):
        store.write_cell(cell, make_outcome(cell))
    monkeypatch.undo()
    assert calls["n"] >= 2  # rows and the crop were written before the commit record failed
    assert store.read_cell(cell.cell_id) is None  # rows without a commit record are not a result
    assert store.read_rows(cell.cell_id) == []
    assert not any(is_tmp_name(p.name) for p in store.run_dir.rglob("*"))
    store.write_cell(cell, make_outcome(cell))  # space freed: the rerun commits normally
    assert store.read_cell(cell.cell_id).status == "done"
    store.unlock()


def test_cell_round_trip_rows_crops_and_hash_check(tmp_path):
    cell = make_cell()
    with RunStore(tmp_path) as store:
        store.write_cell(cell, make_outcome(cell), attempt_info={"worker_pid": 1})
    store = RunStore(tmp_path)
    stored = store.read_cell(cell.cell_id)
    assert stored.status == "done" and stored.record["config"]["bits"] == "W4A4"
    assert stored.record["datasets"]["demo"]["means"]["psnr"] == 27.5
    assert stored.record["rows_count"] == 2 and stored.record["attempt"] == {"worker_pid": 1}
    assert [r["image"] for r in store.read_rows(cell.cell_id)] == ["a", "b"]
    crop = stored.record["crops"][0]
    assert store.read_crop(crop).startswith(b"\x89PNG")
    # tampered rows: the commit record no longer matches, the cell is not a result
    store.rows_path(cell.cell_id).write_text('{"image": "x"}\n')
    assert store.read_cell(cell.cell_id) is None
    with pytest.raises(StoreError, match="escapes"):
        store.read_crop({"file": "../../etc/passwd", "sha256": ""})


def test_truncated_or_foreign_cell_json_is_not_a_result(tmp_path):
    cell = make_cell()
    with RunStore(tmp_path) as store:
        store.write_cell(cell, make_outcome(cell))
        path = store.cell_path(cell.cell_id)
        text = path.read_text()
        path.write_text(text[: len(text) // 2])  # as a non-atomic writer would leave it
        assert store.read_cell(cell.cell_id) is None
        assert store.committed_ids() == []
        path.write_text(json.dumps({**json.loads(text), "cell_id": "ffffffffffffffff"}))
        assert store.read_cell(cell.cell_id) is None


def test_nan_metrics_are_stored_as_null_and_status_says_why(tmp_path):
    cell = make_cell()
    outcome = make_outcome(cell, psnr=float("nan"))
    outcome.status, outcome.reason = "diverged", "NaN/Inf: UNet produced NaN"
    with RunStore(tmp_path) as store:
        store.write_cell(cell, outcome)
    record = RunStore(tmp_path).read_cell(cell.cell_id).record
    assert record["status"] == "diverged" and record["datasets"]["demo"]["means"]["psnr"] is None
    text = (tmp_path / "cells" / f"{cell.cell_id}.json").read_text()

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads(text, parse_constant=refuse)  # strict JSON: no NaN/Infinity literals


def test_stale_tmp_files_are_removed_and_never_read(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir(parents=True)
    stale = cells / ".0123456789abcdef.json.abc123.tmp"
    stale.write_text('{"cell_id": "0123456789abcdef", "status": "done"')
    store = RunStore(tmp_path)
    assert store.committed_ids() == []
    store.lock()
    assert not stale.exists()
    store.unlock()


def test_only_one_driver_may_write(tmp_path):
    first = RunStore(tmp_path)
    first.lock()
    with pytest.raises(StoreError, match="another qbench driver"):
        RunStore(tmp_path).lock()
    with pytest.raises(StoreError, match="without holding the run lock"):
        RunStore(tmp_path).write_status([])
    first.unlock()
    RunStore(tmp_path).lock()  # released: a new driver may take it


def test_status_table_and_provenance(tmp_path):
    done, pending = make_cell(), make_cell("aaaaaaaaaaaaaaaa", label="A|B")
    with RunStore(tmp_path) as store:
        store.write_cell(done, make_outcome(done))
        rows = store.write_status([done, pending])
        store.add_provenance({"started_at": "t1", "git": git_state()})
        store.add_provenance({"started_at": "t2"})
    assert [r["status"] for r in rows] == ["done", "pending"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["counts"] == {"done": 1, "pending": 1}
    markdown = (tmp_path / "status.md").read_text()
    assert "| A\\|B |" in markdown and "| done | 1.5 |" in markdown
    sessions = RunStore(tmp_path).read_provenance()["sessions"]
    assert [s["started_at"] for s in sessions] == ["t1", "t2"]
    assert len(sessions[0]["git"]["commit"]) == 40 and isinstance(sessions[0]["git"]["dirty"], bool)


def test_invalid_cell_ids_are_refused(tmp_path):
    with pytest.raises(StoreError, match="invalid cell id"):
        RunStore(tmp_path).cell_path("../x")

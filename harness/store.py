"""The crash-safe run directory: one JSON per finished cell, per-image rows, crops and a status table.

Layout (``docs/run-matrix.md``)::

    RUN_DIR/
      config.resolved.json        the validated config and the expanded cell list
      provenance.json             git commit + dirty flag, library versions, device, seeds, data
                                  manifest hashes, hostname; one entry per driver session
      status.json, status.md      the status table (derived from the cell files)
      cells/<cell_id>.json        config, status done|failed|diverged, reason, per-dataset means,
                                  metric spec records, loss curves, timings, crop index
      cells/<cell_id>.images.jsonl  per-image rows (one JSON object per line)
      cells/<cell_id>/crops/*.png   small crops for the visual comparison
      .lock                       held (flock) by the one driver writing this directory

Crash safety:

- Every file is written atomically: a temporary ``.<name>.<random>.tmp`` in the same directory,
  ``fsync``, ``rename`` over the target, ``fsync`` of the directory. A reader sees the old file or the
  complete new one, never a truncated result, after ``kill -9`` or a full disk (on ``ENOSPC`` the
  temporary file is removed and the error propagates; no partial file ever carries a result name).
- A cell's rows and crops are written **before** its JSON; the JSON is the commit record and
  carries the SHA-256 and count of its rows file. A cell without a readable JSON whose rows hash
  matches does not exist for readers and is run again. Temporary files are never read and are
  removed when a driver opens the directory.
- Only the driver writes (workers return data), guarded by an exclusive ``flock`` on ``.lock`` that
  the kernel releases when the driver dies, so a second driver on the same directory is refused
  while the first is alive and a crashed driver never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import QBenchError

STORE_FORMAT = "qbench-run"
STORE_VERSION = 1
CELL_SCHEMA = 1
_CELL_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
LIBRARIES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "pyiqa",
    "ray",
    "numpy",
    "pillow",
    "safetensors",
    "qbench",
)


class StoreError(QBenchError):
    """The run directory cannot be written or is locked by another driver."""


# --------------------------------------------------------------------------------------------
# atomic writes


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (module docstring); the directory is created."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def finite_json(value: Any) -> Any:
    """NaN/Inf → None recursively (strict JSON); the status/reason fields say what happened."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# provenance


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag, read-only (``--no-optional-locks`` so the index is never written)."""
    from harness.paths import repo_root

    repo = repo or repo_root()
    state: dict[str, Any] = {"repo": str(repo)}
    try:
        commit = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "HEAD"],
            cwd=repo, capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        state.update(commit=None, dirty=None, error=str(exc))
        return state
    state["commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    state["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    if commit.returncode != 0:
        state["error"] = commit.stderr.strip()[:200]
    return state


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_record() -> dict[str, Any]:
    """The driver's device view (workers record their own in each cell)."""
    record: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        record["cuda_available"] = bool(torch.cuda.is_available())
        if record["cuda_available"]:
            record["cuda_devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
    return record


def provenance_session(
    config, cells, manifests: Mapping[str, str], extra: Mapping | None = None
) -> dict:
    """One driver session's provenance record."""
    seeds = sorted({c.seed for c in cells if c.seed is not None})
    return {
        "started_at": _now(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "git": git_state(),
        "libraries": library_versions(),
        "device": device_record(),
        "config_path": str(config.path) if config.path else None,
        "config_sha256": config.source_sha256,
        "calibration_seeds": seeds,
        "data_manifests": dict(manifests),
        "limit": config.limit,
        **dict(extra or {}),
    }


# --------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class StoredCell:
    """A committed cell as read back: its record, and where its rows and crops live."""

    cell_id: str
    record: dict[str, Any]
    path: Path

    @property
    def status(self) -> str:
        return self.record["status"]


class RunStore:
    """Reader/writer of a run directory. Writers must hold the lock (:meth:`lock`)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.cells_dir = self.run_dir / "cells"
        self._lock_fd: int | None = None

    # -- locking and housekeeping
    def lock(self) -> None:
        """Take the exclusive writer lock; :class:`StoreError` if another driver holds it."""
        import fcntl

        self.cells_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"{self.run_dir}: another qbench driver is writing this run directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._lock_fd = fd
        self.remove_stale_tmp()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"{self.run_dir}: write attempted without holding the run lock")

    def remove_stale_tmp(self) -> list[Path]:
        """Delete temporary files left by a killed writer (only the lock holder may call this)."""
        removed = []
        if not self.run_dir.is_dir():
            return removed
        for path in self.run_dir.rglob("*.tmp"):
            if is_tmp_name(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
        return removed

    # -- run-level files
    def write_config(self, config_dict: Mapping[str, Any], cells) -> None:
        self._require_lock()
        atomic_write_json(
            self.run_dir / "config.resolved.json",
            {
                "format": STORE_FORMAT,
                "format_version": STORE_VERSION,
                "written_at": _now(),
                "config": config_dict,
                "cells": [c.to_dict() for c in cells],
            },
        )

    def read_config(self) -> dict[str, Any]:
        path = self.run_dir / "config.resolved.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"{self.run_dir}: not a run directory (no config.resolved.json)"
            ) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable ({exc})") from None
        if data.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: not a {STORE_FORMAT} file")
        if data.get("format_version") != STORE_VERSION:
            raise StoreError(
                f"{path}: format_version {data.get('format_version')!r} is not supported "
                f"(this qbench reads {STORE_VERSION})"
            )
        return data

    def add_provenance(self, session: Mapping[str, Any]) -> None:
        """Append a driver session to ``provenance.json`` (the first session is the run's origin)."""
        self._require_lock()
        path = self.run_dir / "provenance.json"
        sessions: list = []
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            sessions = list(json.loads(path.read_text(encoding="utf-8")).get("sessions", []))
        sessions.append(dict(session))
        atomic_write_json(path, finite_json({"format": STORE_FORMAT, "sessions": sessions}))

    def read_provenance(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / "provenance.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, OSError):
            return {"sessions": []}

    # -- cells
    def cell_path(self, cell_id: str) -> Path:
        if not _CELL_ID_RE.match(cell_id):
            raise StoreError(f"invalid cell id {cell_id!r}")
        return self.cells_dir / f"{cell_id}.json"

    def rows_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.images.jsonl"

    def crops_dir(self, cell_id: str) -> Path:
        return self.cells_dir / cell_id / "crops"

    def write_cell(self, cell, outcome, *, attempt_info: Mapping[str, Any] | None = None) -> Path:
        """Store a cell's outcome: rows, crops, then the JSON commit record (module docstring)."""
        self._require_lock()
        cell_path = self.cell_path(cell.cell_id)
        rows_text = "".join(
            json.dumps(finite_json(row), ensure_ascii=False, allow_nan=False, sort_keys=True) + "\n"
            for row in outcome.rows
        )
        rows_bytes = rows_text.encode("utf-8")
        atomic_write(self.rows_path(cell.cell_id), rows_bytes)
        crop_index = []
        crops_dir = self.crops_dir(cell.cell_id)
        for number, crop in enumerate(outcome.crops):
            digest = hashlib.sha256(f"{crop.dataset}\0{crop.image}".encode()).hexdigest()[:12]
            file_name = f"{number:03d}-{digest}-{crop.kind}.png"
            if crop.kind not in ("hr", "lr_up", "sr"):
                raise StoreError(f"crop kind must be hr, lr_up or sr, got {crop.kind!r}")
            atomic_write(crops_dir / file_name, crop.png)
            crop_index.append({
                "dataset": crop.dataset,
                "image": crop.image,
                "kind": crop.kind,
                "box": list(crop.box),
                "file": f"{cell.cell_id}/crops/{file_name}",
                "sha256": hashlib.sha256(crop.png).hexdigest(),
            })  # fmt: skip
        record = {
            "schema": CELL_SCHEMA,
            "cell_id": cell.cell_id,
            "model_key": cell.model_key,
            "label": cell.label,
            "method": cell.method,
            "bits": cell.bits,
            "seed": cell.seed,
            "config": cell.to_dict(),
            "status": outcome.status,
            "reason": outcome.reason,
            "traceback": outcome.traceback,
            "datasets": outcome.datasets,
            "metric_specs": outcome.metric_specs,
            "curves": outcome.curves,
            "model_record": outcome.model_record,
            "timings": outcome.timings,
            "environment": outcome.environment,
            "attempt": dict(attempt_info or {}),
            "rows_file": self.rows_path(cell.cell_id).name,
            "rows_count": len(outcome.rows),
            "rows_sha256": hashlib.sha256(rows_bytes).hexdigest(),
            "crops": crop_index,
            "finished_at": _now(),
        }
        atomic_write_json(cell_path, finite_json(record))
        return cell_path

    def read_cell(self, cell_id: str) -> StoredCell | None:
        """The committed cell, or None when absent or not a complete, consistent record."""
        path = self.cell_path(cell_id)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, OSError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or record.get("cell_id") != cell_id:
            return None
        if record.get("status") not in ("done", "failed", "diverged"):
            return None
        try:
            rows_bytes = self.rows_path(cell_id).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(rows_bytes).hexdigest() != record.get("rows_sha256"):
            return None
        return StoredCell(cell_id, record, path)

    def read_rows(self, cell_id: str) -> list[dict[str, Any]]:
        """Per-image rows of a committed cell (verified against the hash in its JSON)."""
        stored = self.read_cell(cell_id)
        if stored is None:
            return []
        text = self.rows_path(cell_id).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def read_crop(self, entry: Mapping[str, Any]) -> bytes:
        """PNG bytes of a crop listed in a cell record, checked against its hash."""
        rel = Path(str(entry["file"]))
        if rel.is_absolute() or ".." in rel.parts:
            raise StoreError(f"crop path {entry['file']!r} escapes the run directory")
        data = (self.cells_dir / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise StoreError(
                f"{self.cells_dir / rel}: crop does not match the hash in its cell record"
            )
        return data

    def committed_ids(self) -> list[str]:
        """Ids of every committed cell in the directory (including cells no longer in the config)."""
        if not self.cells_dir.is_dir():
            return []
        ids = []
        for path in sorted(self.cells_dir.glob("*.json")):
            if is_tmp_name(path.name):
                continue
            if self.read_cell(path.stem) is not None:
                ids.append(path.stem)
        return ids

    # -- status table
    def status_rows(self, cells) -> list[dict[str, Any]]:
        rows = []
        for cell in cells:
            stored = self.read_cell(cell.cell_id)
            rows.append({
                "cell_id": cell.cell_id,
                "label": cell.label,
                "method": cell.method,
                "bits": cell.bits,
                "seed": cell.seed,
                "status": stored.status if stored else "pending",
                "reason": stored.record.get("reason") if stored else None,
                "seconds": (stored.record.get("timings") or {}).get("total_s") if stored else None,
            })  # fmt: skip
        return rows

    def write_status(self, cells) -> list[dict[str, Any]]:
        """Rewrite ``status.json`` and ``status.md`` from the cell files."""
        self._require_lock()
        rows = self.status_rows(cells)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        atomic_write_json(
            self.run_dir / "status.json",
            finite_json({"updated_at": _now(), "counts": counts, "cells": rows}),
        )
        lines = [
            "| cell | method | bits | seed | status | seconds | reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            seconds = f"{row['seconds']:.1f}" if isinstance(row["seconds"], (int, float)) else ""
            reason = (row["reason"] or "").replace("|", "\\|").replace("\n", " ")[:200]
            label = str(row["label"]).replace("|", "\\|")
            lines.append(
                f"| {row['cell_id']} | {label} | {row['bits']} | "
                f"{'' if row['seed'] is None else row['seed']} | {row['status']} | {seconds} | {reason} |"
            )
        atomic_write(self.run_dir / "status.md", "\n".join(lines) + "\n")
        return rows


__all__ = [
    "RunStore",
    "StoreError",
    "StoredCell",
    "atomic_write",
    "atomic_write_json",
    "git_state",
    "library_versions",
    "provenance_session",
]

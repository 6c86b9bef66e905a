"""Score a directory of SR images against HR images: per-image rows, means, folder-level FID.

The directory counterpart of OSEDiff's ``test_metrics.py`` / PassionSR's ``measure.py``, without
their traps (methods.md §9.2):

* **Pairing by name, never by sort order or common prefix.** Each HR file ``<stem>.<ext>`` is paired
  with the SR file whose stem is ``sr_template.format(stem=<stem>)`` (default ``"{stem}"``: the same
  stem; ``"{stem}_x4"`` for ``baby_x4.png``). Extensions may differ. Every SR file without an HR,
  every HR file without an SR, and every ambiguous stem (``a.png`` and ``a.jpg``) is listed in one
  :class:`~harness.errors.DatasetError`.
* **No resize.** SR and HR must have the same size; a mismatch is an
  :class:`~harness.errors.ImageError` naming the files and both shapes.
* Images are decoded with :func:`harness.images.load_image` (explicit, recorded conversions) and
  quantized to 8-bit levels by :mod:`harness.metrics` before scoring.
* FID is computed once per folder pair, on exactly the paired files (symlinked into temporary
  folders, because pyiqa's FID walks folders recursively and would pick up anything else).

Only files directly inside the directories with an image extension (:data:`IMAGE_EXTENSIONS`)
are considered; hidden files are ignored. Sub-directories are not searched.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, DatasetError, MetricUnavailable
from harness.images import load_image, to_tensor
from harness.metrics import PYIQA_VERSION, MetricSuite

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)


@dataclass(frozen=True)
class ScorePair:
    """One SR image and its HR image (``hr`` is ``None`` for no-reference scoring)."""

    name: str
    sr: Path
    hr: Path | None


@dataclass
class ScoreResult:
    """Per-image rows, means, folder scores, metric records and the metrics that could not run."""

    sr_dir: Path
    hr_dir: Path | None
    sr_template: str
    metrics: list[str]
    rows: list[dict[str, Any]]
    means: dict[str, float]
    folder_scores: dict[str, float]
    metric_records: dict[str, dict[str, Any]]
    unavailable: dict[str, str]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def summary(self) -> dict[str, Any]:
        """The JSON-able content of ``summary.json``."""
        import numpy
        import torch

        return {
            "sr_dir": str(self.sr_dir),
            "hr_dir": str(self.hr_dir) if self.hr_dir is not None else None,
            "pairing": {
                "rule": "exact stem after sr_template (never sort order)",
                "sr_template": self.sr_template,
            },
            "n_images": len(self.rows),
            "metrics_requested": self.metrics,
            "means": self.means,
            "folder_scores": self.folder_scores,
            "metric_records": self.metric_records,
            "unavailable": self.unavailable,
            "versions": {
                "pyiqa": PYIQA_VERSION,
                "torch": torch.__version__,
                "numpy": numpy.__version__,
                "python": platform.python_version(),
            },
            "created_at": self.created_at,
        }


def validate_template(sr_template: str) -> str:
    """``sr_template`` must use the field ``{stem}`` exactly once and no other field."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(sr_template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"invalid --sr-template {sr_template!r}: {exc}") from exc
    if fields != ["stem"]:
        raise ConfigError(
            f"invalid --sr-template {sr_template!r}: it must contain '{{stem}}' exactly once and "
            "no other field (e.g. '{stem}' or '{stem}_x4')"
        )
    if "/" in sr_template or os.sep in sr_template:
        raise ConfigError(f"invalid --sr-template {sr_template!r}: no path separators allowed")
    return sr_template


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside ``directory`` (sorted by name, for stable output only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory} is not a directory")
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _by_stem(files: list[Path], side: str, problems: list[str]) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for path in files:
        if path.stem in mapping:
            problems.append(
                f"ambiguous {side} stem {path.stem!r}: {mapping[path.stem].name} and {path.name}"
            )
            continue
        mapping[path.stem] = path
    return mapping


def pair_directories(
    sr_dir: str | Path, hr_dir: str | Path | None, *, sr_template: str = "{stem}"
) -> list[ScorePair]:
    """Pair SR files to HR files by exact stem through ``sr_template``; list every problem at once."""
    validate_template(sr_template)
    sr_files = list_images(sr_dir)
    if not sr_files:
        raise DatasetError(f"{sr_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if hr_dir is None:
        return [ScorePair(p.name, p, None) for p in sr_files]
    hr_files = list_images(hr_dir)
    problems: list[str] = []
    sr_by_stem = _by_stem(sr_files, "SR", problems)
    hr_by_stem = _by_stem(hr_files, "HR", problems)
    pairs: list[ScorePair] = []
    used_sr: set[str] = set()
    for hr_stem, hr_path in sorted(hr_by_stem.items()):
        sr_stem = sr_template.format(stem=hr_stem)
        sr_path = sr_by_stem.get(sr_stem)
        if sr_path is None:
            problems.append(f"HR {hr_path} has no SR file with stem {sr_stem!r} in {sr_dir}")
            continue
        used_sr.add(sr_stem)
        pairs.append(ScorePair(sr_path.name, sr_path, hr_path))
    for sr_stem, sr_path in sorted(sr_by_stem.items()):
        if sr_stem not in used_sr:
            problems.append(
                f"SR {sr_path} has no HR file (expected an HR stem s with "
                f"{sr_template!r}.format(stem=s) == {sr_stem!r}) in {hr_dir}"
            )
    if problems:
        raise DatasetError(
            f"cannot pair {sr_dir} with {hr_dir} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    return pairs


def score_directories(
    sr_dir: str | Path,
    hr_dir: str | Path | None,
    metrics: str | Sequence[str] | MetricSuite,
    *,
    sr_template: str = "{stem}",
    device: str = "cpu",
) -> ScoreResult:
    """Score every SR image in ``sr_dir`` (against ``hr_dir`` when given) with ``metrics``.

    ``metrics`` is a comma-separated string, a list of names, or a ready :class:`MetricSuite`.
    Unavailable metrics are reported in the result with their reason; if none of the requested
    metrics can run, :class:`MetricUnavailable` lists every reason. Full-reference metrics without
    ``hr_dir`` and ``*_fp`` metrics (which need the full-precision output, not a directory) are
    configuration errors.
    """
    sr_dir = Path(sr_dir)
    hr_dir = Path(hr_dir) if hr_dir is not None else None
    pairs = pair_directories(sr_dir, hr_dir, sr_template=sr_template)
    suite = metrics if isinstance(metrics, MetricSuite) else MetricSuite(metrics, device=device)
    _check_references(suite, hr_dir)
    if not suite.available:
        raise MetricUnavailable(
            "none of the requested metrics can run here:\n  "
            + "\n  ".join(f"{n}: {r}" for n, r in suite.unavailable.items())
        )
    needs_hr_pixels = any(suite.metrics[n].spec.kind == "fr" for n in suite.per_image)
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        sr_image = load_image(pair.sr)
        row: dict[str, Any] = {"image": pair.name, "sr_path": str(pair.sr)}
        row["hr_path"] = str(pair.hr) if pair.hr is not None else None
        row["height"], row["width"] = sr_image.height, sr_image.width
        hr_tensor = None
        hr_conversions: tuple[str, ...] = ()
        if pair.hr is not None and needs_hr_pixels:
            hr_image = load_image(pair.hr)
            hr_conversions = hr_image.conversions
            if hr_image.array.shape != sr_image.array.shape:
                raise _shape_error(pair, sr_image.array.shape, hr_image.array.shape)
            hr_tensor = to_tensor(hr_image.array)
        row["sr_conversions"] = list(sr_image.conversions)
        row["hr_conversions"] = list(hr_conversions)
        row.update(suite.score(to_tensor(sr_image.array), hr_tensor, image=pair.name))
        rows.append(row)
    means = {name: float(sum(r[name] for r in rows) / len(rows)) for name in suite.per_image}
    folder_scores: dict[str, float] = {}
    if suite.folder_level and hr_dir is not None:
        folder_scores = _score_folders(suite, pairs)
    return ScoreResult(
        sr_dir=sr_dir,
        hr_dir=hr_dir,
        sr_template=sr_template,
        metrics=list(suite.names),
        rows=rows,
        means=means,
        folder_scores=folder_scores,
        metric_records=suite.records(),
        unavailable=dict(suite.unavailable),
    )


def _check_references(suite: MetricSuite, hr_dir: Path | None) -> None:
    from harness.metrics import get_metric_spec

    fp_metrics = [n for n in suite.names if get_metric_spec(n).kind == "fp"]
    if fp_metrics:
        raise ConfigError(
            f"{', '.join(fp_metrics)} compare against the full-precision model's output and "
            "cannot be scored from directories; use psnr/ssim with the FP outputs as HR_DIR"
        )
    if hr_dir is None:
        needs_hr = [n for n in suite.names if get_metric_spec(n).kind in ("fr", "folder")]
        if needs_hr:
            raise ConfigError(
                f"metric(s) {', '.join(needs_hr)} need HR images: pass HR_DIR or choose no-reference "
                "metrics (niqe, musiq, maniqa, maniqa-pipal, clipiqa)"
            )


def _shape_error(pair: ScorePair, sr_shape: tuple[int, ...], hr_shape: tuple[int, ...]):
    from harness.errors import ImageError

    return ImageError(
        f"{pair.sr} is {sr_shape[1]}x{sr_shape[0]} (W x H) but its HR {pair.hr} is "
        f"{hr_shape[1]}x{hr_shape[0]}; qbench never resizes to make them match"
    )


def _score_folders(suite: MetricSuite, pairs: list[ScorePair]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="qbench-fid-") as tmp:
        sr_link_dir, hr_link_dir = Path(tmp) / "sr", Path(tmp) / "hr"
        sr_link_dir.mkdir()
        hr_link_dir.mkdir()
        for pair in pairs:
            assert pair.hr is not None
            (sr_link_dir / pair.sr.name).symlink_to(pair.sr.resolve())
            (hr_link_dir / pair.hr.name).symlink_to(pair.hr.resolve())
        return suite.score_folders(sr_link_dir, hr_link_dir)


def _csv_text(result: ScoreResult) -> str:
    metric_columns = [n for n in result.metrics if n in result.means]
    columns = ["image", "sr_path", "hr_path", "height", "width", *metric_columns]
    columns += ["sr_conversions", "hr_conversions"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in result.rows:
        values = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, list):
                value = "; ".join(value)
            values.append("" if value is None else value)
        writer.writerow(values)
    return buffer.getvalue()


def _write_text_atomic(path: Path, text: str) -> None:
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as tmp_file:
            tmp_file.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_scores(result: ScoreResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``per_image.jsonl``, ``per_image.csv`` and ``summary.json`` atomically; return paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "per_image.jsonl": out_dir / "per_image.jsonl",
        "per_image.csv": out_dir / "per_image.csv",
        "summary.json": out_dir / "summary.json",
    }
    jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
    _write_text_atomic(paths["per_image.jsonl"], jsonl)
    _write_text_atomic(paths["per_image.csv"], _csv_text(result))
    summary = json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n"
    _write_text_atomic(paths["summary.json"], summary)
    return paths

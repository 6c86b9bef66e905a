"""Plots from stored results (matplotlib, Agg backend, each figure saved as PNG and PDF).

- ``metric_vs_bits_<dataset>``: one panel per metric, x = bits (W2A2 … W8A8), one line per method
  (ablations excluded), the W32A32 rows as dashed horizontal lines.
- ``tstar_sweep``: QArtSR's T* sweep (every stored curve of kind ``sweep``).
- ``calibration_curves``: every other stored loss curve, one panel per cell.
- ``per_image_<dataset>``: per-image metric distributions (box plots with the points), one panel
  per metric, one box per method and bits.

Labels come from the config and are drawn as text by matplotlib (never interpreted as markup:
``$`` is escaped so a label cannot switch on mathtext).
"""

from __future__ import annotations

import math
from pathlib import Path

from reports import FP_BITS, RunResults
from reports.tables import METRIC_NAMES, bits_sort_key, entry_cells


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plain(text: str) -> str:
    return str(text).replace("$", r"\$")


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(
            path,
            dpi=120,
            bbox_inches="tight",
            metadata={"CreationDate": None} if ext == "pdf" else None,
        )
        paths.append(path)
    _pyplot().close(fig)
    return paths


def _mean(results: RunResults, label: str, bits: str, dataset: str, metric: str) -> float | None:
    values = []
    for cell in entry_cells(results, label, bits):
        if cell.status != "done":
            continue
        value = (cell.dataset(dataset).get("means") or {}).get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append(float(value))
    return sum(values) / len(values) if values else None


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def metric_vs_bits(results: RunResults, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    entries = [e for e in results.method_entries() if not e.get("ablation_of")]
    all_bits = sorted(
        {b for e in entries for b in e["bits"] if b != FP_BITS}, key=bits_sort_key, reverse=True
    )
    if not all_bits:
        return written
    for dataset in results.datasets:
        metrics = [
            m
            for m in results.metrics
            if any(
                _mean(results, e["label"], b, dataset, m) is not None
                for e in entries
                for b in e["bits"]
            )
        ]
        if not metrics:
            continue
        rows, cols = _grid(len(metrics))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            lower = results.metric_direction(metric)
            for entry in entries:
                if FP_BITS in entry["bits"]:
                    value = _mean(results, entry["label"], FP_BITS, dataset, metric)
                    if value is not None:
                        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
                        ax.annotate(_plain(entry["label"]), (0, value), fontsize=7, color="gray",
                                    xytext=(2, 2), textcoords="offset points")  # fmt: skip
                    continue
                xs, ys = [], []
                for i, bits in enumerate(all_bits):
                    value = _mean(results, entry["label"], bits, dataset, metric)
                    if value is not None:
                        xs.append(i)
                        ys.append(value)
                if ys:
                    ax.plot(xs, ys, marker="o", label=_plain(entry["label"]))
            ax.set_xticks(range(len(all_bits)), all_bits)
            ax.set_xlim(-0.3, len(all_bits) - 0.7)
            ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} {'↓' if lower else '↑'}")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
                       bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 5)))  # fmt: skip
        fig.suptitle(_plain(f"{dataset}: metric vs bits"))
        fig.tight_layout()
        written += _save(fig, out_dir, f"metric_vs_bits_{_slug(dataset)}")
    return written


def _curves(results: RunResults, sweep: bool) -> list[tuple[str, str, dict]]:
    found = []
    for cell in results.cells:
        if not cell.record:
            continue
        for name, curve in (cell.record.get("curves") or {}).items():
            kind = curve.get("kind") or (
                "sweep" if curve.get("x") and "sweep" in name.lower() else "loss"
            )
            if (kind == "sweep") == sweep and curve.get("y"):
                seed = "" if cell.seed is None else f" seed {cell.seed}"
                found.append((f"{cell.label} {cell.bits}{seed}", name, curve))
    return found


def tstar_sweep(results: RunResults, out_dir: Path) -> list[Path]:
    curves = _curves(results, sweep=True)
    if not curves:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for title, name, curve in curves:
        x = curve.get("x") or list(range(len(curve["y"])))
        ax.plot(x, curve["y"], marker="o", label=_plain(f"{title}: {name}"))
        ax.set_xlabel(_plain(curve.get("xlabel", "T*")))
        ax.set_ylabel(_plain(curve.get("ylabel", "loss")))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("T* sweep")
    fig.tight_layout()
    return _save(fig, out_dir, "tstar_sweep")


def calibration_curves(results: RunResults, out_dir: Path) -> list[Path]:
    curves = _curves(results, sweep=False)
    if not curves:
        return []
    plt = _pyplot()
    by_cell: dict[str, list[tuple[str, dict]]] = {}
    for title, name, curve in curves:
        by_cell.setdefault(title, []).append((name, curve))
    rows, cols = _grid(len(by_cell))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, items) in zip(axes.flat, by_cell.items(), strict=False):
        positive = True
        for name, curve in items:
            x = curve.get("x") or list(range(1, len(curve["y"]) + 1))
            ax.plot(x, curve["y"], label=_plain(name), linewidth=1)
            positive = positive and all(v > 0 for v in curve["y"])
        if positive:
            ax.set_yscale("log")
        ax.set_title(_plain(title), fontsize=9)
        ax.set_xlabel(_plain(items[0][1].get("xlabel", "step")))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(by_cell) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out_dir, "calibration_curves")


def per_image_distributions(results: RunResults, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    groups = []  # (label, bits, rows)
    for entry in results.method_entries():
        for bits in sorted(entry["bits"], key=bits_sort_key):
            rows = []
            for cell in entry_cells(results, entry["label"], bits):
                if cell.status == "done":
                    rows += results.rows(cell)
            if rows:
                shown = "W32A32" if bits == FP_BITS else bits
                groups.append((f"{entry['label']} {shown}", rows))
    if not groups:
        return written
    for dataset in results.datasets:
        metrics = [
            m for m in results.metrics
            if any(isinstance(r.get(m), (int, float)) for _, rows in groups for r in rows if r.get("dataset") == dataset)
        ]  # fmt: skip
        if not metrics:
            continue
        rows_n, cols = _grid(len(metrics))
        width = max(4.5, 0.45 * len(groups))
        fig, axes = plt.subplots(rows_n, cols, figsize=(width * cols, 3.4 * rows_n), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            data, names = [], []
            for name, rows in groups:
                values = [
                    float(r[metric])
                    for r in rows
                    if r.get("dataset") == dataset
                    and isinstance(r.get(metric), (int, float))
                    and math.isfinite(r[metric])
                ]
                if values:
                    data.append(values)
                    names.append(_plain(name))
            if not data:
                ax.axis("off")
                continue
            ax.boxplot(data, showfliers=False)
            for i, values in enumerate(data, start=1):
                ax.scatter([i] * len(values), values, s=8, alpha=0.6)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=7)
            lower = results.metric_direction(metric)
            ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} {'↓' if lower else '↑'}")
            ax.grid(alpha=0.3, axis="y")
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        fig.suptitle(_plain(f"{dataset}: per-image distributions"))
        fig.tight_layout()
        written += _save(fig, out_dir, f"per_image_{_slug(dataset)}")
    return written


def _slug(text: str) -> str:
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40]
    if slug != text:
        slug = f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    return slug or "dataset"


def make_plots(results: RunResults, out_dir: str | Path) -> list[Path]:
    """Every plot that the stored results support; returns the files written."""
    out = Path(out_dir)
    written = []
    for maker in (metric_vs_bits, tstar_sweep, calibration_curves, per_image_distributions):
        written += maker(results, out)
    return written


__all__ = [
    "calibration_curves",
    "make_plots",
    "metric_vs_bits",
    "per_image_distributions",
    "tstar_sweep",
]

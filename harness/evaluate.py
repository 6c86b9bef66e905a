"""Evaluate a model (FP, quantized or bicubic) on a dataset: SR images, per-image metrics, means.

Protocol (methods.md §9, PassionSR/QArtSR): full-resolution images, the model's own tiling and colour
fix, metrics from :mod:`harness.metrics` (Y-channel PSNR/SSIM as OSEDiff's scorer). Differences from
the released scorers, on purpose: pairs come from the dataset definition's explicit rule (never sort
order or longest common prefix), and an SR/HR size mismatch is an error, never a silent resize.

``psnr_fp``/``ssim_fp`` compare against the FP model's output for the same image (the quantization
error alone); pass those outputs as ``fp_outputs`` (name → 1×3×H×W tensor in [0, 1]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.errors import DatasetError, DivergedError


@dataclass
class EvalResult:
    dataset: str
    rows: list[dict]
    means: dict[str, float]
    unavailable: dict[str, str]
    metric_specs: dict[str, dict]
    settings: dict
    outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        return {
            "dataset": self.dataset,
            "images": len(self.rows),
            "means": self.means,
            "unavailable": self.unavailable,
            "metric_specs": self.metric_specs,
            "settings": self.settings,
        }


def load_pair_tensors(pair, scale: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """LR and HR tensors (1×3×H×W in [0, 1]) of a dataset pair, with the recorded conversions.

    Decoding, the dataset's HR crop policy and the exact ``scale``× check are
    :func:`harness.datasets.load_pair`'s; a mismatch raises :class:`DatasetError` naming both files.
    """
    from harness.datasets import load_pair
    from harness.images import to_tensor

    lr, hr = load_pair(pair, scale)
    notes = [f"LR: {c}" for c in lr.conversions]
    if hr is None:
        return to_tensor(lr.array), None, notes
    notes += [f"HR: {c}" for c in hr.conversions]
    return to_tensor(lr.array), to_tensor(hr.array), notes


def evaluate_dataset(
    model,
    dataset,
    metric_names: list[str],
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    fp_outputs: Mapping[str, torch.Tensor] | None = None,
    keep_outputs: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    suite=None,
) -> EvalResult:
    """Run ``model.super_resolve`` on every pair of a resolved dataset and score it.

    ``dataset`` is a resolved dataset (``harness.datasets``); ``limit`` takes the first N pairs in the
    definition's order (recorded by the caller). SR images are written to ``out_dir`` as PNG when given.
    A non-finite output raises :class:`DivergedError` naming the image.
    """
    from harness.images import save_png
    from harness.metrics import MetricSuite

    suite = suite or MetricSuite(metric_names)
    if getattr(dataset, "problems", ()):
        raise DatasetError(f"dataset {dataset.name!r} has problems: " + "; ".join(dataset.problems))
    pairs = list(dataset.pairs)[: limit if limit else None]
    if not pairs:
        raise DatasetError(f"dataset {dataset.name!r} has no image pairs to evaluate")
    out_path = Path(out_dir) if out_dir else None
    rows: list[dict] = []
    outputs: dict[str, torch.Tensor] = {}
    for index, pair in enumerate(pairs):
        if progress:
            progress(index, len(pairs), pair.name)
        lr, hr, notes = load_pair_tensors(pair, dataset.scale)
        start = time.perf_counter()
        try:
            sr = model.super_resolve(lr)
        except DivergedError as exc:
            raise DivergedError(f"{pair.name}: {exc}") from None
        seconds = time.perf_counter() - start
        fp = fp_outputs.get(pair.name) if fp_outputs is not None else None
        undefined: dict[str, str] = {}
        scores = suite.score(sr, hr, fp, image=pair.name, undefined=undefined)
        if out_path is not None:
            save_png(out_path / f"{pair.name}.png", sr)
        if keep_outputs:
            outputs[pair.name] = sr
        rows.append({
            "image": pair.name,
            "lr_path": str(pair.lr_path),
            "hr_path": str(pair.hr_path) if pair.hr_path else None,
            "lr_size": [int(lr.shape[-1]), int(lr.shape[-2])],
            "sr_size": [int(sr.shape[-1]), int(sr.shape[-2])],
            "conversions": notes,
            "seconds": round(seconds, 4),
            **scores,
            **({"undefined": undefined} if undefined else {}),
        })  # fmt: skip
    means, unavailable = _means(rows, suite.per_image), dict(suite.unavailable)
    unavailable.update(_undefined_reasons(rows))
    settings = model.settings.to_dict() if hasattr(model, "settings") else {}
    return EvalResult(
        dataset=dataset.name,
        rows=rows,
        means=means,
        unavailable=unavailable,
        metric_specs=suite.spec_records(),
        settings=settings,
        outputs=outputs,
    )


def _means(rows: list[dict], metric_names: list[str]) -> dict[str, float]:
    """Per-metric mean over the images; a metric undefined on any image has no mean (never a mean
    over the images where it happened to be defined, which would compare different image sets)."""
    means = {}
    for name in metric_names:
        values = [r.get(name) for r in rows]
        if values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            means[name] = sum(values) / len(values)
    return means


def _undefined_reasons(rows: list[dict]) -> dict[str, str]:
    """``metric -> "undefined on k of N images: first reason"`` for metrics undefined somewhere."""
    counts: dict[str, list[str]] = {}
    for row in rows:
        for name, reason in (row.get("undefined") or {}).items():
            counts.setdefault(name, []).append(reason)
    return {
        name: f"undefined on {len(reasons)} of {len(rows)} images (first: {reasons[0]})"
        for name, reasons in counts.items()
    }

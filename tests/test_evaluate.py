"""evaluate_dataset: per-image rows, means, and undefined per-image scores (NIQE of a flat image)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.datasets import get_dataset
from harness.evaluate import evaluate_dataset
from harness.metrics import MetricSuite


class _FlatForSecondImage:
    """Bicubic ×4 for every image except the second, which comes out flat grey (a collapsed model)."""

    def __init__(self):
        self.calls = 0

    def super_resolve(self, lr: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        return torch.full_like(up, 0.5) if self.calls == 2 else up


def test_an_undefined_niqe_score_leaves_the_other_metrics_and_images_intact():
    dataset = get_dataset("demo").resolve()
    suite = MetricSuite(["psnr", "niqe"])
    result = evaluate_dataset(
        _FlatForSecondImage(), dataset, ["psnr", "niqe"], limit=2, suite=suite
    )
    first, second = result.rows
    assert "niqe" in first and "undefined" not in first
    assert "niqe" not in second and "niqe" in second["undefined"]
    assert second["psnr"] < first["psnr"]
    # no mean over a subset of the images: the metric is marked undefined with the count
    assert "niqe" not in result.means and "psnr" in result.means
    assert "undefined on 1 of 2 images" in result.unavailable["niqe"]
    assert result.means["psnr"] == (first["psnr"] + second["psnr"]) / 2


def test_suite_score_raises_on_an_undefined_score_unless_asked_to_record_it():
    from harness.errors import MetricUndefined

    suite = MetricSuite(["niqe"])
    flat = torch.full((1, 3, 128, 128), 0.5)
    with pytest.raises(MetricUndefined, match="flat.png"):
        suite.score(flat, image="flat.png")
    undefined: dict[str, str] = {}
    assert suite.score(flat, image="flat.png", undefined=undefined) == {}
    assert "flat.png" in undefined["niqe"]

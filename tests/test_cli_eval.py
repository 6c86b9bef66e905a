"""`qbench quantize` then `qbench eval --quantized` with psnr_fp: the FP reference is computed from the
quantized model's recorded base model."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import ConfigError
from harness.loaders import TINY_DIR


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    if not (TINY_DIR / "unet" / "config.json").is_file():
        pytest.skip("the embedded tiny model is not installed")
    out = tmp_path_factory.mktemp("q") / "minmax-W8A8"
    args = ["quantize", "--model", "tiny", "--method", "minmax", "--bits", "W8A8", "--scope", "U",
            "--calib-n", "2", "--calib-crop", "16", "--bops-size", "0", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_eval_quantized_computes_the_fp_reference_metrics(quantized_dir, tmp_path):
    args = ["eval", "--quantized", str(quantized_dir), "--dataset", "demo", "--limit", "1",
            "--metrics", "psnr,psnr_fp,ssim_fp", "--out", str(tmp_path / "eval")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    means = summary["means"]
    assert set(means) == {"psnr", "psnr_fp", "ssim_fp"}
    assert all(math.isfinite(v) for v in means.values())
    assert 0 < means["ssim_fp"] < 1  # a quantized model differs from its FP base


def test_fp_metrics_without_a_quantized_model_are_refused(tmp_path):
    args = ["eval", "--model", "bicubic", "--dataset", "demo", "--limit", "1",
            "--metrics", "psnr_fp", "--out", str(tmp_path / "eval")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    # a QBenchError (the `qbench` entry point prints it as one line and exits 2), before any work
    assert isinstance(result.exception, ConfigError)
    assert "--quantized" in str(result.exception)
    assert not (tmp_path / "eval").exists()

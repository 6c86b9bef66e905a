"""Tests for harness.scoring and the `qbench score` / `qbench doctor` / `qbench ls metrics` commands."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from harness.errors import ConfigError, DatasetError, ImageError, MetricUnavailable
from harness.scoring import pair_directories, score_directories, write_scores
from tests import _reference_metrics as ref

WEIGHTED = ("lpips", "dists", "musiq", "maniqa", "maniqa-pipal", "clipiqa", "fid")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty TORCH_HOME and Hugging Face caches, so a user's real cache cannot change results."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def _png(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """Write a random RGB PNG of (width, height) and return its [0, 1] pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.float32) / 255


def _cli():
    from harness.cli import app

    return app


# ----------------------------------------------------------------------------------- pairing


def test_pairs_by_exact_stem_across_extensions(tmp_path):
    _png(tmp_path / "hr" / "b.png", 1)
    _png(tmp_path / "hr" / "a.png", 2)
    _png(tmp_path / "sr" / "a.jpg", 3)
    _png(tmp_path / "sr" / "b.png", 4)
    (tmp_path / "sr" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sr" / "notes.txt").write_text("not an image")
    pairs = pair_directories(tmp_path / "sr", tmp_path / "hr")
    assert [(p.sr.name, p.hr.name) for p in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png")]


def test_pairs_through_a_template(tmp_path):
    _png(tmp_path / "hr" / "baby.png", 1)
    _png(tmp_path / "sr" / "baby_x4.png", 2)
    pairs = pair_directories(tmp_path / "sr", tmp_path / "hr", sr_template="{stem}_x4")
    assert [(p.sr.name, p.hr.name) for p in pairs] == [("baby_x4.png", "baby.png")]


def test_every_unpaired_file_is_listed_in_one_error(tmp_path):
    # Sort order would pair a<->b and b<->c; exact-stem pairing must refuse instead.
    for name in ("a.png", "b.png"):
        _png(tmp_path / "sr" / name, 1)
    for name in ("b.png", "c.png", "d.png"):
        _png(tmp_path / "hr" / name, 2)
    with pytest.raises(DatasetError) as info:
        pair_directories(tmp_path / "sr", tmp_path / "hr")
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "sr/a.png" in message and "hr/c.png" in message and "hr/d.png" in message


def test_ambiguous_stems_and_bad_templates_are_errors(tmp_path):
    _png(tmp_path / "sr" / "a.png", 1)
    _png(tmp_path / "sr" / "a.jpg", 1)
    _png(tmp_path / "hr" / "a.png", 2)
    with pytest.raises(DatasetError, match="ambiguous SR stem 'a'"):
        pair_directories(tmp_path / "sr", tmp_path / "hr")
    for template in ("x4", "{stem}{stem}", "{name}", "{stem}/x", "{"):
        with pytest.raises(ConfigError, match="sr-template"):
            pair_directories(tmp_path / "sr", tmp_path / "hr", sr_template=template)


def test_missing_or_empty_directories_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        pair_directories(tmp_path / "nope", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        pair_directories(tmp_path / "empty", None)


# ----------------------------------------------------------------------------------- scoring


def test_score_and_write_files(tmp_path):
    sr = {n: _png(tmp_path / "sr" / f"{n}.png", i) for i, n in enumerate(("x", "y"))}
    hr = {n: _png(tmp_path / "hr" / f"{n}.png", 10 + i) for i, n in enumerate(("x", "y"))}
    result = score_directories(tmp_path / "sr", tmp_path / "hr", "psnr,ssim")
    assert [r["image"] for r in result.rows] == ["x.png", "y.png"]
    for row in result.rows:
        stem = row["image"][:-4]
        assert row["psnr"] == pytest.approx(ref.psnr_y(sr[stem], hr[stem], eps=1e-8), abs=1e-4)
        expected = ref.ssim_y(sr[stem], hr[stem], clip_negative_cs=True)
        assert row["ssim"] == pytest.approx(expected, abs=1e-5)
    assert result.means["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result.rows]))
    paths = write_scores(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "per_image.csv",
        "per_image.jsonl",
        "summary.json",
    ]
    lines = paths["per_image.jsonl"].read_text().splitlines()
    assert [json.loads(line)["psnr"] for line in lines] == [r["psnr"] for r in result.rows]
    with open(paths["per_image.csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["ssim"]) for r in table] == [r["ssim"] for r in result.rows]
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["means"] == result.means and summary["n_images"] == 2
    assert summary["metric_records"]["psnr"]["pyiqa_call"].startswith("pyiqa.create_metric('psnr'")
    assert summary["versions"]["pyiqa"] == summary["metric_records"]["ssim"]["pyiqa_version"]


def test_size_mismatch_is_an_error_not_a_resize(tmp_path):
    _png(tmp_path / "sr" / "a.png", 1, size=(40, 32))
    _png(tmp_path / "hr" / "a.png", 2, size=(40, 36))
    with pytest.raises(ImageError, match=r"40x32 .*40x36"):
        score_directories(tmp_path / "sr", tmp_path / "hr", "psnr")


def test_reference_requirements(tmp_path, empty_caches):
    _png(tmp_path / "sr" / "a.png", 1)
    _png(tmp_path / "hr" / "a.png", 2)
    with pytest.raises(ConfigError, match="need HR images"):
        score_directories(tmp_path / "sr", None, "psnr,niqe")
    with pytest.raises(ConfigError, match="full-precision"):
        score_directories(tmp_path / "sr", tmp_path / "hr", "psnr_fp")
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth"):
        score_directories(tmp_path / "sr", tmp_path / "hr", "lpips")
    partial = score_directories(tmp_path / "sr", tmp_path / "hr", "psnr,lpips")
    assert list(partial.means) == ["psnr"] and "lpips" in partial.unavailable


def test_no_reference_scoring(tmp_path, empty_caches):
    _png(tmp_path / "sr" / "a.png", 1, size=(128, 100))
    result = score_directories(tmp_path / "sr", None, "niqe")
    assert result.rows[0]["hr_path"] is None
    assert np.isfinite(result.rows[0]["niqe"])


# ------------------------------------------------------------------------------------ the CLI


def test_ls_metrics_lists_everything(empty_caches):
    out = CliRunner().invoke(_cli(), ["ls", "metrics"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    for name in ("psnr", "ssim", "psnr_fp", "niqe", "maniqa-pipal", "clipiqa", "fid"):
        assert name in out.output
    assert "test_y_channel=True" in out.output and "↓" in out.output


def test_help_texts_have_examples():
    runner = CliRunner()
    for args in (["score", "--help"], ["doctor", "--help"], ["ls", "metrics", "--help"]):
        out = runner.invoke(_cli(), args, env={"COLUMNS": "200"})
        assert out.exit_code == 0 and "Examples" in out.output, args


def test_doctor_names_missing_files_and_directories(empty_caches):
    from harness.commands.metrics import doctor_lines

    text = "\n".join(doctor_lines())
    assert "CUDA available" in text and "torch " in text
    import harness.metrics as hm

    for name in WEIGHTED:
        assert re.search(rf"^  {re.escape(name)}\s+UNAVAILABLE", text, re.M), name
        for required in hm.METRICS[name].required_files:
            assert required.filename in text
            assert f"put it in: {required.directory}" in text
    assert re.search(r"^  psnr\s+available", text, re.M)
    assert re.search(r"^  niqe\s+available", text, re.M)
    assert "datasets:" in text
    out = CliRunner().invoke(_cli(), ["doctor"], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "LPIPS_v0.1_alex-df73285e.pth" in out.output


def test_set5_bicubic_matches_reference(tmp_path, empty_caches, shared_data):
    """Acceptance: `qbench score` on Set5 with PIL-bicubic x4 SR equals the numpy reference."""
    set5 = shared_data / "Set5"
    if not (set5 / "HR").is_dir():
        pytest.skip(f"Set5 not found under {shared_data}")
    sr_dir = tmp_path / "sr"
    sr_dir.mkdir()
    for lr_path in sorted((set5 / "LR").glob("*.png")):
        lr = Image.open(lr_path).convert("RGB")
        lr.resize((lr.width * 4, lr.height * 4), Image.BICUBIC).save(sr_dir / lr_path.name)
    out_dir = tmp_path / "scores"
    result = CliRunner().invoke(
        _cli(),
        [
            "score",
            str(sr_dir),
            str(set5 / "HR"),
            "--metrics",
            "psnr,ssim,niqe",
            "--out",
            str(out_dir),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out_dir / "per_image.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    ref_psnr, ref_psnr_basicsr, ref_ssim = [], [], []
    for row in rows:
        sr = np.asarray(Image.open(row["sr_path"]).convert("RGB"), dtype=np.float64) / 255
        hr = np.asarray(Image.open(row["hr_path"]).convert("RGB"), dtype=np.float64) / 255
        ref_psnr.append(ref.psnr_y(sr, hr, eps=1e-8))  # pyiqa's formula: MSE + 1e-8
        ref_psnr_basicsr.append(ref.psnr_y(sr, hr))  # BasicSR: no eps
        ref_ssim.append(ref.ssim_y(sr, hr, round_y=True, clip_negative_cs=True))
        assert row["psnr"] == pytest.approx(ref_psnr[-1], abs=1e-4)
        assert row["psnr"] == pytest.approx(ref_psnr_basicsr[-1], abs=1e-4)
        assert row["ssim"] == pytest.approx(ref_ssim[-1], abs=1e-5)
        assert np.isfinite(row["niqe"]) and 2.0 < row["niqe"] < 20.0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["means"]["psnr"] == pytest.approx(np.mean(ref_psnr), abs=1e-4)
    assert summary["means"]["ssim"] == pytest.approx(np.mean(ref_ssim), abs=1e-5)
    assert 28.0 < summary["means"]["psnr"] < 29.0  # the well-known Set5 x4 bicubic Y-PSNR ~28.4
    # NIQE plausibility: the blurry bicubic upsampling scores worse (higher) than HR.
    hr_scores = score_directories(set5 / "HR", None, "niqe")
    assert summary["means"]["niqe"] > hr_scores.means["niqe"]


def test_fid_runs_once_on_exactly_the_paired_files(tmp_path):
    """Folder-level plumbing, with a stand-in for pyiqa's FID (its weights are not on this machine)."""
    import harness.metrics as hm

    for name in ("a", "b"):
        _png(tmp_path / "sr" / f"{name}.png", 1)
        _png(tmp_path / "hr" / f"{name}.png", 2)
    _png(tmp_path / "hr" / "nested" / "extra.png", 3)  # pyiqa's FID would walk into this folder
    seen: list[tuple[list[str], list[str], dict]] = []

    def fake_fid(sr_dir, hr_dir, **kwargs):
        seen.append(
            (
                sorted(p.name for p in Path(sr_dir).rglob("*")),
                sorted(p.name for p in Path(hr_dir).rglob("*")),
                kwargs,
            )
        )
        return 12.5

    suite = hm.MetricSuite("psnr")
    suite.names.append("fid")
    suite.metrics["fid"] = hm.LoadedMetric(hm.METRICS["fid"], fake_fid, "cpu", {})
    result = score_directories(tmp_path / "sr", tmp_path / "hr", suite)
    assert result.folder_scores == {"fid": 12.5}
    assert seen == [
        (
            ["a.png", "b.png"],
            ["a.png", "b.png"],
            {"mode": "clean", "num_workers": 0, "verbose": False},
        )
    ]
    assert list(result.means) == ["psnr"]

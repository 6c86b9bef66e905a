"""The embedded tiny model: `qbench train-tiny --quick`, resume, the shipped weights, the demo set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from harness.cli import app
from harness.loaders import TINY_DIR, load_diffusers_dir
from harness.tiny import photos


def test_train_tiny_quick_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(app, ["train-tiny", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model_dir = out / "model"
    record = json.loads((model_dir / "training.json").read_text())
    assert record["osediff_pkl_loader_check"]["images_equal_within_1e-4"]
    assert all(p["id"] not in photos.DEMO_IDS for p in record["photos"])
    stages = [json.loads(line).get("stage") for line in (out / "work" / "train_log.jsonl").open()]
    assert {"vae", "unet-diffusion", "one-step-sr-latent", "one-step-sr", "done"} <= set(stages)
    model = load_diffusers_dir(model_dir)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = model.super_resolve(lr)
    weights = {p.name: p.read_bytes() for p in model_dir.rglob("*.safetensors")}

    # a second invocation resumes every stage from its final checkpoint and reproduces the weights
    result = CliRunner().invoke(app, ["train-tiny", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "work" / "train_log.jsonl").open()]
    resumed = [r["stage"] for r in log if r.get("event") == "resumed"]
    assert resumed == ["vae", "unet-diffusion", "one-step-sr-latent", "one-step-sr"]
    assert {p.name: p.read_bytes() for p in model_dir.rglob("*.safetensors")} == weights
    assert torch.equal(load_diffusers_dir(model_dir).super_resolve(lr), first)


def test_changed_config_is_refused_without_the_flag(tmp_path):
    import dataclasses

    from harness.tiny.train import TrainConfig, train_tiny

    work = tmp_path / "work"
    work.mkdir()
    (work / "train_config.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(ValueError, match="different training config"):
        train_tiny(tmp_path, dataclasses.replace(TrainConfig.quick()), echo=None)


def test_shipped_tiny_model_is_small_and_documented():
    if not (TINY_DIR / "unet" / "config.json").is_file():
        pytest.skip("the embedded tiny model is not installed")
    size = sum(p.stat().st_size for p in TINY_DIR.rglob("*.safetensors"))
    assert size <= 15 * 1024 * 1024
    record = json.loads((TINY_DIR / "training.json").read_text())
    assert record["command"].startswith("qbench train-tiny")
    assert record["osediff_pkl_loader_check"]["images_equal_within_1e-4"]
    assert (TINY_DIR / "train_log.jsonl").is_file()


def test_demo_set_is_disjoint_from_training_and_licensed():
    import tomllib

    from harness.paths import datasets_dir

    manifest = tomllib.loads((datasets_dir() / "demo" / "MANIFEST.toml").read_text())
    names = {image["name"] for image in manifest["images"]}
    assert names == set(photos.DEMO_IDS)
    assert all(image["licence"] for image in manifest["images"])
    training = {s.id for s in photos.PHOTOS if s.id not in photos.DEMO_IDS}
    assert not names & training
    for name in names:
        for sub in ("HR", "LR", "LR_realesrgan"):
            assert (datasets_dir() / "demo" / sub / f"{name}.png").is_file()


def test_pair_loss_weights_every_pair_alike():
    from harness.tiny.train import pair_loss

    target = torch.zeros(2, 3, 4, 4)
    pred = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 1.0)])
    assert torch.isclose(pair_loss(pred, target, "mse"), torch.tensor((0.01 + 1.0) / 2))
    log_loss = pair_loss(pred, target, "log-mse")
    assert torch.isclose(log_loss, torch.tensor((math.log(0.01) + math.log(1.0)) / 2))
    # halving the error of the nearly exact pair moves log-mse as much as halving the large one
    smaller = pred.clone()
    smaller[0] /= 2
    larger_fixed = pred.clone()
    larger_fixed[1] /= 2
    assert torch.isclose(
        pair_loss(smaller, target, "log-mse"), pair_loss(larger_fixed, target, "log-mse")
    )
    with pytest.raises(ValueError, match="sr_loss"):
        pair_loss(pred, target, "l1")


def test_train_config_refuses_unknown_stage3_choices_at_construction():
    from harness.tiny.train import TrainConfig

    with pytest.raises(ValueError, match="sr_loss"):
        TrainConfig(sr_loss="l1")
    with pytest.raises(ValueError, match="sr_latent_params"):
        TrainConfig(sr_latent_params="some")

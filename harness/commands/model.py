"""CLI: ``qbench eval`` and ``qbench train-tiny``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()

DEFAULT_EVAL_METRICS = "psnr,ssim,niqe,lpips,dists,musiq,maniqa,clipiqa"


def _write_eval(result, out: Path) -> None:
    from harness.fsutil import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "per_image.jsonl", "".join(json.dumps(r) + "\n" for r in result.rows))
    atomic_write_text(out / "summary.json", json.dumps(result.summary(), indent=2))


def eval_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name or folder spec."),
    model: str = typer.Option(
        "tiny", "--model", "-m", help="tiny | bicubic | PATH | osediff:sd=DIR,pkl=FILE"
    ),
    quantized: Path | None = typer.Option(
        None, "--quantized", "-q", help="A directory written by `qbench quantize`."
    ),
    metrics: str = typer.Option(
        DEFAULT_EVAL_METRICS, "--metrics", help="Comma-separated metric names."
    ),
    out: Path = typer.Option(
        Path("runs/eval"), "--out", "-o", help="Where SR images and scores go."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N pairs."),
    root: Path | None = typer.Option(
        None, "--root", help="Dataset root directory (overrides QBENCH_DATA)."
    ),
    timestep: int | None = typer.Option(None, "--timestep", help="Override the UNet timestep T."),
) -> None:
    """Super-resolve a dataset with a model and score it (per-image rows and means).

    Examples:

      qbench eval --model tiny --dataset demo

      qbench eval --model bicubic --dataset bsd100 --metrics psnr,ssim,niqe

      qbench eval --quantized runs/q/minmax-W4A4 --dataset demo --out runs/eval/minmax-W4A4

      qbench eval --quantized runs/q/minmax-W4A4 --dataset demo --metrics psnr,psnr_fp,ssim_fp
    """
    import dataclasses

    from harness.datasets import get_dataset
    from harness.errors import ConfigError
    from harness.evaluate import evaluate_dataset, load_pair_tensors
    from harness.loaders import load_model
    from harness.metrics import get_metric_spec

    if quantized is not None:
        from harness.quant.io import load_quantized

        sr_model = load_quantized(quantized)
    else:
        sr_model = load_model(model)
    if timestep is not None and hasattr(sr_model, "settings"):
        sr_model.settings = dataclasses.replace(sr_model.settings, timestep=timestep)
    resolved = get_dataset(dataset).resolve(root)
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    fp_outputs = None
    if any(get_metric_spec(n).kind == "fp" for n in names):
        if quantized is None:
            raise ConfigError(
                "psnr_fp/ssim_fp compare a quantized model with its full-precision base: "
                "use them with --quantized"
            )
        if not getattr(sr_model, "base_model", None):
            raise ConfigError(
                f"{quantized}: the record names no base model to compute psnr_fp from"
            )
        fp_model = load_model(sr_model.base_model)
        with console.status(f"full-precision reference ({sr_model.base_model}) on {resolved.name}"):
            fp_outputs = {
                pair.name: fp_model.super_resolve(load_pair_tensors(pair, resolved.scale)[0])
                for pair in list(resolved.pairs)[: limit if limit else None]
            }
    with console.status(f"evaluating on {resolved.name}") as status:
        result = evaluate_dataset(
            sr_model,
            resolved,
            names,
            out_dir=out / "images",
            limit=limit,
            fp_outputs=fp_outputs,
            progress=lambda i, n, name: status.update(
                f"{resolved.name}: image {i + 1}/{n} ({name})"
            ),
        )
    _write_eval(result, out)
    table = Table(
        title=f"{model if quantized is None else quantized} on {resolved.name} ({len(result.rows)} images)"
    )
    table.add_column("metric")
    table.add_column("mean", justify="right")
    for name, value in result.means.items():
        table.add_row(name, f"{value:.4f}")
    for name, reason in result.unavailable.items():
        table.add_row(name, f"[yellow]unavailable[/]: {reason}")
    console.print(table)
    console.print(f"per-image rows and summary in {out}")


def train_tiny_command(
    out: Path = typer.Option(
        Path(".tiny-train"), "--out", "-o", help="Work directory (checkpoints, log, model)."
    ),
    quick: bool = typer.Option(False, "--quick", help="A few steps of each stage (for tests)."),
    seed: int = typer.Option(0, "--seed"),
    install: bool = typer.Option(
        False, "--install", help="Copy the trained model into harness/assets/tiny."
    ),
    threads: int = typer.Option(
        1,
        "--threads",
        min=1,
        help="torch threads. 1 (default) is the fastest on a busy 2-core machine: with 2 threads "
        "and another process running, OpenMP barriers make each step several times slower.",
    ),
) -> None:
    """Train the embedded tiny OSEDiff-like model from scratch (resumable: rerun to continue).

    Examples:

      qbench train-tiny                      # the full run that produced the shipped weights

      qbench train-tiny --quick --out /tmp/t # a few steps of each stage

      qbench train-tiny --install            # finish (or resume) and install into harness/assets/tiny
    """
    import dataclasses

    import torch

    from harness.loaders import TINY_DIR
    from harness.tiny.train import TrainConfig, train_tiny

    torch.set_num_threads(threads)
    cfg = TrainConfig.quick() if quick else TrainConfig()
    cfg = dataclasses.replace(cfg, seed=seed)
    model_dir = train_tiny(out, cfg, echo=lambda line: console.print(line, highlight=False))
    console.print(f"model written to {model_dir}")
    if install:
        if TINY_DIR.exists():
            shutil.rmtree(TINY_DIR)
        shutil.copytree(model_dir, TINY_DIR, ignore=shutil.ignore_patterns("osediff.pkl"))
        for record in ("train_log.jsonl", "train_config_history.jsonl"):
            if (Path(out) / "work" / record).is_file():
                shutil.copy2(Path(out) / "work" / record, TINY_DIR / record)
        console.print(f"installed into {TINY_DIR}")


def register(app: typer.Typer, ls_app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("train-tiny")(train_tiny_command)

"""CLI: ``qbench ls metrics``, ``qbench score`` and ``qbench doctor``.

Thin wrappers: the logic lives in :mod:`harness.metrics` and :mod:`harness.scoring`; the report
functions here (:func:`metrics_table`, :func:`doctor_lines`) are plain and testable.
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import QBenchError
from harness.metrics import METRICS, PYIQA_VERSION, metric_status

KIND_LABELS = {"fr": "FR (HR)", "nr": "NR", "fp": "FR (FP output)", "folder": "folder (HR)"}

LS_METRICS_HELP = (
    "List every metric: direction, reference type, the exact pyiqa call, and whether its weight "
    "files are present (checked on disk only, never downloaded).\n\n"
    "Examples:\n\n"
    "  qbench ls metrics\n\n"
    "  TORCH_HOME=/data/torch qbench ls metrics"
)

SCORE_HELP = (
    "Score a directory of SR images, against HR images when HR_DIR is given. Pairs files by exact "
    "stem (or --sr-template), never by sort order; refuses size mismatches instead of resizing. "
    "Writes per_image.jsonl, per_image.csv and summary.json to --out and prints the means.\n\n"
    "Default metrics: psnr,ssim,niqe with HR_DIR, niqe without.\n\n"
    "Examples:\n\n"
    "  qbench score runs/sr/Set5 ../shared/data/Set5/HR --out runs/scores/set5\n\n"
    "  qbench score out/ hr/ --metrics psnr,ssim,lpips,niqe,musiq --out scores/\n\n"
    "  qbench score out/ hr/ --sr-template '{stem}_x4' --out scores/   # baby_x4.png <-> baby.png\n\n"
    "  qbench score out/ --metrics niqe,clipiqa --out scores/          # no reference"
)

DOCTOR_HELP = (
    "Check this machine: Python, torch and device, which metric weight files are present or "
    "missing (exact file names and the directory to put them in), and which dataset roots are "
    "found and valid. Reads the disk only; never downloads.\n\n"
    "Examples:\n\n"
    "  qbench doctor\n\n"
    "  TORCH_HOME=/data/torch QBENCH_DATA=/data/sr qbench doctor"
)


def metrics_table() -> Table:
    """A rich table of every metric with its availability."""
    table = Table(title=f"metrics (pyiqa {PYIQA_VERSION})")
    table.add_column("name", style="bold")
    table.add_column("dir")
    table.add_column("reference")
    table.add_column("pyiqa call")
    table.add_column("status", overflow="fold")
    for name, spec in METRICS.items():
        status = metric_status(name)
        if status.available:
            state = "[green]available[/green]"
        else:
            names = ", ".join(p.name for p in status.missing)
            state = f"[red]missing[/red] {names} (see qbench doctor)"
        table.add_row(name, spec.arrow, KIND_LABELS[spec.kind], spec.pyiqa_call, state)
    return table


def doctor_lines() -> list[str]:
    """The ``qbench doctor`` report as plain lines (no rich markup)."""
    import torch

    from harness.metrics import hf_hub_cache_dir, pyiqa_cache_dir, torch_hub_dir

    cuda = torch.cuda.is_available()
    lines = [
        f"python {platform.python_version()} ({platform.platform()})",
        f"torch {torch.__version__}; CUDA available: {'yes' if cuda else 'no'}; "
        f"device for metrics and models: {'cuda' if cuda else 'cpu'}",
        f"pyiqa {PYIQA_VERSION}",
        f"weight caches: pyiqa {pyiqa_cache_dir()}; torchvision {torch_hub_dir() / 'checkpoints'}; "
        f"CLIP {torch_hub_dir() / 'clip'}; Hugging Face {hf_hub_cache_dir()}",
        "",
        "metrics:",
    ]
    for name, spec in METRICS.items():
        status = metric_status(name)
        if status.available:
            lines.append(f"  {name:<13} available ({status.reason})")
            continue
        lines.append(f"  {name:<13} UNAVAILABLE: missing {len(status.missing)} file(s)")
        for required in spec.required_files:
            if required.find() is None:
                lines.append(f"      {required.describe()}")
                lines.append(f"        put it in: {required.directory}")
    lines += ["", "datasets:"]
    lines += _dataset_lines()
    return lines


def _dataset_lines() -> list[str]:
    try:
        datasets = importlib.import_module("harness.datasets")
    except ModuleNotFoundError as exc:
        if exc.name != "harness.datasets":
            raise
        return ["  datasets are not available (harness.datasets is not installed yet)"]
    try:
        names = datasets.list_datasets()
    except QBenchError as exc:
        return [f"  cannot read the dataset registry: {exc}"]
    lines: list[str] = []
    for name in names:
        try:
            definition = datasets.get_dataset(name)
            try:
                resolved = definition.resolve(strict=False, synthesize=False)
            except TypeError:
                resolved = definition.resolve()
        except QBenchError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            lines.append(f"  {name:<22} not found: {first}")
            continue
        problems = tuple(getattr(resolved, "problems", ()))
        state = (
            "valid"
            if not problems
            else f"INVALID ({len(problems)} problem(s); run qbench validate {name})"
        )
        lines.append(f"  {name:<22} {state}: {len(resolved.pairs)} pairs at {resolved.root}")
    return lines or ["  no datasets registered"]


def ls_metrics_command() -> None:
    Console().print(metrics_table())


def score_command(
    sr_dir: Path = typer.Argument(..., help="Directory of SR images."),
    hr_dir: Path | None = typer.Argument(
        None, help="Directory of HR images (omit for NR metrics)."
    ),
    metrics: str | None = typer.Option(
        None, "--metrics", "-m", help="Comma-separated metric names (see `qbench ls metrics`)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the score files."),
    sr_template: str = typer.Option(
        "{stem}", "--sr-template", help="SR stem from the HR stem, e.g. '{stem}_x4'."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device for the metrics."),
) -> None:
    from harness.scoring import score_directories, write_scores

    names = metrics or ("psnr,ssim,niqe" if hr_dir is not None else "niqe")
    result = score_directories(sr_dir, hr_dir, names, sr_template=sr_template, device=device)
    paths = write_scores(result, out)
    console = Console()
    table = Table(title=f"{len(result.rows)} images: {sr_dir}")
    table.add_column("metric", style="bold")
    table.add_column("dir")
    table.add_column("mean", justify="right")
    for name, value in result.means.items():
        table.add_row(name, METRICS[name].arrow, f"{value:.4f}")
    for name, value in result.folder_scores.items():
        table.add_row(f"{name} (folder)", METRICS[name].arrow, f"{value:.4f}")
    console.print(table)
    for name, reason in result.unavailable.items():
        console.print(f"[yellow]skipped {name}[/yellow]: {reason}", soft_wrap=True)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", soft_wrap=True)


def doctor_command() -> None:
    console = Console()
    for line in doctor_lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer, ls_app: typer.Typer) -> None:
    """Add ``ls metrics``, ``score`` and ``doctor`` to the qbench app."""
    ls_app.command("metrics", help=LS_METRICS_HELP)(ls_metrics_command)
    app.command("score", help=SCORE_HELP)(score_command)
    app.command("doctor", help=DOCTOR_HELP)(doctor_command)

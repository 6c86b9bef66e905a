"""``python -m bench.quality``: the demo main table — psnr_fp, PSNR, SSIM and NIQE per method and bits
with the FP and bicubic rows — so that a regression in any method shows up as a number.

By default it reads a finished run directory (``--run-dir``, default ``runs/demo``, written by
``qbench run-matrix configs/demo.toml``; nothing is recomputed for the stored cells) and evaluates the
bicubic reference row itself on the same datasets and image limit with the same metric code
(:func:`harness.evaluate.evaluate_dataset` on the ``bicubic`` model, as ``qbench eval --model
bicubic``). ``--run`` first runs (or resumes) the matrix of ``--config`` into ``--run-dir``; the demo
matrix takes tens of minutes on both cores of a 2-core CPU.

Rows: every main-table entry of the run (ablations excluded), one per bits, mean over the seeds that
finished; a cell that failed or diverged shows its status instead of numbers. Values are means over
the images of each dataset (``psnr_fp``: PSNR of the quantized output against the FP output).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench._common import REPO, base_parser, machine_info, print_table, write_results

METRICS = ("psnr_fp", "psnr", "ssim", "niqe")


def stored_rows(run_dir: Path, metrics: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """The run's config and one row per (label, bits) of its main-table cells."""
    from reports import load_run

    results = load_run(run_dir)
    groups: dict[tuple[str, str], list] = {}
    for cell in results.cells:
        if cell.ablation_of is None:
            groups.setdefault((cell.label, cell.bits), []).append(cell)
    rows = []
    for (label, bits), cells in groups.items():
        done = [c for c in cells if c.status == "done"]
        row: dict = {
            "label": label,
            "bits": "W32A32" if bits == "FP" else bits,
            "method": cells[0].method,
            "status": "done" if done else ",".join(sorted({c.status for c in cells})),
            "seeds": len(done),
            "datasets": {},
        }
        if not done:
            row["reason"] = next((c.reason for c in cells if c.reason), None)
        for dataset in results.datasets:
            values = {}
            for metric in metrics:
                found = [
                    c.dataset(dataset).get("means", {}).get(metric)
                    for c in done
                    if c.dataset(dataset).get("means", {}).get(metric) is not None
                ]
                values[metric] = (
                    statistics.fmean(found) if len(found) == len(done) and done else None
                )
            row["datasets"][dataset] = values
        rows.append(row)
    return results.config, rows


def bicubic_row(config: dict, metrics: tuple[str, ...]) -> dict:
    """The bicubic reference evaluated now on the run's datasets and limit."""
    from harness.datasets import get_dataset
    from harness.evaluate import evaluate_dataset
    from harness.loaders import load_model

    model = load_model("bicubic")
    row: dict = {
        "label": "Bicubic",
        "bits": "-",
        "method": "bicubic",
        "status": "done",
        "datasets": {},
    }
    wanted = [m for m in metrics if m != "psnr_fp"]
    for dataset in config.get("datasets", []):
        result = evaluate_dataset(
            model, get_dataset(dataset).resolve(), wanted, limit=config.get("limit")
        )
        row["datasets"][dataset] = {m: result.means.get(m) for m in metrics}
        row.setdefault("unavailable", {})[dataset] = result.unavailable
    return row


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument(
        "--run", action="store_true", help="run (or resume) the matrix of --config first"
    )
    parser.add_argument("--workers", type=int, default=None, help="Ray workers for --run")
    parser.add_argument("--no-bicubic", action="store_true", help="skip the bicubic row")
    args = parser.parse_args(argv)

    machine = machine_info()
    run_summary = None
    if args.run:
        from harness.runner import run_matrix

        summary = run_matrix(args.config, out_dir=args.run_dir, num_workers=args.workers)
        run_summary = {"describe": summary.describe(), "wall_seconds": summary.wall_seconds}
        print(summary.describe(), flush=True)
    if not (args.run_dir / "config.resolved.json").is_file():
        raise SystemExit(
            f"{args.run_dir} is not a run directory: run `qbench run-matrix configs/demo.toml` "
            "first, or pass --run"
        )
    config, rows = stored_rows(args.run_dir, METRICS)
    if not args.no_bicubic:
        rows.append(bicubic_row(config, METRICS))
    datasets = config.get("datasets", [])
    columns = ["method", "bits", "status"]
    columns += [f"{d}:{m}" for d in datasets for m in METRICS]
    table = []
    for row in rows:
        line = [row["label"], row["bits"], row["status"]]
        for dataset in datasets:
            values = row["datasets"].get(dataset, {})
            line += [values.get(m) for m in METRICS]
        table.append(line)
    limit = config.get("limit")
    print_table(
        columns,
        table,
        title=f"quality: {args.run_dir} ({config.get('model')} model"
        + (f", first {limit} image(s) per dataset" if limit else "")
        + "); '-' = not applicable or unavailable (see the JSON / qbench report)",
    )
    figures = {
        "run_dir": str(args.run_dir),
        "config_name": config.get("name"),
        "model": config.get("model"),
        "limit": limit,
        "datasets": datasets,
        "metrics": list(METRICS),
        "rows": rows,
        "run": run_summary,
    }
    write_results("quality", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

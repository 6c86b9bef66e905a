"""``python -m bench.ray_scaling``: the smoke matrix (``configs/smoke.toml``) with 1 and with 2 Ray
workers in one benchmark process; target (issue 8): ≥ 1.6× speed-up with 2 workers.

Each run goes to a fresh temporary run directory with a fresh worker cache (no calibrated model or FP
reference is reused), through :func:`harness.runner.run_matrix` exactly as ``qbench run-matrix
--workers N`` does: Ray is started with ``num_cpus=N`` and shut down at the end of each run, so the
wall time includes Ray's start-up and each worker's imports and model load. Runs alternate
(1, 2, 2, 1, …) for ``--repeats`` pairs; the speed-up is median(1 worker) / median(2 workers).

Besides the measured speed-up the benchmark prints the *schedulable* bound: with the cells' own
durations (``timings.total_s`` of the 1-worker runs) placed on 2 workers longest-first, the ratio of
their sum to the longest worker's total. The smoke matrix has three cells (FP, MinMax W8A8, MinMax
W4A4), so even with zero overhead 2 workers cannot beat ``sum / makespan`` (≤ 1.5 for three equal
cells): the 1.6× target needs a matrix of more, shorter cells, and is printed against both.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from bench._common import (
    REPO,
    base_parser,
    machine_info,
    median,
    met,
    print_table,
    write_results,
)

TARGET = 1.6


def run_smoke(config: Path, workers: int, root: Path, tag: str) -> dict:
    """One fresh ``run_matrix`` of ``config`` with ``workers`` Ray CPUs under ``root``."""
    from harness.runner import run_matrix
    from harness.store import RunStore

    run_dir, cache = root / f"run-{tag}", root / f"cache-{tag}"
    summary = run_matrix(
        config, out_dir=run_dir, cache_dir=cache, num_workers=workers, progress=False
    )
    store = RunStore(run_dir)
    cell_seconds = {}
    for cell in summary.cells:
        stored = store.read_cell(cell.cell_id)
        if stored is not None:
            cell_seconds[cell.title] = (stored.record.get("timings") or {}).get("total_s")
    return {
        "workers": workers,
        "wall_seconds": summary.wall_seconds,
        "statuses": dict(summary.statuses),
        "complete": summary.complete,
        "cell_seconds": cell_seconds,
        "run_dir": str(run_dir),
    }


def schedulable_speedup(durations: list[float], workers: int) -> float | None:
    """sum / makespan of longest-first list scheduling on ``workers`` machines."""
    if not durations:
        return None
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return sum(durations) / max(loads)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "smoke.toml")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = parser.parse_args(argv)

    machine = machine_info()
    root = Path(tempfile.mkdtemp(prefix="qbench-ray-scaling-"))
    runs: list[dict] = []
    try:
        for pair in range(args.repeats):
            order = (1, 2) if pair % 2 == 0 else (2, 1)
            for workers in order:
                print(f"run {len(runs) + 1}: {workers} worker(s) ...", flush=True)
                runs.append(run_smoke(args.config, workers, root, f"{len(runs)}-{workers}w"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    one = [r["wall_seconds"] for r in runs if r["workers"] == 1]
    two = [r["wall_seconds"] for r in runs if r["workers"] == 2]
    speedup = median(one) / median(two)
    cell_durations = [
        s for r in runs if r["workers"] == 1 for s in r["cell_seconds"].values() if s is not None
    ]
    per_run_cells = len(runs[0]["cell_seconds"]) if runs else 0
    bound = schedulable_speedup(cell_durations[:per_run_cells], 2)
    complete = all(r["complete"] for r in runs)
    rows = [[r["workers"], r["wall_seconds"], "yes" if r["complete"] else "NO"] for r in runs]
    print_table(["workers", "wall (s)", "all cells done"], rows, title="ray_scaling: smoke matrix")
    print_table(
        ["measure", "value", "target", "verdict"],
        [
            [
                "speed-up (median 1 w / median 2 w)",
                speedup,
                f">= {TARGET}",
                met(speedup, TARGET, at_least=True),
            ],
            ["schedulable bound of these cells on 2 workers", bound, "", ""],
        ],  # fmt: skip
        title=f"{len(runs)} run(s), cells per run: {per_run_cells}",
    )
    figures = {
        "config": str(args.config),
        "runs": runs,
        "speedup": speedup,
        "schedulable_bound_2_workers": bound,
        "target": TARGET,
        "verdict": met(speedup, TARGET, at_least=True),
        "all_complete": complete,
    }
    write_results("ray_scaling", figures, machine=machine, args=args, path=args.json)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())

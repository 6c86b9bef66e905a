"""``python -m bench.resume_cost``: wall time of re-running a finished run against the first run;
target (issue 8): ≤ 10 % of the first run's wall time.

Two measurements, each a fresh first run followed by reruns of the finished directory:

- ``in-process``: :func:`harness.runner.run_matrix` called twice in this process (the cost of resume
  itself, imports already paid);
- ``cli``: ``qbench run-matrix CONFIG --out DIR --workers N --no-progress --no-report`` as separate
  processes (what a user sees, including interpreter start-up and imports in both); the worker
  cache is a fresh ``QBENCH_CACHE``. ``--no-cli`` skips it.

Runs the smoke matrix (``configs/smoke.toml``) into a fresh temporary run directory with a fresh
worker cache, then the same command again on the finished directory (which must skip every cell and
submit no Ray task: the rerun loads and validates the config, hashes the dataset manifests, reads
and checks every committed cell, and writes provenance and status). Both times are the
:func:`harness.runner.run_matrix` wall time, measured in the same process; ``--repeats`` reruns the
finished directory several times and uses the median.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, base_parser, machine_info, median, met, print_table, write_results

TARGET = 0.10


def _qbench(args, run_dir: Path, cache: Path) -> float:
    command = [
        str(Path(sys.executable).with_name("qbench")), "run-matrix", str(args.config),
        "--out", str(run_dir), "--workers", str(args.workers), "--no-progress", "--no-report",
    ]  # fmt: skip
    env = {**os.environ, "QBENCH_CACHE": str(cache)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    return seconds


def measure_cli(args, root: Path) -> dict:
    """First run and reruns through the ``qbench`` command, each a separate process."""
    run_dir, cache = root / "cli-run", root / "cli-cache"
    first = _qbench(args, run_dir, cache)
    reruns = [_qbench(args, run_dir, cache) for _ in range(args.repeats)]
    from harness.store import RunStore

    sessions = RunStore(run_dir).read_provenance()["sessions"]
    if len(sessions) != 1 + len(reruns) or any(s.get("to_run") for s in sessions[1:]):
        raise SystemExit(f"a CLI rerun of {run_dir} ran cells again: resume is broken")
    rerun = median(reruns)
    return {
        "first_run_seconds": first,
        "rerun_seconds": reruns,
        "rerun_median_seconds": rerun,
        "ratio": rerun / first,
        "verdict": met(rerun / first, TARGET),
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "smoke.toml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="reruns of the finished run")
    parser.add_argument("--no-cli", action="store_true", help="skip the qbench CLI measurement")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="an already finished run directory of --config: time only its reruns "
        "(the first-run time is then read from its cells and not measured here)",
    )
    args = parser.parse_args(argv)

    from harness.runner import run_matrix

    machine = machine_info()
    root = Path(tempfile.mkdtemp(prefix="qbench-resume-cost-"))
    try:
        if args.run_dir is None:
            run_dir, cache = root / "run", root / "cache"
            first = run_matrix(
                args.config, out_dir=run_dir, cache_dir=cache, num_workers=args.workers,
                progress=False,
            )  # fmt: skip
            first_seconds = first.wall_seconds
            executed = len(first.executed)
            if not first.complete:
                raise SystemExit(f"the first run did not finish: {first.reasons}")
        else:
            run_dir, cache, first_seconds, executed = args.run_dir, root / "cache", None, None
        reruns = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            again = run_matrix(
                args.config, out_dir=run_dir, cache_dir=cache, num_workers=args.workers,
                progress=False,
            )  # fmt: skip
            reruns.append(time.perf_counter() - start)
            if again.executed:
                raise SystemExit(f"the rerun executed cells {again.executed}: resume is broken")
        cli = None if args.no_cli else measure_cli(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rerun = median(reruns)
    ratio = rerun / first_seconds if first_seconds else None
    rows = [
        ["in-process", "first run (fresh dir and cache)", first_seconds, "", ""],
        ["in-process", f"rerun of the finished run (median of {len(reruns)})", rerun, "", ""],
        ["in-process", "rerun / first run", ratio, f"<= {TARGET}", met(ratio, TARGET)],
    ]
    if cli is not None:
        rows += [
            ["cli", "first run (fresh dir and cache)", cli["first_run_seconds"], "", ""],
            ["cli", f"rerun (median of {len(cli['rerun_seconds'])})",
             cli["rerun_median_seconds"], "", ""],
            ["cli", "rerun / first run", cli["ratio"], f"<= {TARGET}", met(cli["ratio"], TARGET)],
        ]  # fmt: skip
    print_table(
        ["how", "measure", "seconds / ratio", "target", "verdict"],
        rows,
        title=f"resume_cost: {args.config.name}, {args.workers} worker(s)",
    )
    figures = {
        "config": str(args.config),
        "first_run_seconds": first_seconds,
        "first_run_cells_executed": executed,
        "rerun_seconds": reruns,
        "rerun_median_seconds": rerun,
        "ratio": ratio,
        "target": TARGET,
        "verdict": met(ratio, TARGET),
        "cli": cli,
    }
    write_results("resume_cost", figures, machine=machine, args=args, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

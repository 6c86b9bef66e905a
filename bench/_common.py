"""Shared helpers of the benchmarks: machine record, interleaved timing, a table printer, results.

- :func:`machine_info`: what the figures were measured on (CPU count, torch threads, load average,
  platform, library versions, git commit and dirty flag, UTC date).
- :func:`interleaved`: time several callables side by side, round-robin, ``repeats`` times, with the
  order rotated each round, so a load spike on the shared machine hits every contender alike; the
  comparison is then made on medians (:func:`median`).
- :func:`format_table` / :func:`print_table`: a plain-text table (readable in a terminal and a log).
- :func:`write_results`: ``bench/results/NAME.json`` with the figures, the machine record (load
  average before and after the run) and the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def set_threads(threads: int) -> int:
    """Use ``threads`` torch threads (default 1: one per run-matrix worker); returns the value."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """The machine and code the figures come from (recorded in every result file)."""
    from harness.store import git_state, library_versions

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "niceness": os.nice(0),
        "git": git_state(REPO),
        "libraries": library_versions(("torch", "diffusers", "ray", "numpy", "pillow")),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(
    contenders: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Wall seconds of each contender over ``repeats`` rounds, run round-robin with a rotated order.

    ``warmup`` runs every contender once first, untimed (first-call allocations, lazy imports).
    """
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is installed with ray
        return None
    return psutil.Process().memory_info().rss / 2**20


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in text_rows:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    numeric = [
        all(_is_number(row[i]) for row in rows if row[i] not in (None, "")) and bool(rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        cells = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(cells).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(columns)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in text_rows)
    return "\n".join(out)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    print(format_table(columns, rows, title), flush=True)
    print(flush=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**7:
        return f"{value:.3e}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.3f}"
    return str(value)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as a run-matrix worker)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default bench/results/NAME.json)",
    )
    return parser


def write_results(
    name: str,
    figures: dict[str, Any],
    *,
    machine: dict[str, Any],
    args: argparse.Namespace | None = None,
    path: Path | None = None,
) -> Path:
    """Write ``figures`` with the machine record (load average before = ``machine``'s, after = now)."""
    path = path or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": "python -m bench." + name + " " + " ".join(sys.argv[1:]),
        "options": {k: _jsonable(v) for k, v in vars(args).items()} if args else {},
        "machine": {**machine, "load_average_after": load_average()},
        "figures": _jsonable(figures),
    }
    payload["machine"]["load_average_before"] = payload["machine"].pop("load_average")
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    print(f"results written to {path}", flush=True)
    return path


def _jsonable(value: Any) -> Any:
    """Tuples → lists, Paths → strings, NaN/Inf → None (strict JSON): the run store's conversions."""
    from harness.runconfig import json_data
    from harness.store import finite_json

    return finite_json(json_data(value))


def met(value: float | None, target: float, *, at_least: bool = False) -> str:
    """``met``/``missed (by …)`` for a ratio against its target."""
    if value is None:
        return "not measured"
    ok = value >= target if at_least else value <= target
    if ok:
        return "met"
    return f"missed by {abs(value - target):.2f}"


# --------------------------------------------------------------------------------------------
# quantized tiny models with the smallest calibration budgets (for speed and size, not quality)

METHODS = ("minmax", "ptq4dm", "passionsr", "qartsr")

STRUCTURE_ONLY_PARAMS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "ptq4dm": {"search_candidates": 4, "search_max_elements": 256},
    "passionsr": {"profile": "tiny", "epochs": 1, "max_train_samples": 1},
    "qartsr": {
        "budget": "tiny",
        "trq": False,
        "rpq": False,
        "et": False,
        "init_crops": 1,
        "report_size": False,
    },
}
"""The smallest budgets each method accepts. They give the same quantized *structure* (layer types,
quantizers, LET scales, LBQ boundaries, QArtSR's low-rank branch) as the demo budgets — only the
calibrated values differ — so they serve benchmarks of speed and size, never of quality. QArtSR runs
its quantizer initialisation only (TRQ/RPQ/ET off: they train values, not structure)."""

STRUCTURE_CALIBRATION = {"n": 4, "lr_crop": 32}


def calibration_set_for(model, n: int, lr_crop: int, seed: int = 0, source: str = "tiny-train"):
    """A calibration set for ``model`` from ``source`` (not cached on disk)."""
    from harness.quant.calibration import (
        CalibrationSettings,
        build_calibration_set,
        calibration_sources,
    )

    settings = CalibrationSettings(
        n=n, lr_crop=lr_crop, scale=int(model.settings.upscale), seed=seed
    )
    return build_calibration_set(
        model, settings=settings, cache=False, **calibration_sources(source)
    )


def quantize_tiny(method: str, bits: str, calibration, params: dict[str, Any] | None = None):
    """A fresh ``load_model("tiny")`` quantized with ``method`` at ``bits`` (scope: the config
    default, UV) and ``params`` (default :data:`STRUCTURE_ONLY_PARAMS`). Returns
    ``(qmodel, seconds)``; the seconds cover ``quantize()`` only (calibration set excluded)."""
    from harness.loaders import load_model
    from harness.quant.api import quantize
    from harness.registry import get_method

    fields = dict(STRUCTURE_ONLY_PARAMS.get(method, {}) if params is None else params)
    config = get_method(method).make_config(bits=bits, **fields)
    model = load_model("tiny")
    start = time.perf_counter()
    qmodel = quantize(model, config, calibration, base_model="tiny")
    return qmodel, time.perf_counter() - start

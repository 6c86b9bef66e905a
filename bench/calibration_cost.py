"""``python -m bench.calibration_cost``: seconds to calibrate each method at each bit width on the tiny
model with the demo config's budgets (``configs/demo.toml``), with a breakdown.

For every main-table method of the config (ablations excluded; ``--methods``/``--bits`` restrict)
the cell's resolved method config and calibration settings are taken from the config itself
(:func:`harness.runner.plan_cells`), so the figures are those of a ``run-matrix`` cell. Per cell:

- ``calibration set``: building the crops and the FP teacher tensors
  (:func:`harness.quant.calibration.build_calibration_set`, not cached), i.e. the *init* every method
  shares; measured once per calibration setting and seed;
- ``quantize``: :func:`harness.quant.api.quantize` in total (targets, calibration, checks);
- the method's own phase timings where it records them — PassionSR: the init pass and each
  component's LET and LBQ phase (``seconds``); QArtSR: quantizer init, TRQ, RPQ, ET (``timings``);
  MinMax and PTQ4DM record none;
- for every method, the time between its progress reports, grouped by stage label (e.g. QArtSR's
  RPQ per unit, PassionSR's epochs): the finest per-module breakdown the methods expose.

Calibration time depends on the load of the machine (shared here); each cell runs once.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from bench._common import (
    METHODS,
    REPO,
    base_parser,
    calibration_set_for,
    machine_info,
    print_table,
    set_threads,
    write_results,
)

_LOSS_SUFFIX = re.compile(r"\s+loss\s+\S+$")


class StageClock:
    """A ``progress(stage, done, total)`` callback that attributes wall time to stage labels."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.current = "(before the first progress report)"
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.last
        self.last = now
        self.current = _LOSS_SUFFIX.sub("", str(stage))

    def finish(self) -> dict[str, float]:
        now = time.perf_counter()
        label = f"{self.current} (until quantize() returned)"
        self.seconds[label] = self.seconds.get(label, 0.0) + now - self.last
        return {k: v for k, v in self.seconds.items() if v > 0}


def method_phases(method: str, record: dict) -> dict[str, float]:
    """Phase seconds a method records about itself (empty when it records none)."""
    phases: dict[str, float] = {}
    if method.startswith("passionsr"):
        init = record.get("init") or {}
        if "seconds" in init:
            phases["init pass"] = float(init["seconds"])
        for phase in record.get("phases", []):
            if "seconds" in phase:
                phases[f"{phase['component']} {phase['phase']}"] = float(phase["seconds"])
    elif method.startswith("qartsr"):
        for key, value in (record.get("timings") or {}).items():
            if key != "total_s":
                phases[key.removesuffix("_s")] = float(value)
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--bits", nargs="+", default=None, help="subset of the config's bits")
    args = parser.parse_args(argv)

    machine = machine_info()
    machine["torch_threads"] = set_threads(args.threads)
    from harness.loaders import load_model
    from harness.quant.api import MethodConfig, quantize
    from harness.runner import plan_cells

    config, cells, _ = plan_cells(args.config)
    cells = [c for c in cells if c.quantizes and c.ablation_of is None]
    if args.methods:
        cells = [c for c in cells if c.method in args.methods]
    if args.bits:
        cells = [c for c in cells if c.bits in args.bits]
    if not cells:
        raise SystemExit("no cell matches --methods/--bits")

    calibration_sets: dict[tuple, tuple] = {}
    results = []
    for cell in cells:
        calib = cell.calibration or {}
        model = load_model(cell.model)
        key = (calib.get("source"), calib.get("n"), calib.get("lr_crop"), cell.seed)
        if key not in calibration_sets:
            start = time.perf_counter()
            calibration = calibration_set_for(
                model, int(calib["n"]), int(calib["lr_crop"]), int(cell.seed or 0), calib["source"]
            )
            calibration_sets[key] = (calibration, time.perf_counter() - start)
        calibration, calibration_seconds = calibration_sets[key]
        method_config = MethodConfig.from_dict(dict(cell.method_config))
        clock = StageClock()
        print(f"calibrating {cell.label} {cell.bits} ...", flush=True)
        start = time.perf_counter()
        qmodel = quantize(model, method_config, calibration, progress=clock, base_model=cell.model)
        total = time.perf_counter() - start
        record = qmodel.calibration_record.get("method", {})
        results.append({
            "label": cell.label, "method": cell.method, "bits": cell.bits,
            "calibration": calib, "calibration_set_s": calibration_seconds,
            "quantize_s": total, "method_phases_s": method_phases(cell.method, record),
            "progress_stages_s": clock.finish(),
        })  # fmt: skip
        del qmodel, model

    rows = []
    for r in results:
        phases = r["method_phases_s"]
        detail = ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) or "not exposed"
        rows.append([r["label"], r["bits"], r["calibration_set_s"], r["quantize_s"], detail])
    print_table(
        ["method", "bits", "calibration set (s)", "quantize (s)", "method phases (s)"],
        rows,
        title=f"calibration_cost: tiny model, {args.config.name} budgets "
        f"({args.threads} torch thread(s)); the calibration set is built once per setting",
    )
    stage_rows = []
    for r in results:
        for stage, seconds in sorted(r["progress_stages_s"].items(), key=lambda kv: -kv[1])[:8]:
            stage_rows.append([r["label"], r["bits"], stage[:70], seconds])
    print_table(
        ["method", "bits", "progress stage (top 8 by time)", "seconds"],
        stage_rows,
        title="breakdown by progress stage (time between a method's progress reports)",
    )
    write_results(
        "calibration_cost",
        {"config": str(args.config), "cells": results},
        machine=machine,
        args=args,
        path=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

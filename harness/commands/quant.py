"""CLI: ``qbench ls methods`` and ``qbench quantize``.

The command is thin: :func:`run_quantize` does the work (load → calibration set → ``quantize`` →
save + packed weights + size/BOPs report) and is what tests call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import ConfigError, DivergedError

console = Console()

TINY_DEFAULTS = {"n": 64, "lr_crop": 32, "source": "tiny-train"}
"""Calibration defaults for the tiny model (``configs/demo.toml``): 64 crops of 32 px LR."""
PAPER_DEFAULTS = {"n": 500, "lr_crop": 128}
"""PassionSR's protocol for real models: 500 crops of 128 px LR (methods.md §6.4)."""


def parse_set_options(items: list[str]) -> dict:
    """``["key=value", ...]`` → dict; values are JSON when they parse (numbers, true/false, lists,
    objects), else strings."""
    fields: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            fields[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key.strip()] = raw
    return fields


def run_quantize(
    *,
    model: str,
    method: str,
    out: Path,
    bits: str | None = None,
    scope: str | None = None,
    calib_n: int | None = None,
    calib_crop: int | None = None,
    calib_source: str | None = None,
    seed: int = 0,
    fields: dict | None = None,
    bops_size: int = 512,
    cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    loaded_model=None,
) -> dict:
    """Quantize ``model`` with ``method`` and write ``out`` (see ``qbench quantize --help``).

    Returns the run record. A :class:`DivergedError` during calibration is caught and recorded
    (``status: "diverged"`` with the cause) in ``out/quantize_record.json``; nothing else is written.
    """
    from harness.quant.api import SIMULATED_LABEL, quantize
    from harness.quant.calibration import (
        CalibrationSettings,
        build_calibration_set,
        calibration_sources,
    )
    from harness.quant.io import save_quantized
    from harness.quant.packing import bops_report, export_packed, save_packed
    from harness.registry import get_method

    entry = get_method(method)
    config_fields = dict(fields or {})
    if bits is not None:
        config_fields["bits"] = bits
    if scope is not None:
        config_fields["scope"] = scope
    config = entry.make_config(**config_fields)
    if loaded_model is None:
        from harness.loaders import load_model

        loaded_model = load_model(model)
    defaults = TINY_DEFAULTS if model == "tiny" else PAPER_DEFAULTS
    calibration = None
    if entry.cls.needs_calibration:
        source = calib_source or defaults.get("source")
        if source is None:
            raise ConfigError(
                f"model {model!r} needs --calib-source (hr:DIR or a dataset name); qbench never "
                "calibrates on an evaluation set by default"
            )
        settings = CalibrationSettings(
            n=calib_n or defaults["n"],
            lr_crop=calib_crop or defaults["lr_crop"],
            scale=loaded_model.settings.upscale,
            seed=seed,
        )
        calibration = build_calibration_set(
            loaded_model,
            settings=settings,
            cache=cache,
            progress=progress,
            **calibration_sources(source),
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"label": SIMULATED_LABEL, "model": model, "method_config": config.to_dict()}
    try:
        qmodel = quantize(loaded_model, config, calibration, progress=progress, base_model=model)
    except DivergedError as exc:
        record.update(status="diverged", cause=str(exc))
        (out / "quantize_record.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
    save_quantized(qmodel, out)
    report: dict = {"summary": qmodel.summary()}
    if qmodel.targets:
        packed = export_packed(qmodel.model)
        save_packed(packed, out / "packed_weights.safetensors")
        report["size"] = entry.create().size_report(qmodel.model, packed)
    if bops_size:
        bops = bops_report(qmodel, size=bops_size)
        bops.pop("layers")
        report["bops"] = bops
    (out / "size_report.json").write_text(json.dumps(report, indent=2) + "\n")
    record.update(status="ok", out=str(out), **report)
    (out / "quantize_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _print_record(record: dict) -> None:
    if record["status"] != "ok":
        console.print(f"[red]diverged[/red]: {record['cause']}")
        return
    summary = record["summary"]
    table = Table(title=f"{summary['method']} {summary['bits']} scope {summary['scope']}")
    table.add_column("component:bits")
    table.add_column("modules", justify="right")
    for key, count in summary["by_component_and_bits"].items():
        table.add_row(key, str(count))
    console.print(table)
    size = record.get("size")
    if size:
        console.print(
            f"quantized layers: {size['quantized_layers_packed_bytes'] / 2**20:.2f} MiB packed vs "
            f"{size['quantized_layers_fp32_bytes'] / 2**20:.2f} MiB FP32 "
            f"({size['quantized_layers_ratio']:.3f}x); whole model {size['model_ratio']:.3f}x"
        )
    bops = record.get("bops")
    if bops:
        console.print(
            f"BOPs for one {bops['image_size']}x{bops['image_size']} inference: "
            f"{bops['bops']:.3e} ({bops['bops_ratio']:.4f}x of FP32)"
        )
    console.print(f"[dim]{record['label']}[/dim]; written to {record['out']}")


def register(app: typer.Typer, ls_app: typer.Typer) -> None:
    @ls_app.command("methods")
    def ls_methods() -> None:
        """List registered quantization methods and variants with their config fields.

        Examples:

          qbench ls methods
        """
        from harness.registry import method_entries

        table = Table(title="methods")
        for column in ("name", "base", "description", "config fields"):
            table.add_column(column)
        for entry in method_entries():
            fields = [
                n
                for n in entry.config_cls.field_names()
                if n not in ("method", "include", "exclude")
            ]
            table.add_row(entry.name, entry.base or "", entry.description, ", ".join(fields))
        console.print(table)

    @app.command("quantize")
    def quantize_command(
        model: str = typer.Option(
            "tiny", "--model", "-m", help="tiny | PATH | osediff:sd=DIR,pkl=FILE"
        ),
        method: str = typer.Option(..., "--method", help="A method name from `qbench ls methods`."),
        bits: str | None = typer.Option(
            None, "--bits", help="W<b>A<b>, 2 <= b <= 8 (omit for fp)."
        ),
        scope: str | None = typer.Option(
            None, "--scope", help="U (UNet) or UV (UNet + VAE, default)."
        ),
        calib_n: int | None = typer.Option(
            None, "--calib-n", help="Calibration crops (tiny 64, else 500)."
        ),
        calib_crop: int | None = typer.Option(
            None, "--calib-crop", help="LR crop side (tiny 32, else 128)."
        ),
        calib_source: str | None = typer.Option(
            None, "--calib-source", help="tiny-train | hr:DIR | dataset name (tiny: tiny-train)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration crop selection."),
        set_: list[str] = typer.Option(
            [], "--set", help="Method config field KEY=VALUE (repeatable)."
        ),
        bops_size: int = typer.Option(
            512, "--bops-size", help="Image side for the BOPs count (0: skip)."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    ) -> None:
        """Quantize a model with a method, calibrate it, and save it (simulated quantization).

        Writes quantized.json + quant_params.safetensors (load with `qbench eval --quantized DIR`),
        packed_weights.safetensors (real packed integer weights), size_report.json (packed size vs
        FP32 and BOPs) and quantize_record.json. A run that produces NaN/Inf is recorded as diverged
        (exit code 3).

        Examples:

          qbench quantize --model tiny --method minmax --bits W4A4 --out runs/q/minmax-W4A4

          qbench quantize --model tiny --method ptq4dm --bits W8A8 --scope U --calib-n 32 --out runs/q/p8

          qbench quantize --model tiny --method ptq4dm --bits W4A4 --set timestep_calibration=literal --out runs/q/lit

          qbench quantize --model tiny --method fp --out runs/q/fp

          qbench quantize --model osediff:sd=SD21,pkl=osediff.pkl --method minmax --bits W8A8 --calib-source hr:DIV2K/HR --out runs/q/mm8
        """

        def progress(stage: str, done: int, total: int) -> None:
            status.update(f"{stage}: {done}/{total}")

        with console.status("quantizing") as status:
            record = run_quantize(
                model=model, method=method, out=out, bits=bits, scope=scope, calib_n=calib_n,
                calib_crop=calib_crop, calib_source=calib_source, seed=seed,
                fields=parse_set_options(set_), bops_size=bops_size, progress=progress,
            )  # fmt: skip
        _print_record(record)
        if record["status"] != "ok":
            raise typer.Exit(3)

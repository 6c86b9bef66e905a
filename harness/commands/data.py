"""CLI for datasets: ``qbench ls datasets`` and ``qbench validate DATASET``.

Thin wrappers: the logic lives in :mod:`harness.datasets` (``dataset_overview`` below only gathers
rows for the table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from harness.datasets import (
    DatasetDef,
    ValidationReport,
    get_dataset,
    list_datasets,
    synthesis_dir,
    validate_dataset,
)
from harness.errors import QBenchError

LS_HELP = """List the registered datasets: name, scale, expected pairs, and whether a root was found.

Examples:

  qbench ls datasets

  QBENCH_DATA=/data qbench ls datasets
"""

VALIDATE_HELP = """Decode every image of DATASET and check pairing, scale, counts and checksums.

Prints a summary, every problem and every conversion (grayscale, alpha, palette, 16-bit, HR crop). Exits with code 2 if there is any problem. DATASET is a registered name (see `qbench ls datasets`) or a folder spec `folder:lr=PATH[,hr=PATH][,scale=N]`.

Examples:

  qbench validate set5

  qbench validate realsr --root "/data/RealSR(V3)"

  qbench validate folder:lr=runs/demo/sr,hr=datasets/demo/HR,scale=1

  qbench validate div2k-val --no-decode
"""


def _root_status(definition: DatasetDef) -> tuple[str, str]:
    """(layout or '-', root or a reason) for the ls table, without reading any image."""
    try:
        located = definition.find_root()
    except QBenchError as exc:
        return "-", f"error: {exc}"
    if located is not None:
        return located[1].name, str(located[0])
    if definition.synthesize is not None:
        out = synthesis_dir(definition)
        if (out / "degradation_record.json").is_file():
            return "synthesized", str(out)
        source = get_dataset(
            definition.synthesize.source_dataset,
            definition.definition_path.parent if definition.definition_path else None,
        )
        if source.find_root(hr_only=True) is not None:
            return "-", f"not built; will be synthesized from {source.name} into {out}"
    return "-", "not found"


def dataset_overview() -> list[dict[str, Any]]:
    """One row per registered dataset for ``qbench ls datasets``."""
    rows = []
    for name in list_datasets():
        definition = get_dataset(name)
        layout, root = _root_status(definition)
        expected = definition.expected_count
        rows.append(
            {
                "name": name,
                "scale": definition.scale,
                "expected": expected if expected is not None else "-",
                "layout": layout,
                "root": root,
                "description": definition.description,
            }
        )
    return rows


def _print_report(console: Console, report: ValidationReport) -> None:
    summary = Table(title=f"dataset {report.dataset} (v{report.version})", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    expected = report.expected_count if report.expected_count is not None else "-"
    rows = [
        ("root", str(report.root)),
        ("layout", report.layout),
        ("pairs", f"{report.pairs} (expected {expected})"),
        ("scale", str(report.scale)),
        ("HR policy", report.hr_policy),
        ("decoded", "yes" if report.decoded else "no (--no-decode)"),
        (
            "checksums",
            f"{report.checksums_verified} verified of {report.checksums_listed} listed; "
            f"{report.files_without_checksum} image files without a known checksum",
        ),
        ("HR crops", str(len(report.crops))),
        ("conversions", str(len(report.conversions))),
        ("manifest hash", report.manifest_hash),
        ("problems", str(len(report.problems))),
    ]
    for field, value in rows:
        summary.add_row(field, value)
    console.print(summary)
    # Plain lines (not rich-wrapped) so every file name can be grepped and copied.
    if report.crops:
        typer.echo(f"HR crops ({len(report.crops)}):")
        for name, box in report.crops:
            typer.echo(f"  {name}: HR cropped to box (left, top, right, bottom) = {box}")
    if report.conversions:
        typer.echo(f"Conversions ({len(report.conversions)}):")
        for file, conversion in report.conversions:
            typer.echo(f"  {file}: {conversion}")
    if report.problems:
        typer.echo(f"Problems ({len(report.problems)}):")
        for problem in report.problems:
            typer.echo(f"  - {problem}")


def register(app: typer.Typer, ls_app: typer.Typer) -> None:
    """Add ``ls datasets`` and ``validate`` to the qbench app."""

    @ls_app.command("datasets", help=LS_HELP)
    def ls_datasets() -> None:
        try:
            rows = dataset_overview()
        except QBenchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        table = Table(title="datasets")
        table.add_column("name", no_wrap=True)
        table.add_column("scale")
        table.add_column("pairs expected")
        table.add_column("layout found", no_wrap=True)
        table.add_column("root", overflow="fold")
        for row in rows:
            table.add_row(
                row["name"], str(row["scale"]), str(row["expected"]), row["layout"], row["root"]
            )
        Console().print(table)
        typer.echo("Also: folder:lr=PATH[,hr=PATH][,scale=N] for any folder (pairs by exact stem).")

    @app.command("validate", help=VALIDATE_HELP)
    def validate(
        dataset: str = typer.Argument(..., help="registered dataset name or folder:lr=...,hr=..."),
        root: Path | None = typer.Option(
            None, "--root", help="dataset root directory (overrides QBENCH_DATA and defaults)"
        ),
        decode: bool = typer.Option(
            True, "--decode/--no-decode", help="decode every image (slower, catches corruption)"
        ),
        checksums: bool = typer.Option(
            True, "--checksums/--no-checksums", help="verify known sha256 checksums"
        ),
    ) -> None:
        console = Console()
        try:
            definition = get_dataset(dataset)
            if definition.synthesize is not None and definition.find_root(root) is None:
                out = synthesis_dir(definition)
                source = get_dataset(
                    definition.synthesize.source_dataset,
                    definition.definition_path.parent if definition.definition_path else None,
                )
                source_found = source.find_root(root, hr_only=True) is not None
                if source_found and not (out / "degradation_record.json").is_file():
                    typer.echo(
                        f"note: {definition.name} is not on disk; synthesizing it into {out} "
                        "(one-off; this can take a long time)",
                        err=True,
                    )
            resolved = definition.resolve(root, strict=False)
            report = validate_dataset(resolved, decode=decode, check_checksums=checksums)
        except QBenchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        _print_report(console, report)
        if not report.ok:
            typer.echo(
                f"error: dataset {report.dataset!r} has {len(report.problems)} problem(s); "
                "see the list above",
                err=True,
            )
            raise typer.Exit(code=2)
        typer.echo(f"ok: {report.dataset} - {report.pairs} pairs valid")

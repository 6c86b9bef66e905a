"""CLI: ``qbench run-matrix``, ``qbench report`` and ``qbench compare`` (thin wrappers)."""

from __future__ import annotations

from pathlib import Path

import typer


def run_matrix_command(
    config: Path = typer.Argument(..., help="Run config (TOML), e.g. configs/demo.toml."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default runs/<config name>). Reruns resume here."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Connect to an existing Ray cluster (e.g. ray://head:10001 or auto).",
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Run cells recorded as failed again (done/diverged stay)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate only the first N images per dataset (recorded)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Local Ray CPUs (default: all cores); ignored with --address.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No live progress table."),
    report: bool = typer.Option(True, "--report/--no-report", help="Build the report at the end."),
) -> None:
    """Run a matrix of cells (model x method x bits x seed) on Ray; resumes by default.

    Examples:

      qbench run-matrix configs/smoke.toml --out runs/smoke --workers 2

      qbench run-matrix configs/demo.toml            # then: qbench report runs/demo

      qbench run-matrix configs/demo.toml --limit 2 --out runs/demo-quick

      qbench run-matrix configs/paper.toml --address auto --retry-failed
    """
    from harness.runner import run_matrix

    summary = run_matrix(
        config,
        out_dir=out,
        address=address,
        retry_failed=retry_failed,
        limit=limit,
        num_workers=workers,
        progress=not no_progress,
    )
    typer.echo(summary.describe())
    for cell_id, reason in summary.reasons.items():
        typer.echo(f"  {cell_id} {summary.statuses.get(cell_id)}: {reason.splitlines()[0][:300]}")
    if report:
        from reports.build import build_report

        files = build_report(summary.run_dir)
        typer.echo(f"report: {files['markdown']}")
    if summary.count("failed"):
        raise typer.Exit(1)


def report_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by run-matrix."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Report directory (default RUN_DIR/report)."
    ),
) -> None:
    """Build the report (Markdown, LaTeX table, plots, visual comparison) from stored results only.

    Examples:

      qbench report runs/demo

      qbench report runs/paper --out paper-report
    """
    from reports.build import build_report

    files = build_report(run_dir, out)
    typer.echo(f"report:  {files['markdown']}")
    typer.echo(f"latex:   {files['latex']}")
    typer.echo(f"visual:  {files['visual_html']}")
    typer.echo(
        f"plots:   {len(files['plots'])} files in {Path(files['markdown']).parent / 'plots'}"
    )


def compare_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by run-matrix."),
    base: str = typer.Option(
        ..., "--base", help="The full method the ablations are compared with."
    ),
    fmt: str = typer.Option("md", "--format", "-f", help="md | tex"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write to this file instead of stdout."
    ),
) -> None:
    """Each ablation's difference from the base method, per dataset and metric.

    Examples:

      qbench compare runs/demo --base qartsr

      qbench compare runs/demo --base qartsr --format tex --out ablations.tex
    """
    from harness.errors import ConfigError
    from harness.store import atomic_write
    from reports import load_run
    from reports.compare import ablation_table
    from reports.tables import render_latex, render_markdown

    if fmt not in ("md", "tex"):
        raise ConfigError(f"--format must be md or tex, got {fmt!r}")
    table = ablation_table(load_run(run_dir), base)
    text = (
        render_markdown(table)
        if fmt == "md"
        else render_latex(table, label=f"tab:ablations-{base}")
    )
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write(out, text)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer, ls_app: typer.Typer) -> None:
    app.command("run-matrix")(run_matrix_command)
    app.command("report")(report_command)
    app.command("compare")(compare_command)

"""``build_report(run_dir, out_dir)``: the whole report from stored results only.

Writes into ``out_dir`` (default ``RUN_DIR/report``):

- ``report.md``: the simulated-quantization statement, run status, the main table, cells that did
  not finish (with their reasons), ablation tables, links to plots and the visual comparison,
  per-cell timings, calibration-cache use, metric definitions and the provenance (git commit and
  dirty flag, library versions, host, device, seeds, data manifest hashes) of every driver session;
- ``table.tex``: the main table (booktabs); ``ablations_<base>.md``/``.tex`` per base method with
  ablations;
- ``plots/*.png`` and ``*.pdf``; ``visual_<dataset>_<bits>.png`` grids and ``visual.html``.

Nothing here loads a model or a dataset; a run that is still in progress gives a report of what is
stored so far, with the missing cells marked "not run".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports import FP_BITS, RunResults, load_run
from reports.tables import SIMULATED_NOTE, main_table, md_escape, render_latex, render_markdown


def _code(text: Any) -> str:
    """Inline code that cannot break out of its backticks."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _provenance_lines(results: RunResults) -> list[str]:
    sessions = results.provenance.get("sessions", [])
    if not sessions:
        return ["No provenance recorded."]
    lines = []
    for index, session in enumerate(sessions, start=1):
        git = session.get("git") or {}
        dirty = git.get("dirty")
        dirty_text = "dirty" if dirty else ("clean" if dirty is False else "unknown")
        libraries = ", ".join(f"{k} {v}" for k, v in (session.get("libraries") or {}).items() if v)
        device = session.get("device") or {}
        lines += [
            f"**Session {index}** ({md_escape(session.get('started_at', '?'))}, host "
            f"{md_escape(session.get('hostname', '?'))}):",
            "",
            f"- git commit {_code(git.get('commit'))} ({dirty_text} working tree)",
            f"- libraries: {md_escape(libraries)}",
            f"- driver device: {md_escape(device.get('platform', '?'))}, {device.get('cpu_count', '?')} CPUs"
            + (
                f", CUDA {md_escape(device.get('cuda_devices'))}"
                if device.get("cuda_available")
                else ""
            ),
            f"- config {_code(session.get('config_path'))} sha256 {_code(session.get('config_sha256', '')[:16])}",
            f"- calibration seeds: {session.get('calibration_seeds')}; limit: {session.get('limit')}",
            f"- cells run in this session: {len(session.get('to_run', []))}, already stored: "
            f"{len(session.get('skipped', []))}",
            "- data manifests: "
            + ", ".join(
                f"{md_escape(k)} {_code(str(v)[:16])}"
                for k, v in (session.get("data_manifests") or {}).items()
            ),
            "",
        ]
    return lines


def _worker_lines(results: RunResults) -> list[str]:
    identities, devices, hosts = set(), set(), set()
    for cell in results.cells:
        env = (cell.record or {}).get("environment") or {}
        if env.get("model_identity"):
            identities.add(json.dumps(env["model_identity"], sort_keys=True))
        if env.get("device"):
            devices.add(str(env["device"]))
        if env.get("hostname"):
            hosts.add(str(env["hostname"]))
    lines = [
        f"- workers: {len(hosts)} host(s) ({md_escape(', '.join(sorted(hosts)) or '?')}), device(s) "
        f"{md_escape(', '.join(sorted(devices)) or '?')}"
    ]
    models = {json.dumps((c.record or {}).get("environment", {}).get("model_identity"), sort_keys=True)
              for c in results.cells if c.record and c.spec.get("model") == results.config.get("model")}  # fmt: skip
    models.discard("null")
    if len(models) > 1:
        lines.append(
            "- **warning**: cells of this run were computed with different model weights "
            "(model identity hashes differ); the rows are not comparable."
        )
    return lines


def _status_lines(results: RunResults) -> list[str]:
    counts: dict[str, int] = {}
    for cell in results.cells:
        counts[cell.status] = counts.get(cell.status, 0) + 1
    lines = [
        f"- cells: {len(results.cells)} ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ")",
    ]
    if results.limit:
        lines.append(f"- **limit**: the first {results.limit} image(s) of each dataset (--limit)")
    if results.stale_cells:
        lines.append(
            f"- {len(results.stale_cells)} stored cell(s) belong to an earlier config of this run "
            "directory and are not shown"
        )
    return lines


def _unfinished_lines(results: RunResults) -> list[str]:
    rows = [c for c in results.cells if c.status != "done"]
    if not rows:
        return []
    lines = ["## Cells that did not finish", "", "| cell | method | bits | seed | status | reason |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for cell in rows:
        lines.append(
            f"| {_code(cell.cell_id)} | {md_escape(cell.label)} | {md_escape(cell.bits)} | "
            f"{'' if cell.seed is None else cell.seed} | **{cell.status}** | "
            f"{md_escape(cell.reason or ('not run yet' if cell.status == 'pending' else ''))} |"
        )
    return [*lines, ""]


def _timing_lines(results: RunResults) -> list[str]:
    lines = [
        "| cell | method | bits | seed | calibration | calibrate s | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in results.cells:
        if not cell.record:
            continue
        timings = cell.record.get("timings") or {}
        cache = (cell.record.get("model_record") or {}).get("calibration_cache", "")
        calibrate = timings.get("calibrate_s")
        total = timings.get("total_s")
        lines.append(
            f"| {_code(cell.cell_id)} | {md_escape(cell.label)} | {md_escape(cell.bits)} | "
            f"{'' if cell.seed is None else cell.seed} | {md_escape(cache)} | "
            f"{'' if calibrate is None else f'{calibrate:.1f}'} | {'' if total is None else f'{total:.1f}'} |"
        )
    return lines


def _metric_lines(results: RunResults) -> list[str]:
    specs: dict[str, dict] = {}
    unavailable: dict[str, str] = {}
    for cell in results.cells:
        for name, spec in ((cell.record or {}).get("metric_specs") or {}).items():
            specs.setdefault(name, spec)
        for dataset in ((cell.record or {}).get("datasets") or {}).values():
            for name, reason in (dataset.get("unavailable") or {}).items():
                unavailable.setdefault(name, reason)
    lines = []
    for name in results.metrics:
        if name in specs:
            spec = specs[name]
            lines.append(
                f"- **{md_escape(name)}** {md_escape(spec.get('direction', ''))}: "
                f"{_code(spec.get('pyiqa_call', ''))} (pyiqa {md_escape(spec.get('pyiqa_version', '?'))}); "
                f"{md_escape(spec.get('description', ''))}"
            )
        elif name in unavailable:
            lines.append(f"- **{md_escape(name)}**: unavailable: {md_escape(unavailable[name])}")
        else:
            lines.append(f"- **{md_escape(name)}**: no stored record")
    return lines


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the report files (module docstring); returns ``{"markdown", "latex", "plots",
    "visual_html", "visual_png", "ablations"}`` paths."""
    from harness.store import atomic_write
    from reports.compare import ablation_bases, ablation_table
    from reports.plots import make_plots
    from reports.visual import write_grids, write_html

    results = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = main_table(results)
    latex_path = out / "table.tex"
    atomic_write(latex_path, render_latex(table))
    ablation_files: dict[str, list[Path]] = {}
    ablation_md: list[str] = []
    for base in ablation_bases(results):
        ablations = ablation_table(results, base)
        md_path, tex_path = out / f"ablations_{base}.md", out / f"ablations_{base}.tex"
        markdown = render_markdown(ablations)
        atomic_write(md_path, markdown)
        atomic_write(tex_path, render_latex(ablations, label=f"tab:qbench-ablations-{base}"))
        ablation_files[base] = [md_path, tex_path]
        ablation_md += [markdown, ""]
    plots = make_plots(results, out / "plots")
    grids = write_grids(results, out)
    html_path = write_html(results, out / "visual.html")

    name = results.config.get("name", "run")
    lines = [f"# qbench report: {md_escape(name)}", ""]
    if results.config.get("description"):
        lines += [md_escape(results.config["description"]), ""]
    lines += [f"> {md_escape(SIMULATED_NOTE)}", ""]
    lines += [
        "## Run",
        "",
        f"- run directory: {_code(Path(run_dir))}",
        f"- model: {_code(results.config.get('model'))}",
    ]
    lines += _status_lines(results) + _worker_lines(results) + [""]
    lines += ["## Main table", "", render_markdown(table, heading=False), ""]
    lines += _unfinished_lines(results)
    if ablation_md:
        lines += ["## Ablations", "", *ablation_md]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{md_escape(p.stem)}](plots/{p.name})" for p in plots if p.suffix == ".png"]
        lines += ["", "PDF versions are next to the PNG files in `plots/`.", ""]
    lines += [
        "## Visual comparison",
        "",
        "Open [visual.html](visual.html) for before/after sliders.",
        "",
    ]
    lines += [f"![{md_escape(p.stem)}]({p.name})" for p in grids] + [""]
    lines += ["## Timings and calibration cache", "", *_timing_lines(results), ""]
    lines += ["## Metrics", "", *_metric_lines(results), ""]
    lines += ["## Provenance", "", *_provenance_lines(results)]
    budgets: dict[str, list[str]] = {}
    for entry in results.method_entries():
        if FP_BITS in entry["bits"]:
            continue
        text = json.dumps({"calibration": entry.get("calibration"), "params": entry.get("params") or {}},
                          sort_keys=True)  # fmt: skip
        budgets.setdefault(text, []).append(entry["label"])
    if budgets:
        lines += ["## Calibration budgets", ""]
        lines += [
            f"- {md_escape(', '.join(labels))}: {_code(text)}" for text, labels in budgets.items()
        ]
        lines += [""]
    markdown_path = out / "report.md"
    atomic_write(markdown_path, "\n".join(lines).rstrip() + "\n")
    return {
        "markdown": markdown_path,
        "latex": latex_path,
        "plots": plots,
        "visual_html": html_path,
        "visual_png": grids,
        "ablations": ablation_files,
    }


__all__ = ["build_report"]

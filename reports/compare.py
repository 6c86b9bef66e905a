"""Per-ablation comparisons: each ablation's difference from its base method, per metric.

``qbench compare RUN_DIR --base qartsr``: for every bits setting at which the base method has a row,
the base row shows its values and each ablation row shows Δ = ablation − base per dataset and metric
(computed on the stored, unrounded means, then printed with the metric's decimals and a sign). The
same :class:`~reports.tables.Table` model and renderers as the main table are used, so the output
exists in Markdown and LaTeX. Δ rows are not ranked; a note says which sign is better per column.

Which rows are ablations of ``base``: config entries whose ``ablation_of`` names the base (by method
name or label); if the config marks none, entries whose method name starts with ``<base>-`` (the
registered variants such as ``qartsr-no-trq``).
"""

from __future__ import annotations

from typing import Any

from harness.errors import QBenchError
from reports import FP_BITS, RunResults
from reports.tables import (
    DASH,
    Cell,
    Group,
    Row,
    Table,
    _columns,
    _hoist_column_notes,
    _metric_value,
    _row_status,
    _unavailable_note,
    bits_sort_key,
    entry_cells,
    format_value,
    general_notes,
    value_cell,
)


def _base_entry(results: RunResults, base: str) -> dict[str, Any]:
    entries = results.method_entries()
    for entry in entries:
        if not entry.get("ablation_of") and base in (entry["name"], entry["label"]):
            return entry
    known = sorted({e["label"] for e in entries if not e.get("ablation_of")})
    raise QBenchError(
        f"{results.run_dir}: no method {base!r} in this run (methods: {', '.join(known)})"
    )


def ablation_entries(results: RunResults, base: str) -> list[dict[str, Any]]:
    """The config entries that are ablations of ``base`` (module docstring)."""
    base_entry = _base_entry(results, base)
    keys = {base_entry["name"], base_entry["label"]}
    marked = [e for e in results.method_entries() if e.get("ablation_of") in keys]
    if marked:
        return marked
    prefix = base_entry["name"] + "-"
    return [
        e for e in results.method_entries() if e["name"].startswith(prefix) and e is not base_entry
    ]


def ablation_table(results: RunResults, base: str, *, title: str | None = None) -> Table:
    """The Δ table for ``base`` (module docstring); :class:`QBenchError` when there is nothing to compare."""
    base_entry = _base_entry(results, base)
    ablations = ablation_entries(results, base)
    if not ablations:
        raise QBenchError(
            f"{results.run_dir}: no ablations of {base!r} in this run (mark entries with "
            f"ablation_of = {base_entry['name']!r} or use variants named {base_entry['name']}-...)"
        )
    columns = _columns(results, results.datasets, results.metrics)
    groups = []
    for bits in sorted(set(base_entry["bits"]) - {FP_BITS}, key=bits_sort_key):
        base_cells = entry_cells(results, base_entry["label"], bits)
        if not base_cells or not any(bits in entry["bits"] for entry in ablations):
            continue
        base_done, base_note, base_suffix = _row_status(base_cells)
        base_values = []
        row_cells = []
        for column in columns:
            value, reason = (
                _metric_value(base_done, column.dataset, column.metric)
                if base_done
                else (None, None)
            )
            base_values.append(value)
            if value is None:
                note = _unavailable_note(column.metric, reason) if base_done and reason else None
                row_cells.append(Cell(DASH, note=note))
            else:
                row_cells.append(value_cell(value, column.decimals))
        rows = [Row(f"{base_entry['label']}{base_suffix} (base)", row_cells, note=base_note)]
        for entry in ablations:
            if bits not in entry["bits"]:
                continue
            cells = entry_cells(results, entry["label"], bits)
            if not cells:
                continue
            done, note, suffix = _row_status(cells)
            deltas = []
            for column, base_value in zip(columns, base_values, strict=True):
                if not done or base_value is None:
                    deltas.append(Cell(DASH))
                    continue
                value, reason = _metric_value(done, column.dataset, column.metric)
                if value is None:
                    deltas.append(Cell(DASH, note=_unavailable_note(column.metric, reason or "")))
                else:
                    deltas.append(
                        Cell(format_value(value - base_value, column.decimals, signed=True))
                    )
            rows.append(Row(f"{entry['label']}{suffix}", deltas, note=note))
        if len(rows) > 1:  # bits at which no ablation ran are left out
            groups.append(Group(bits, rows, ranked=False))
    if not groups:
        raise QBenchError(
            f"{results.run_dir}: {base!r} and its ablations share no bits setting with stored cells"
        )
    notes = [
        f"Rows below the base show Δ = ablation − {base_entry['label']} on the stored means (before "
        "rounding). For ↑ metrics a positive Δ means the ablation is better; for ↓ metrics a "
        "negative Δ means it is better.",
        *general_notes(results)[:-1],
    ]
    table = Table(
        title=title or f"Ablations of {base_entry['label']}: difference from the full method",
        columns=columns,
        groups=groups,
        notes=notes,
    )
    _hoist_column_notes(table)
    return table


def ablation_bases(results: RunResults) -> list[str]:
    """Base methods that have ablations in this run (explicit ``ablation_of`` or name prefix)."""
    bases = []
    for entry in results.method_entries():
        if entry.get("ablation_of"):
            continue
        try:
            if ablation_entries(results, entry["name"]):
                bases.append(entry["name"])
        except QBenchError:
            continue
    return bases


__all__ = ["ablation_bases", "ablation_entries", "ablation_table"]

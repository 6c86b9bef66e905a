"""The paper-style results table: ONE row model, rendered to Markdown and to LaTeX (booktabs).

Layout (QArtSR Table 3 / PassionSR Table 2, methods.md §6.9 and §7.7; columns grouped by dataset as
issue 7 asks): rows grouped by bits (W32A32 reference first, then W8A8 … W2A2, higher bits first),
one row per method in config order; columns grouped by dataset, one per metric with ↑/↓.

Ranking rules (documented choices):

- Per column and bit group, among the non-reference rows that have a value, the best value is bold
  and the second best underlined. Ranking uses the **displayed, rounded** values, so two entries that
  print the same are tied: ties share the mark (dense ranking: after a tie for best, the next
  distinct value is second). A column with fewer than two values in a group gets no marks.
- The W32A32 (full-precision / unquantized) rows are never ranked.
- Unavailable metrics print "–" with a footnote naming why (the reason stored with the cell, e.g.
  missing weight files). When every row of a column is unavailable for the same reason, the footnote
  goes on the column header once.
- Failed, diverged and not-yet-run rows keep their place, print "–" and carry a footnote with the
  stored reason; their label says ``(failed)`` / ``(diverged)`` / ``(not run)``.
- Several calibration seeds: the row shows the mean over the seeds that finished (footnote if some
  did not).

Decimals follow the papers: PSNR 2, SSIM 4, LPIPS 4, DISTS 4, NIQE 3, MUSIQ 2, MANIQA 4, CLIPIQA 4.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

from reports import FP_BITS, FP_DISPLAY_BITS, CellResult, RunResults

DECIMALS: dict[str, int] = {
    "psnr": 2,
    "psnr_fp": 2,
    "ssim": 4,
    "ssim_fp": 4,
    "lpips": 4,
    "dists": 4,
    "niqe": 3,
    "musiq": 2,
    "maniqa": 4,
    "maniqa-pipal": 4,
    "clipiqa": 4,
    "fid": 2,
}
DEFAULT_DECIMALS = 4

METRIC_NAMES: dict[str, str] = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "psnr_fp": "PSNR-FP",
    "ssim_fp": "SSIM-FP",
    "lpips": "LPIPS",
    "dists": "DISTS",
    "niqe": "NIQE",
    "musiq": "MUSIQ",
    "maniqa": "MANIQA",
    "maniqa-pipal": "MANIQA-PIPAL",
    "clipiqa": "CLIPIQA",
    "fid": "FID",
}

SIMULATED_NOTE = (
    "All quantized results are simulated (fake) quantization: weights and activations are rounded "
    "to the low-bit grid and computed in floating point, so they measure accuracy, not speed or memory."
)
DASH = "–"


# --------------------------------------------------------------------------------------------
# the row model


@dataclass(frozen=True)
class Column:
    dataset: str
    metric: str
    lower_better: bool
    decimals: int
    note: str | None = None

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"

    @property
    def title(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric)


@dataclass
class Cell:
    """A displayed value. ``value`` is the displayed text parsed back (None: nothing to rank)."""

    text: str
    value: float | None = None
    mark: str | None = None  # "best" | "second"
    note: str | None = None


@dataclass
class Row:
    label: str
    cells: list[Cell]
    note: str | None = None
    reference: bool = False


@dataclass
class Group:
    bits: str
    rows: list[Row]
    ranked: bool = True


@dataclass
class Table:
    title: str
    columns: list[Column]
    groups: list[Group]
    notes: list[str] = field(default_factory=list)

    def footnotes(self) -> dict[str, str]:
        """Footnote text → marker (a, b, …) in reading order: headers, then rows left to right."""
        markers: dict[str, str] = {}

        def add(text: str | None) -> None:
            if text and text not in markers:
                markers[text] = _marker(len(markers))

        for column in self.columns:
            add(column.note)
        for group in self.groups:
            for row in group.rows:
                add(row.note)
                for cell in row.cells:
                    add(cell.note)
        return markers

    def datasets(self) -> list[tuple[str, int]]:
        """``(dataset, number of columns)`` runs in column order."""
        spans: list[tuple[str, int]] = []
        for column in self.columns:
            if spans and spans[-1][0] == column.dataset:
                spans[-1] = (column.dataset, spans[-1][1] + 1)
            else:
                spans.append((column.dataset, 1))
        return spans


def _marker(index: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = letters[rem] + out
    return out


def format_value(value: float, decimals: int, *, signed: bool = False) -> str:
    """Fixed decimals; ``-0.00`` prints as ``0.00`` (``+0.00`` when signed)."""
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if float(text) == 0.0:
        text = ("+" if signed else "") + f"{0.0:.{decimals}f}"
    return text


def value_cell(value: float, decimals: int) -> Cell:
    text = format_value(value, decimals)
    return Cell(text=text, value=float(text))


def rank_group(group: Group, columns: list[Column]) -> None:
    """Mark best (bold) and second (underline) per column on the displayed values (dense ranking)."""
    if not group.ranked:
        return
    for j, column in enumerate(columns):
        entries = [
            row.cells[j]
            for row in group.rows
            if not row.reference and row.cells[j].value is not None
        ]
        if len(entries) < 2:
            continue
        distinct = sorted({cell.value for cell in entries}, reverse=not column.lower_better)
        for cell in entries:
            if cell.value == distinct[0]:
                cell.mark = "best"
            elif len(distinct) > 1 and cell.value == distinct[1]:
                cell.mark = "second"


def bits_sort_key(bits: str) -> tuple[int, int, int]:
    """FP first, then higher weight bits, then higher activation bits; unknown labels last."""
    if bits == FP_BITS:
        return (0, 0, 0)
    match = re.match(r"^W(\d+)A(\d+)$", bits)
    if not match:
        return (2, 0, 0)
    return (1, -int(match.group(1)), -int(match.group(2)))


# --------------------------------------------------------------------------------------------
# building the main table from stored results


def entry_cells(results: RunResults, label: str, bits: str) -> list[CellResult]:
    return [c for c in results.cells if c.label == label and c.bits == bits]


def _row_status(cells: list[CellResult]) -> tuple[list[CellResult], str | None, str]:
    """(finished cells, row footnote, label suffix)."""
    done = [c for c in cells if c.status == "done"]
    if done:
        if len(done) < len(cells):
            others = ", ".join(
                f"seed {c.seed}: {c.status}" + (f" ({c.reason})" if c.reason else "")
                for c in cells
                if c.status != "done"
            )
            return done, f"mean over {len(done)} of {len(cells)} calibration seeds ({others})", ""
        return done, None, ""
    first = cells[0]
    if first.status == "pending":
        return [], "not run yet (no stored result for this cell)", " (not run)"
    reason = first.reason or "no reason recorded"
    return [], f"{first.status}: {reason}", f" ({first.status})"


def _metric_value(
    done: list[CellResult], dataset: str, metric: str
) -> tuple[float | None, str | None]:
    """Mean over seeds of the stored dataset mean, or (None, why it is missing)."""
    values, reasons = [], []
    for cell in done:
        record = cell.dataset(dataset)
        means = record.get("means") or {}
        value = means.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append(float(value))
            continue
        reason = (record.get("unavailable") or {}).get(metric)
        reasons.append(reason or f"{metric} was not recorded for {dataset}")
    if values and not reasons:
        return sum(values) / len(values), None
    if values:
        return sum(values) / len(values), None
    return None, reasons[0] if reasons else f"{metric} was not recorded for {dataset}"


def _unavailable_note(metric: str, reason: str) -> str:
    """The footnote text; "not applicable" reasons are shared by every metric they apply to."""
    if reason.startswith(f"{metric}: "):
        reason = reason[len(metric) + 2 :]
    if reason.startswith("not applicable"):
        return reason[0].upper() + reason[1:]
    return f"{METRIC_NAMES.get(metric, metric)} unavailable: {reason}"


def _columns(results: RunResults, datasets: list[str], metrics: list[str]) -> list[Column]:
    return [
        Column(d, m, results.metric_direction(m), DECIMALS.get(m, DEFAULT_DECIMALS))
        for d in datasets
        for m in metrics
    ]


def _hoist_column_notes(table: Table) -> None:
    """A column unavailable in every row for one reason: footnote on the header, plain "–" cells.

    Rows that print "–" because the whole row failed (no value and no note) do not count."""
    for j, column in enumerate(table.columns):
        cells = [
            row.cells[j]
            for group in table.groups
            for row in group.rows
            if row.cells[j].value is not None or row.cells[j].note
        ]
        notes = {cell.note for cell in cells}
        if cells and len(notes) == 1 and None not in notes:
            note = notes.pop()
            table.columns[j] = Column(
                column.dataset, column.metric, column.lower_better, column.decimals, note
            )
            for cell in cells:
                cell.note = None


def general_notes(results: RunResults) -> list[str]:
    """Notes every table carries: simulated quantization, limit, seeds, calibration budgets."""
    notes = [SIMULATED_NOTE]
    if results.limit:
        notes.append(
            f"Limited run: each dataset was evaluated on its first {results.limit} image(s) only "
            "(--limit); the numbers are not comparable with full-set results."
        )
    seeds = sorted({c.seed for c in results.cells if c.seed is not None})
    if len(seeds) > 1:
        notes.append(
            f"Quantized rows are means over calibration seeds {', '.join(map(str, seeds))}."
        )
    budgets: dict[str, list[str]] = {}
    for entry in results.method_entries():
        calib = entry.get("calibration")
        if calib:
            text = (
                f"{calib.get('n')} crops of {calib.get('lr_crop')} px LR from {calib.get('source')}"
            )
            if entry.get("params"):
                text += f" (params {entry.get('params')})"
            budgets.setdefault(text, []).append(entry["label"])
    if budgets:
        parts = [f"{text}: {', '.join(labels)}" for text, labels in budgets.items()]
        notes.append("Calibration: " + "; ".join(parts) + ".")
    notes.append(
        "↑ higher is better, ↓ lower is better. Bold: best, underlined: second best per column "
        "within each bit group, ranked on the displayed (rounded) values; W32A32 rows are not ranked."
    )
    return notes


def main_table(
    results: RunResults,
    *,
    include_ablations: bool = False,
    datasets: list[str] | None = None,
    metrics: list[str] | None = None,
    title: str | None = None,
) -> Table:
    """The paper's main table from stored results (module docstring)."""
    datasets = datasets or results.datasets
    metrics = metrics or results.metrics
    columns = _columns(results, datasets, metrics)
    entries = [e for e in results.method_entries() if include_ablations or not e.get("ablation_of")]
    by_bits: dict[str, list[Row]] = {}
    for entry in entries:
        for bits in entry["bits"]:
            cells = entry_cells(results, entry["label"], bits)
            if not cells:
                continue
            done, row_note, suffix = _row_status(cells)
            row_cells = []
            for column in columns:
                if not done:
                    row_cells.append(Cell(DASH))
                    continue
                value, reason = _metric_value(done, column.dataset, column.metric)
                if value is None:
                    row_cells.append(
                        Cell(DASH, note=_unavailable_note(column.metric, reason or ""))
                    )
                else:
                    row_cells.append(value_cell(value, column.decimals))
            row = Row(entry["label"] + suffix, row_cells, note=row_note, reference=bits == FP_BITS)
            by_bits.setdefault(bits, []).append(row)
    groups = [
        Group(FP_DISPLAY_BITS if bits == FP_BITS else bits, by_bits[bits], ranked=bits != FP_BITS)
        for bits in sorted(by_bits, key=bits_sort_key)
    ]
    table = Table(
        title=title or f"{results.config.get('name', 'run')}: quality per method and bits",
        columns=columns,
        groups=groups,
        notes=general_notes(results),
    )
    _hoist_column_notes(table)
    for group in table.groups:
        rank_group(group, table.columns)
    return table


# --------------------------------------------------------------------------------------------
# escaping


def md_escape(text: Any) -> str:
    """Markdown table text: HTML-escaped (renders as text, never as markup), with ``|``, ``*``,
    ``_``, backticks and brackets escaped and newlines flattened."""
    text = html.escape(str(text), quote=False)
    text = text.replace("\\", "\\\\")
    for char in "|*_`[]":
        text = text.replace(char, "\\" + char)
    return text.replace("\r", " ").replace("\n", " ")


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}
_LATEX_UNICODE = {
    "–": "--",
    "—": "---",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "×": r"$\times$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "±": r"$\pm$",
    "…": r"\ldots{}",
    "’": "'",
    "‘": "`",
    "“": "``",
    "”": "''",
    "²": r"\textsuperscript{2}",
    "ε": r"$\varepsilon$",
    "α": r"$\alpha$",
    "φ": r"$\phi$",
    "Δ": r"$\Delta$",
    "ᾱ": r"$\bar\alpha$",
    "√": r"$\surd$",
    "\u00a0": "~",
}


def latex_escape(text: Any) -> str:
    """Text that pdflatex (plain ``article`` + booktabs) typesets literally. Characters outside
    ASCII without a mapping print as ``[U+XXXX]`` rather than breaking the build."""
    out = []
    text = str(text)
    for index, char in enumerate(text):
        if char == "-" and text[index + 1 : index + 2] == "-":
            out.append("-{}")  # keep "--limit" from becoming an en dash
        elif char in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[char])
        elif char in _LATEX_UNICODE:
            out.append(_LATEX_UNICODE[char])
        elif char in "\r\n\t":
            out.append(" ")
        elif ord(char) < 32:
            continue
        elif ord(char) > 126:
            out.append(f"[U+{ord(char):04X}]")
        else:
            out.append(char)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# renderers


def _md_cell(cell: Cell, markers: dict[str, str]) -> str:
    text = md_escape(cell.text)
    if cell.mark == "best":
        text = f"**{text}**"
    elif cell.mark == "second":
        text = f"<u>{text}</u>"
    if cell.note:
        text += f"<sup>{markers[cell.note]}</sup>"
    return text


def render_markdown(table: Table, *, heading: bool = True) -> str:
    """GitHub-flavoured Markdown: bold via ``**``, underline via ``<u>``, footnotes ``<sup>a</sup>``."""
    markers = table.footnotes()
    single = len({c.dataset for c in table.columns}) == 1
    lines: list[str] = []
    if heading:
        lines.append(f"**{md_escape(table.title)}**")
        lines.append("")
    if single and table.columns:
        lines.append(f"Dataset: {md_escape(table.columns[0].dataset)}")
        lines.append("")
    header = ["Bits", "Method"]
    for column in table.columns:
        title = f"{column.title}{column.arrow}"
        if not single:
            title = f"{column.dataset} {title}"
        title = md_escape(title)
        if column.note:
            title += f"<sup>{markers[column.note]}</sup>"
        header.append(title)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---", ":---"] + ["---:"] * len(table.columns)) + "|")
    for group in table.groups:
        for row in group.rows:
            label = md_escape(row.label)
            if row.note:
                label += f"<sup>{markers[row.note]}</sup>"
            cells = [_md_cell(cell, markers) for cell in row.cells]
            lines.append("| " + " | ".join([md_escape(group.bits), label, *cells]) + " |")
    lines.append("")
    for text, marker in markers.items():
        lines.append(f"<sup>{marker}</sup> {md_escape(text)}  ")
    if markers:
        lines.append("")
    for note in table.notes:
        lines.append(f"- {md_escape(note)}")
    return "\n".join(lines).rstrip() + "\n"


def _tex_cell(cell: Cell, markers: dict[str, str]) -> str:
    text = latex_escape(cell.text)
    if cell.mark == "best":
        text = rf"\textbf{{{text}}}"
    elif cell.mark == "second":
        text = rf"\underline{{{text}}}"
    if cell.note:
        text += rf"\textsuperscript{{{markers[cell.note]}}}"
    return text


def render_latex(table: Table, *, label: str = "tab:qbench-main", float_env: bool = True) -> str:
    """A booktabs table (``\\toprule``/``\\midrule``/``\\cmidrule``/``\\bottomrule``) that compiles in
    a plain ``article`` with ``\\usepackage{booktabs}``. Bold ``\\textbf``, second ``\\underline``."""
    markers = table.footnotes()
    spans = table.datasets()
    lines = [
        "% Generated by qbench (reports/tables.py) from stored results. Needs \\usepackage{booktabs}.",
    ]
    if float_env:
        lines += [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
                  rf"\label{{{latex_escape(label)}}}"]  # fmt: skip
    lines += [r"\small", r"\setlength{\tabcolsep}{3pt}"]
    colspec = "ll" + "".join("r" * n for _, n in spans)
    lines.append(rf"\begin{{tabular}}{{{colspec}}}")
    lines.append(r"\toprule")
    header = [" ", " "] + [
        rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(name)}}}" for name, n in spans
    ]
    lines.append(" & ".join(header) + r" \\")
    rules, start = [], 3
    for _, n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    titles = ["Bits", "Method"]
    for column in table.columns:
        title = latex_escape(f"{column.title}{column.arrow}")
        if column.note:
            title += rf"\textsuperscript{{{markers[column.note]}}}"
        titles.append(title)
    lines.append(" & ".join(titles) + r" \\")
    for group in table.groups:
        lines.append(r"\midrule")
        for index, row in enumerate(group.rows):
            label = latex_escape(row.label)
            if row.note:
                label += rf"\textsuperscript{{{markers[row.note]}}}"
            bits = latex_escape(group.bits) if index == 0 else ""
            cells = [_tex_cell(cell, markers) for cell in row.cells]
            lines.append(" & ".join([bits, label, *cells]) + r" \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if markers or table.notes:
        lines.append(r"\par\smallskip")
        lines.append(r"\begin{minipage}{\linewidth}\footnotesize\raggedright")
        for text, marker in markers.items():
            lines.append(rf"\textsuperscript{{{marker}}}{latex_escape(text)}\par")
        for note in table.notes:
            lines.append(latex_escape(note) + r"\par")
        lines.append(r"\end{minipage}")
    if float_env:
        lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def latex_document(body: str) -> str:
    """A plain pdflatex document around rendered tables (what the tests compile)."""
    return (
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
        "\\begin{document}\n" + body + "\\end{document}\n"
    )


__all__ = [
    "Cell",
    "Column",
    "DECIMALS",
    "Group",
    "Row",
    "SIMULATED_NOTE",
    "Table",
    "format_value",
    "general_notes",
    "latex_document",
    "latex_escape",
    "main_table",
    "md_escape",
    "rank_group",
    "render_latex",
    "render_markdown",
]

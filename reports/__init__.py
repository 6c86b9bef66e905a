"""Reports built only from a stored run directory (``harness.store``): tables, comparisons, plots,
visual comparison and the report page. Nothing here runs a model or reads a dataset.

:func:`load_run` reads a run directory into :class:`RunResults`, the one view every renderer uses:
the resolved config, every cell of the current matrix with its stored record (or ``pending``), and
the provenance sessions. Cells in ``cells/`` that are not part of the current config are counted in
:attr:`RunResults.stale_cells` and otherwise ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FP_BITS = "FP"
FP_DISPLAY_BITS = "W32A32"
"""The bits label tables show for rows that are not quantized (the papers' W32A32)."""


@dataclass
class CellResult:
    """One cell of the matrix: its spec (dict) and its stored record, if committed."""

    spec: dict[str, Any]
    record: dict[str, Any] | None

    @property
    def cell_id(self) -> str:
        return self.spec["cell_id"]

    @property
    def label(self) -> str:
        return self.spec["label"]

    @property
    def method(self) -> str:
        return self.spec["method"]

    @property
    def bits(self) -> str:
        return self.spec["bits"]

    @property
    def seed(self) -> int | None:
        return self.spec.get("seed")

    @property
    def ablation_of(self) -> str | None:
        return self.spec.get("ablation_of")

    @property
    def status(self) -> str:
        return self.record["status"] if self.record else "pending"

    @property
    def reason(self) -> str | None:
        return self.record.get("reason") if self.record else None

    def dataset(self, name: str) -> dict[str, Any]:
        if not self.record:
            return {}
        return (self.record.get("datasets") or {}).get(name) or {}


@dataclass
class RunResults:
    """Everything a report needs, read from one run directory."""

    run_dir: Path
    config: dict[str, Any]
    cells: list[CellResult]
    provenance: dict[str, Any]
    stale_cells: list[str] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(self.config.get("datasets", []))

    @property
    def metrics(self) -> list[str]:
        return list(self.config.get("metrics", []))

    @property
    def limit(self) -> int | None:
        return self.config.get("limit")

    def method_entries(self) -> list[dict[str, Any]]:
        return list(self.config.get("methods", []))

    def store(self):
        from harness.store import RunStore

        return RunStore(self.run_dir)

    def rows(self, cell: CellResult) -> list[dict[str, Any]]:
        """Per-image rows of a committed cell."""
        return self.store().read_rows(cell.cell_id) if cell.record else []

    def crop(self, entry: dict[str, Any]) -> bytes:
        return self.store().read_crop(entry)

    def metric_direction(self, metric: str) -> bool:
        """True when lower is better: from a stored metric spec record, else from the registry."""
        for cell in self.cells:
            spec = ((cell.record or {}).get("metric_specs") or {}).get(metric)
            if spec and "lower_better" in spec:
                return bool(spec["lower_better"])
        from harness.metrics import METRICS

        if metric in METRICS:
            return METRICS[metric].lower_better
        return False


def load_run(run_dir: str | Path) -> RunResults:
    """Read a run directory (read-only; no lock needed: every file is written atomically)."""
    from harness.store import RunStore

    store = RunStore(run_dir)
    data = store.read_config()
    cells = []
    wanted = set()
    for spec in data.get("cells", []):
        stored = store.read_cell(spec["cell_id"])
        wanted.add(spec["cell_id"])
        cells.append(CellResult(spec=spec, record=stored.record if stored else None))
    stale = [cid for cid in store.committed_ids() if cid not in wanted]
    return RunResults(
        run_dir=Path(run_dir),
        config=data.get("config", {}),
        cells=cells,
        provenance=store.read_provenance(),
        stale_cells=stale,
    )


__all__ = ["FP_BITS", "FP_DISPLAY_BITS", "CellResult", "RunResults", "load_run"]

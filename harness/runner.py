"""``run_matrix``: expand a run config into cells and run them as Ray tasks, resumably.

Behaviour (issue 7):

- **Ray.** ``ray.init(num_cpus=N, include_dashboard=False)`` locally by default (N = ``--workers`` or
  the machine's cores; workers at normal priority, :data:`LOCAL_WORKER_NICENESS`); ``--address`` connects to an existing cluster instead. If Ray is already
  initialised in this process (tests, notebooks) that session is used and left running. Each cell is
  a task with the config's ``num_cpus``/``num_gpus``; workers call ``torch.set_num_threads(1)`` and
  run the cell through one function (``executor``, default :func:`harness.cells.execute_cell`).
- **One writer.** Workers return rows, means, curves and crops; the driver writes each cell as soon
  as its task finishes (``ray.wait``), so a cluster needs no shared file system. See
  :mod:`harness.store` for the atomic-write and commit rules.
- **Resume is the default.** Cells with a committed ``done`` or ``diverged`` record are skipped
  (divergence is a measured, deterministic outcome); ``failed`` cells are skipped unless
  ``retry_failed``. A cell that raises is recorded ``failed`` with its reason and the run goes on.
  A worker that dies (``kill -9``, the OOM killer) is retried by Ray (``max_retries``), and if it
  keeps dying the cell is recorded ``failed`` with Ray's error. ``kill -9`` of the driver loses only
  the cells in flight: the rerun skips every committed cell and never duplicates one.
- **Disk full.** A failed write (``ENOSPC``) stops the run with :class:`~harness.store.StoreError`;
  the directory holds only complete results and a rerun resumes.
- **Progress.** A rich table of every cell (status, stage, per-image progress, time) on stderr;
  workers report per-image progress through a small Ray actor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cells import CellContext, CellOutcome, CellSpec, execute_cell
from harness.errors import QBenchError
from harness.store import RunStore, StoreError, provenance_session

Executor = Callable[[CellSpec, CellContext], CellOutcome]

LOCAL_WORKER_NICENESS = 0
"""Ray starts workers at niceness 15 by default (to keep its own daemons responsive); here the workers
are the workload, so a local cluster started by ``run_matrix`` runs them at normal priority. On a
shared machine niceness 15 made cells many times slower than the same code outside Ray."""

TASK_MAX_RETRIES = 2
"""How often Ray re-runs a cell whose worker process died (not when the cell raised)."""


@dataclass
class RunSummary:
    """What a ``run_matrix`` call did. ``statuses`` covers every cell of the matrix."""

    run_dir: Path
    cells: list[CellSpec]
    skipped: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)

    @property
    def complete(self) -> bool:
        return all(s in ("done", "diverged") for s in self.statuses.values())

    def describe(self) -> str:
        parts = [
            f"{self.count(s)} {s}"
            for s in ("done", "diverged", "failed", "pending")
            if self.count(s)
        ]
        return (
            f"{len(self.cells)} cells: {', '.join(parts) or 'none'}; ran {len(self.executed)}, "
            f"skipped {len(self.skipped)} already stored; {self.wall_seconds:.1f} s -> {self.run_dir}"
        )


# --------------------------------------------------------------------------------------------
# worker side


def _run_cell_task(executor: Executor, cell_data: dict, ctx: CellContext) -> dict:
    """The Ray task body: one torch thread, run the cell, never raise for a cell-level error."""
    try:
        import torch

        torch.set_num_threads(ctx.torch_threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    cell = CellSpec.from_dict(cell_data)
    ctx.report(cell.cell_id, "started", 0, 0)
    start = time.perf_counter()
    try:
        outcome = executor(cell, ctx)
        if not isinstance(outcome, CellOutcome):
            raise TypeError(f"the cell executor returned {type(outcome).__name__}, not CellOutcome")
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's failure
        outcome = CellOutcome.from_exception(cell.cell_id, exc)
    outcome.timings.setdefault("total_s", time.perf_counter() - start)
    payload = outcome.to_payload()
    payload["attempt"] = {"worker_pid": os.getpid()}
    return payload


class ProgressBoard:
    """Ray actor body: the latest (stage, done, total) per cell, polled by the driver."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, int, int, float]] = {}

    def update(self, cell_id: str, stage: str, done: int, total: int) -> None:
        self.state[cell_id] = (stage, int(done), int(total), time.time())

    def snapshot(self) -> dict[str, tuple[str, int, int, float]]:
        return dict(self.state)


class BoardReporter:
    """Picklable ``progress(cell_id, stage, done, total)`` that forwards to a ProgressBoard actor."""

    def __init__(self, board: Any):
        self.board = board

    def __call__(self, cell_id: str, stage: str, done: int, total: int) -> None:
        self.board.update.remote(cell_id, stage, done, total)


# --------------------------------------------------------------------------------------------
# display


class _Display:
    """A rich live table of the cells (on stderr); a no-op when ``enabled`` is False."""

    def __init__(self, cells: list[CellSpec], enabled: bool):
        self.cells = cells
        self.enabled = enabled
        self.status: dict[str, str] = {c.cell_id: "pending" for c in cells}
        self.stage: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.live = None

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self.render(), console=Console(stderr=True), refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def render(self):
        from rich.table import Table

        table = Table(title="qbench run-matrix", expand=False)
        for column in ("cell", "method", "bits", "seed", "status", "stage", "time"):
            table.add_column(column)
        colours = {"done": "green", "failed": "red", "diverged": "yellow", "running": "cyan"}
        now = time.time()
        for cell in self.cells:
            status = self.status[cell.cell_id]
            if cell.cell_id in self.seconds:
                elapsed = f"{self.seconds[cell.cell_id]:.1f}s"
            elif cell.cell_id in self.started:
                elapsed = f"{now - self.started[cell.cell_id]:.0f}s"
            else:
                elapsed = ""
            style = colours.get(status, "")
            table.add_row(
                cell.cell_id[:8],
                cell.label,
                cell.bits,
                "" if cell.seed is None else str(cell.seed),
                f"[{style}]{status}[/{style}]" if style else status,
                self.stage.get(cell.cell_id, ""),
                elapsed,
            )
        return table

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def set(self, cell_id: str, status: str, seconds: float | None = None) -> None:
        self.status[cell_id] = status
        if status == "running":
            self.started.setdefault(cell_id, time.time())
        if seconds is not None:
            self.seconds[cell_id] = seconds
            self.stage.pop(cell_id, None)

    def progress(self, snapshot: dict[str, tuple]) -> None:
        for cell_id, (stage, done, total, _) in snapshot.items():
            if self.status.get(cell_id) == "running":
                self.stage[cell_id] = f"{stage} {done}/{total}" if total else stage


# --------------------------------------------------------------------------------------------
# driver


def _start_ray(address: str | None, num_workers: int | None) -> bool:
    """Initialise Ray unless it already is; returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(
            num_cpus=num_workers or os.cpu_count() or 1,
            _system_config={"worker_niceness": LOCAL_WORKER_NICENESS},
            **options,
        )
    return True


def default_run_dir(config) -> Path:
    return Path("runs") / config.name


def plan_cells(
    config_path: str | Path,
    *,
    limit: int | None = None,
    methods=None,
) -> tuple[Any, list[CellSpec], dict[str, str]]:
    """Load and validate the config, resolve the datasets and expand the cells (no Ray needed)."""
    from harness.runconfig import dataset_manifests, expand_cells, load_run_config

    config = load_run_config(config_path, methods=methods).with_limit(limit)
    manifests = dataset_manifests(config.datasets)
    return config, expand_cells(config, manifests), manifests


def run_matrix(
    config_path: str | Path,
    *,
    out_dir: str | Path | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    limit: int | None = None,
    num_workers: int | None = None,
    executor: Executor = execute_cell,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    methods=None,
    max_retries: int = TASK_MAX_RETRIES,
) -> RunSummary:
    """Run (or resume) the matrix of ``config_path`` into ``out_dir`` (default ``runs/<name>``).

    ``executor(cell, ctx) -> CellOutcome`` runs one cell on a worker (default: the real
    :func:`~harness.cells.execute_cell`); ``cache_dir`` is where workers cache calibrated models and
    FP references (default :func:`harness.paths.cache_dir` on each worker); ``methods`` is an
    optional :class:`~harness.runconfig.MethodCatalog` (default: the method registry).
    """
    started = time.perf_counter()
    config, cells, manifests = plan_cells(config_path, limit=limit, methods=methods)
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(config)
    store = RunStore(run_dir)
    summary = RunSummary(run_dir=run_dir, cells=cells)
    with store:
        store.write_config(config.to_dict(), cells)
        todo: list[CellSpec] = []
        for cell in cells:
            stored = store.read_cell(cell.cell_id)
            if stored is not None and (stored.status != "failed" or not retry_failed):
                summary.skipped.append(cell.cell_id)
                summary.statuses[cell.cell_id] = stored.status
                if stored.record.get("reason"):
                    summary.reasons[cell.cell_id] = stored.record["reason"]
            else:
                todo.append(cell)
                summary.statuses[cell.cell_id] = "pending"
        store.add_provenance(
            provenance_session(
                config,
                cells,
                manifests,
                extra={
                    "run_dir": str(run_dir),
                    "to_run": [c.cell_id for c in todo],
                    "skipped": list(summary.skipped),
                    "retry_failed": retry_failed,
                    "ray_address": address,
                    "num_workers": num_workers,
                    "executor": f"{getattr(executor, '__module__', '?')}."
                    f"{getattr(executor, '__qualname__', repr(executor))}",
                },
            )
        )
        store.write_status(cells)
        if todo:
            _run_cells(
                todo, cells, store, summary, executor=executor, address=address,
                num_workers=num_workers, progress=progress, cache_dir=cache_dir,
                max_retries=max_retries,
            )  # fmt: skip
        store.write_status(cells)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _run_cells(
    todo: list[CellSpec],
    cells: list[CellSpec],
    store: RunStore,
    summary: RunSummary,
    *,
    executor: Executor,
    address: str | None,
    num_workers: int | None,
    progress: bool,
    cache_dir: str | Path | None,
    max_retries: int,
) -> None:
    import ray

    started_ray = _start_ray(address, num_workers)
    pending: dict[Any, CellSpec] = {}
    board = None
    try:
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        ctx = CellContext(
            cache_dir=str(Path(cache_dir).resolve()) if cache_dir is not None else None,
            progress=BoardReporter(board),
        )
        task = ray.remote(_run_cell_task)
        executor_ref = ray.put(executor)
        display_cells = [c for c in cells if c.cell_id in {t.cell_id for t in todo}]
        with _Display(display_cells, progress) as display:
            for cell in todo:
                ref = task.options(
                    num_cpus=cell.num_cpus,
                    num_gpus=cell.num_gpus,
                    max_retries=max_retries,
                    retry_exceptions=False,
                    name=f"cell-{cell.cell_id}",
                ).remote(executor_ref, cell.to_dict(), ctx)
                pending[ref] = cell
            last_poll = 0.0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    cell = pending.pop(ref)
                    outcome, attempt = _collect(ref, cell)
                    try:
                        store.write_cell(cell, outcome, attempt_info=attempt)
                        store.write_status(cells)
                    except OSError as exc:
                        raise StoreError(
                            f"cannot write cell {cell.cell_id} ({cell.title}) to {store.run_dir}: "
                            f"{exc}. Every stored cell is complete; free space and rerun to resume."
                        ) from exc
                    summary.executed.append(cell.cell_id)
                    summary.statuses[cell.cell_id] = outcome.status
                    if outcome.reason:
                        summary.reasons[cell.cell_id] = outcome.reason
                    display.set(cell.cell_id, outcome.status, outcome.timings.get("total_s"))
                now = time.time()
                if now - last_poll > 0.5:
                    last_poll = now
                    try:
                        snapshot = ray.get(board.snapshot.remote(), timeout=5)
                    except Exception:  # noqa: BLE001 - progress is best effort
                        snapshot = {}
                    for cell_id in snapshot:
                        if display.status.get(cell_id) == "pending":
                            display.set(cell_id, "running")
                    display.progress(snapshot)
                    display.refresh()
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):  # best effort while unwinding
                ray.cancel(ref, force=True)
        raise
    finally:
        if board is not None and not started_ray:
            with contextlib.suppress(Exception):  # a shared session keeps running: free the actor
                ray.kill(board)
        if started_ray:
            ray.shutdown()


def _collect(ref: Any, cell: CellSpec) -> tuple[CellOutcome, dict]:
    """The outcome of a finished task; a task that Ray could not complete becomes ``failed``."""
    import ray

    try:
        payload = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - WorkerCrashedError, OutOfMemoryError, RayTaskError...
        message = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {message[0] if message else ''}"
        if len(message) > 1:
            reason += " " + " ".join(line.strip() for line in message[1:4])
        return (
            CellOutcome(cell_id=cell.cell_id, status="failed", reason=f"worker lost: {reason}"),
            {"ray_error": type(exc).__name__},
        )
    attempt = payload.pop("attempt", {})
    try:
        return CellOutcome.from_payload(payload), attempt
    except (TypeError, ValueError, KeyError) as exc:
        return (
            CellOutcome(
                cell_id=cell.cell_id, status="failed", reason=f"malformed cell result: {exc}"
            ),
            attempt,
        )


def matrix_status(run_dir: str | Path) -> list[dict]:
    """The status rows of a run directory (read-only; for ``qbench report`` and tests)."""
    store = RunStore(run_dir)
    data = store.read_config()
    cells = [CellSpec.from_dict(c) for c in data["cells"]]
    return store.status_rows(cells)


__all__ = [
    "BoardReporter",
    "ProgressBoard",
    "QBenchError",
    "RunSummary",
    "matrix_status",
    "plan_cells",
    "run_matrix",
]

"""One cell of a run matrix: its spec, its outcome, and :func:`execute_cell`, the function that runs it.

A cell is model × method variant × bits × calibration seed, evaluated on every listed dataset
(issue 7). :func:`execute_cell` is the only code path that produces results for ``qbench run-matrix``
(the runner calls it inside a Ray task); it never writes into the run directory. It returns a
:class:`CellOutcome` with the per-image rows, per-dataset means, metric spec records, loss curves,
timings and a few PNG crops, and the driver stores them.

What it does, in order:

1. Loads the FP base model (:func:`harness.loaders.load_model`) with the model's default inference
   settings updated by the config's ``[inference]`` overrides.
2. Resolves each dataset and checks that its manifest hash still equals the one hashed into the
   cell id (data changed since the run started → the cell fails with that reason).
3. FP references, once per dataset: when the cell quantizes and asks for an ``fp``-kind metric
   (``psnr_fp``/``ssim_fp``), the FP model's outputs are computed before quantizing and cached as
   8-bit PNGs under ``<cache>/fp_refs/<key>/`` (key = model identity + inference settings + dataset
   manifest). Every metric rounds its inputs to 8-bit levels first (:func:`harness.metrics.quantize_8bit`),
   so the PNG is an exact stand-in for the tensor. The ``fp`` cell writes the same cache while it
   evaluates, so quantized cells that start after it reuse its outputs. ``fp``-kind metrics are not
   applicable to rows that do not quantize (they would compare a model with itself) and are recorded
   as unavailable with that reason.
4. Quantizes through the one entry point (:func:`harness.quant.api.quantize`) after seeding Python,
   NumPy and torch with the cell's calibration seed (which also seeds the crop selection), or loads the
   calibrated model from ``<cache>/quantized/<model_key>-<code>/`` (:mod:`harness.quant.io`);
   ``model_key`` excludes datasets, metrics and limit, so a re-evaluation never recalibrates, and
   ``code`` fingerprints the method's module and ``harness/quant`` (:func:`source_fingerprint`), so a
   model calibrated by older code is never reused. A cache entry that
   does not load (corrupt, another base model) is rebuilt and the reason recorded.
5. Evaluates every dataset with :func:`harness.evaluate.evaluate_dataset` (the same code as
   ``qbench eval``), keeps crops of the first ``visual.images`` pairs (HR, bicubic-upsampled LR and
   SR, the same centred window), and reports per-image progress.

NaN/Inf anywhere (calibration, a model stage, a metric) raises :class:`~harness.errors.DivergedError`
and the outcome is ``diverged`` with the cause; any other exception gives ``failed`` with the reason
and traceback. Results of datasets finished before the divergence are kept in the outcome.

Folder-level metrics (FID) are not computed by run-matrix: they are recorded as unavailable with
that reason (a documented limitation; ``qbench score`` computes them on saved folders).

The cache directory is worker-local (``ctx.cache_dir`` or :func:`harness.paths.cache_dir`), so a Ray
cluster needs no shared file system; the run directory is written only by the driver.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("done", "failed", "diverged")

PROGRESS_CALL = Callable[[str, str, int, int], None]
"""``progress(cell_id, stage, done, total)``."""


# --------------------------------------------------------------------------------------------
# specs and outcomes


@dataclass(frozen=True)
class CellSpec:
    """A fully resolved cell (built by :func:`harness.runconfig.expand_cells`).

    ``cell_id``/``model_key`` are hashes of the fields listed in :mod:`harness.runconfig`.
    ``seed`` is None for methods that need no calibration; ``bits`` is ``"FP"`` for methods that do
    not quantize.
    """

    cell_id: str
    model_key: str
    label: str
    method: str
    ablation_of: str | None
    model: str
    bits: str
    scope: str
    seed: int | None
    method_config: dict[str, Any]
    calibration: dict[str, Any] | None
    inference: dict[str, Any]
    datasets: tuple[str, ...]
    manifests: dict[str, str]
    metrics: tuple[str, ...]
    limit: int | None
    visual: dict[str, int]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    quantizes: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["datasets"] = list(self.datasets)
        data["metrics"] = list(self.metrics)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["datasets"] = tuple(values.get("datasets", ()))
        values["metrics"] = tuple(values.get("metrics", ()))
        return cls(**values)

    @property
    def title(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.label} {self.bits}{seed}"


@dataclass(frozen=True)
class CropImage:
    """One PNG crop for the visual comparison. ``kind``: ``hr``, ``lr_up`` or ``sr``.
    ``box`` is (left, top, width, height) in HR/SR pixels."""

    dataset: str
    image: str
    kind: str
    box: tuple[int, int, int, int]
    png: bytes

    def to_payload(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "image": self.image,
            "kind": self.kind,
            "box": list(self.box),
            "png_base64": base64.b64encode(self.png).decode("ascii"),
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> CropImage:
        return cls(
            dataset=str(data["dataset"]),
            image=str(data["image"]),
            kind=str(data["kind"]),
            box=tuple(int(v) for v in data["box"]),
            png=base64.b64decode(data["png_base64"]),
        )


@dataclass
class CellOutcome:
    """What a cell produced. ``datasets`` maps a dataset name to ``{"images", "means",
    "unavailable", "settings", "manifest_hash", "limit", "seconds"}``; ``rows`` are per-image dicts
    that carry a ``dataset`` key; ``curves`` maps a name to ``{"kind": "loss" | "sweep",
    "x": [...] | None, "y": [...], "xlabel", "ylabel"}``."""

    cell_id: str
    status: str
    reason: str | None = None
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    crops: list[CropImage] = field(default_factory=list)
    model_record: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    traceback: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"cell status must be one of {STATUSES}, got {self.status!r}")

    def to_payload(self) -> dict[str, Any]:
        """Plain data (crops as base64) for Ray's object store and for tests."""
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "crops"
        }
        data["crops"] = [c.to_payload() for c in self.crops]
        return data

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> CellOutcome:
        values = {k: v for k, v in data.items() if k != "crops"}
        outcome = cls(**values)
        outcome.crops = [CropImage.from_payload(c) for c in data.get("crops", [])]
        return outcome

    @classmethod
    def from_exception(cls, cell_id: str, exc: BaseException, **partial: Any) -> CellOutcome:
        """``diverged`` for :class:`DivergedError`, else ``failed``; the reason names the type."""
        from harness.errors import DivergedError, QBenchError

        if isinstance(exc, DivergedError):
            status, reason = "diverged", f"NaN/Inf: {exc}"
        elif isinstance(exc, MemoryError):
            status, reason = "failed", f"out of memory: {exc}"
        elif isinstance(exc, QBenchError):
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
        else:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(cell_id=cell_id, status=status, reason=reason, traceback=tb, **partial)


@dataclass
class CellContext:
    """Worker-side settings. ``cache_dir``: where calibrated models and FP references are cached
    (default :func:`harness.paths.cache_dir`); ``progress(cell_id, stage, done, total)`` receives
    per-image progress; ``torch_threads``: one per worker (the machine's cores go to Ray workers)."""

    cache_dir: str | None = None
    progress: PROGRESS_CALL | None = None
    torch_threads: int = 1
    device: str | None = None

    def report(self, cell_id: str, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            with contextlib.suppress(Exception):  # progress must never fail a cell
                self.progress(cell_id, stage, done, total)

    def cache_root(self) -> Path:
        if self.cache_dir is not None:
            path = Path(self.cache_dir)
            path.mkdir(parents=True, exist_ok=True)
            return path
        from harness.paths import cache_dir

        return cache_dir()


def environment_record(device: str) -> dict[str, Any]:
    """Where a cell ran: host, pid, device, library versions, torch threads."""
    import torch

    record: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(0)
    return record


# --------------------------------------------------------------------------------------------
# curves


def _numeric_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def extract_curves(record: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Loss curves and sweeps found in a method's calibration record.

    Convention (for method authors): a ``curves`` table ``{name: [y...]}`` or ``{name: {"x": [...],
    "y": [...], "xlabel": str, "ylabel": str, "kind": "loss" | "sweep"}}`` (loss curves by default);
    besides that, any list of ≥ 2 numbers under a key containing ``loss`` or ``curve``, and any
    ``{x-key: [...], y-key: [...]}`` or list of ``{x-key: n, y-key: n}`` rows under a key containing
    ``sweep`` (QArtSR's T* sweep: kind ``sweep``) are taken. Identical curves are kept once.
    """
    curves: dict[str, dict[str, Any]] = {}
    if not isinstance(record, Mapping):
        return curves
    _collect_curves(record, prefix, curves)
    seen: set[str] = set()
    unique: dict[str, dict[str, Any]] = {}
    for name, curve in curves.items():  # e.g. a sweep recorded twice (summary and detail)
        key = repr((curve.get("kind"), curve.get("x"), curve["y"]))
        if key not in seen:
            seen.add(key)
            unique[name] = curve
    return unique


def _collect_curves(record: Mapping, prefix: str, curves: dict[str, dict[str, Any]]) -> None:
    for key, value in record.items():
        name = f"{prefix}{key}"
        lowered = str(key).lower()
        if key == "curves" and isinstance(value, Mapping):
            for curve_name, curve in value.items():
                normal = _normalise_curve(curve)
                if normal is not None:
                    curves[f"{prefix}{curve_name}"] = normal
            continue
        if "sweep" in lowered:
            normal = _normalise_sweep(value)
            if normal is not None:
                curves[name] = normal
                continue
        if ("loss" in lowered or "curve" in lowered) and _numeric_list(value):
            curves[name] = {
                "kind": "loss",
                "x": None,
                "y": [float(v) for v in value],
                "xlabel": "step",
                "ylabel": str(key),
            }
            continue
        if isinstance(value, Mapping):
            _collect_curves(value, f"{name}/", curves)


def _normalise_curve(curve: Any) -> dict[str, Any] | None:
    if _numeric_list(curve):
        return {
            "kind": "loss",
            "x": None,
            "y": [float(v) for v in curve],
            "xlabel": "step",
            "ylabel": "loss",
        }
    if isinstance(curve, Mapping) and _numeric_list(curve.get("y")):
        x = curve.get("x")
        return {
            "kind": str(curve.get("kind", "loss")),
            "x": [float(v) for v in x] if _numeric_list(x) and len(x) == len(curve["y"]) else None,
            "y": [float(v) for v in curve["y"]],
            "xlabel": str(curve.get("xlabel", "step")),
            "ylabel": str(curve.get("ylabel", "loss")),
        }
    return None


def _normalise_sweep(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Mapping):
        lists = [(k, v) for k, v in value.items() if _numeric_list(v)]
        if len(lists) >= 2 and len(lists[0][1]) == len(lists[1][1]):
            (xk, xv), (yk, yv) = lists[0], lists[1]
            return {
                "kind": "sweep",
                "x": [float(v) for v in xv],
                "y": [float(v) for v in yv],
                "xlabel": xk,
                "ylabel": yk,
            }
        return _normalise_curve(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        keys = [
            k
            for k, v in value[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if len(keys) >= 2 and all(all(k in row for k in keys[:2]) for row in value):
            xk, yk = keys[0], keys[1]
            return {
                "kind": "sweep",
                "x": [float(row[xk]) for row in value],
                "y": [float(row[yk]) for row in value],
                "xlabel": str(xk),
                "ylabel": str(yk),
            }
    return None


# --------------------------------------------------------------------------------------------
# crops


def centre_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The centred ``crop``×``crop`` window (clipped to the image) as (left, top, width, height)."""
    w, h = min(crop, width), min(crop, height)
    return ((width - w) // 2, (height - h) // 2, w, h)


def png_crop(image, box: tuple[int, int, int, int]) -> bytes:
    """PNG bytes of ``box`` of a 1×3×H×W tensor (or H×W×3 array) in [0, 1], 8-bit round-half-up."""
    from PIL import Image

    from harness.images import to_uint8

    array = to_uint8(image)
    left, top, w, h = box
    buffer = io.BytesIO()
    Image.fromarray(array[top : top + h, left : left + w]).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# the FP reference cache


class FPReferences(Mapping):
    """FP outputs of one dataset, cached on disk as 8-bit PNGs; ``refs[name]`` loads a 1×3×H×W
    tensor. File names are hashes of the image names (names may hold any character)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, name: str) -> Path:
        from harness.runconfig import short_hash

        return self.directory / f"{short_hash(name, 24)}.png"

    def put(self, name: str, image) -> None:
        from harness.images import save_png

        path = self.path(name)
        if not path.is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            save_png(path, image)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.path(name).is_file()

    def __getitem__(self, name: str):
        from harness.images import load_image, to_tensor

        path = self.path(name)
        if not path.is_file():
            raise KeyError(name)
        return to_tensor(load_image(path).array)

    def __iter__(self):
        raise TypeError("FPReferences is looked up by image name only")

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.png"))) if self.directory.is_dir() else 0


def source_fingerprint(modules: list[str]) -> str:
    """SHA-256 (16 hex) of the source files of ``modules`` (a module or package name each).

    Part of the cache keys, so a calibrated model or an FP reference computed by older code is never
    reused after that code changed (the run directory's cell ids stay config-based)."""
    import hashlib
    import importlib

    digest = hashlib.sha256()
    for name in sorted(modules):
        module = importlib.import_module(name)
        files = [Path(module.__file__)]
        if Path(module.__file__).name == "__init__.py":
            files = sorted(Path(module.__file__).parent.glob("*.py"))
        for file in files:
            digest.update(file.name.encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


INFERENCE_MODULES = ["harness.model", "harness.tiling", "harness.loaders"]
QUANT_MODULES = [*INFERENCE_MODULES, "harness.quant"]


def fp_reference_dir(cache_root: Path, model, cell: CellSpec, dataset: str) -> Path:
    """``<cache>/fp_refs/<key>``: key over the model spec and identity, the effective inference
    settings, the dataset manifest hash and the inference code (:func:`source_fingerprint`)."""
    from harness.runconfig import short_hash

    key = short_hash(
        {
            "model": cell.model,
            "identity": getattr(model, "identity", {}),
            "settings": model.settings.to_dict(),
            "dataset": dataset,
            "manifest": cell.manifests.get(dataset),
            "code": source_fingerprint(INFERENCE_MODULES),
        },
        24,
    )
    return cache_root / "fp_refs" / key


class _OutputTap:
    """Wraps a model for :func:`harness.evaluate.evaluate_dataset`: remembers the LR input and SR
    output of chosen images and optionally stores every output as an FP reference. The evaluation's
    progress callback tells it which image is next (it is called just before ``super_resolve``)."""

    def __init__(self, model, keep: set[str], store: FPReferences | None = None):
        self.model = model
        self.keep = keep
        self.store = store
        self.current: str | None = None
        self.kept: dict[str, tuple[Any, Any]] = {}

    @property
    def settings(self):
        return self.model.settings

    def super_resolve(self, lr01, **kwargs):
        sr = self.model.super_resolve(lr01, **kwargs)
        if self.current is not None:
            if self.current in self.keep:
                self.kept[self.current] = (lr01, sr)
            if self.store is not None:
                self.store.put(self.current, sr)
        return sr


# --------------------------------------------------------------------------------------------
# execute_cell


def _inference_settings(cell: CellSpec):
    from harness.loaders import parse_model_spec, tiny_default_settings
    from harness.model import InferenceSettings

    base = (
        tiny_default_settings()
        if parse_model_spec(cell.model)["kind"] == "tiny"
        else InferenceSettings()
    )
    return InferenceSettings.from_dict({**base.to_dict(), **cell.inference})


def _device(cell: CellSpec, ctx: CellContext) -> str:
    if ctx.device:
        return ctx.device
    import torch

    return "cuda" if cell.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _calibration_set(cell: CellSpec, model, ctx: CellContext, cache_root: Path):
    from harness.quant.calibration import (
        CalibrationSettings,
        build_calibration_set,
        calibration_sources,
    )

    calib = cell.calibration or {}
    settings = CalibrationSettings(
        n=int(calib["n"]),
        lr_crop=int(calib["lr_crop"]),
        scale=int(model.settings.upscale),
        seed=int(cell.seed if cell.seed is not None else 0),
        teacher_batch_size=int(calib["teacher_batch_size"]),
    )
    source = calib["source"]

    def progress(stage: str, done: int, total: int) -> None:
        ctx.report(cell.cell_id, stage, done, total)

    return build_calibration_set(
        model,
        **calibration_sources(source),
        settings=settings,
        cache_root=cache_root,
        progress=progress,
    )


def _quantized_model(cell: CellSpec, model, ctx: CellContext, cache_root: Path, timings: dict):
    """Quantize ``model`` in place (or load the cached calibration). Returns (qmodel, cache note, model)."""
    from harness.errors import ModelError
    from harness.loaders import load_model
    from harness.quant.api import MethodConfig, quantize
    from harness.quant.io import load_quantized, save_quantized
    from harness.registry import get_method

    config = MethodConfig.from_dict(dict(cell.method_config))
    if not cell.quantizes:
        start = time.perf_counter()
        qmodel = quantize(model, config, None, base_model=cell.model)
        timings["quantize_s"] = time.perf_counter() - start
        return qmodel, "not cached (no calibration)", model
    code = source_fingerprint([*QUANT_MODULES, get_method(cell.method).module])
    cache = cache_root / "quantized" / f"{cell.model_key}-{code}"
    note = "miss"
    if (cache / "quantized.json").is_file():
        start = time.perf_counter()
        try:
            qmodel = load_quantized(cache, model)
            timings["load_calibrated_s"] = time.perf_counter() - start
            return qmodel, "hit", model
        except ModelError as exc:
            note = f"rebuilt ({exc})"
            model = load_model(cell.model, model.settings)  # the failed load may have modified it
    start = time.perf_counter()
    calibration = _calibration_set(cell, model, ctx, cache_root) if _needs_data(cell) else None
    timings["calibration_data_s"] = time.perf_counter() - start

    def progress(stage: str, done: int, total: int) -> None:
        ctx.report(cell.cell_id, f"calibrate: {stage}", done, total)

    _seed_everything(cell.seed if cell.seed is not None else 0)
    start = time.perf_counter()
    qmodel = quantize(model, config, calibration, progress=progress, base_model=cell.model)
    timings["calibrate_s"] = time.perf_counter() - start
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
    try:
        save_quantized(qmodel, tmp, extra={"cell_model_key": cell.model_key})
        os.replace(tmp, cache)  # atomic for a directory when the target does not exist
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another worker won the race, or the disk is full
    return qmodel, note, model


def _seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch with the cell's calibration seed before calibrating, so any
    randomness inside a method (data order, initialisation) is a function of the cell."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _needs_data(cell: CellSpec) -> bool:
    return cell.calibration is not None


def execute_cell(cell: CellSpec, ctx: CellContext | None = None) -> CellOutcome:
    """Run one cell for real (see the module docstring); never raises for a cell-level failure."""
    ctx = ctx or CellContext()
    timings: dict[str, float] = {}
    partial: dict[str, Any] = {"datasets": {}, "rows": [], "metric_specs": {}, "timings": timings}
    start_all = time.perf_counter()
    try:
        outcome = _execute(cell, ctx, partial)
    except BaseException as exc:  # noqa: BLE001 - a cell must report, not kill the worker
        if isinstance(exc, KeyboardInterrupt):
            raise
        timings["total_s"] = time.perf_counter() - start_all
        return CellOutcome.from_exception(cell.cell_id, exc, **partial)
    timings["total_s"] = time.perf_counter() - start_all
    return outcome


def _execute(cell: CellSpec, ctx: CellContext, partial: dict[str, Any]) -> CellOutcome:
    import torch

    from harness.datasets import get_dataset
    from harness.errors import DatasetError, DivergedError
    from harness.evaluate import evaluate_dataset, load_pair_tensors
    from harness.loaders import load_model
    from harness.metrics import MetricSuite, get_metric_spec
    from harness.model import pil_bicubic_upsample

    torch.set_num_threads(ctx.torch_threads)
    timings = partial["timings"]
    cache_root = ctx.cache_root()
    device = _device(cell, ctx)
    environment = environment_record(device)
    partial["environment"] = environment

    start = time.perf_counter()
    model = load_model(cell.model, _inference_settings(cell))
    if device != "cpu":
        model = model.to(device)
    timings["load_model_s"] = time.perf_counter() - start
    environment["model_identity"] = dict(getattr(model, "identity", {}))

    resolved = {}
    for name in cell.datasets:
        dataset = get_dataset(name).resolve()
        actual = dataset.manifest_hash()
        if actual != cell.manifests.get(name):
            raise DatasetError(
                f"dataset {name!r} changed since the run was configured (manifest "
                f"{actual[:12]} vs {str(cell.manifests.get(name))[:12]}); start a new run"
            )
        resolved[name] = dataset

    kinds = {}
    unavailable_extra: dict[str, str] = {}
    for name in cell.metrics:
        kinds[name] = get_metric_spec(name).kind
    names = []
    for name in cell.metrics:
        if kinds[name] == "fp" and not cell.quantizes:
            unavailable_extra[name] = (
                "not applicable: this row is not quantized (it would be compared with itself)"
            )
        elif kinds[name] == "folder":
            unavailable_extra[name] = "folder-level metric: not computed by run-matrix"
        else:
            names.append(name)
    suite = MetricSuite(names, device=device)
    partial["metric_specs"] = suite.records()
    needs_fp = cell.quantizes and any(kinds[n] == "fp" and n in suite.available for n in names)

    # FP references: before quantizing, because quantization modifies the model in place.
    fp_refs: dict[str, FPReferences] = {}
    start = time.perf_counter()
    for name, dataset in resolved.items():
        refs = FPReferences(fp_reference_dir(cache_root, model, cell, name))
        fp_refs[name] = refs
        if not needs_fp:
            continue
        pairs = list(dataset.pairs)[: cell.limit if cell.limit else None]
        for index, pair in enumerate(pairs):
            ctx.report(cell.cell_id, f"{name}: FP reference", index, len(pairs))
            if pair.name in refs:
                continue
            lr, _, _ = load_pair_tensors(pair, dataset.scale)
            refs.put(pair.name, model.super_resolve(lr.to(device)).cpu())
    timings["fp_reference_s"] = time.perf_counter() - start

    qmodel, cache_note, model = _quantized_model(cell, model, ctx, cache_root, timings)
    record = qmodel.record() if hasattr(qmodel, "record") else {}
    record["calibration_cache"] = cache_note
    partial["model_record"] = record
    partial["curves"] = extract_curves(record.get("calibration", {}).get("method", {}))

    keep_n = int(cell.visual.get("images", 0))
    crop_side = int(cell.visual.get("crop", 96))
    crops: list[CropImage] = []
    partial["crops"] = crops
    for name, dataset in resolved.items():
        pairs = list(dataset.pairs)[: cell.limit if cell.limit else None]
        keep = {p.name for p in pairs[:keep_n]}
        tap = _OutputTap(qmodel, keep, store=None if cell.quantizes else fp_refs[name])

        def progress(index: int, total: int, image: str, _name=name, _tap=tap) -> None:
            _tap.current = image
            ctx.report(cell.cell_id, _name, index, total)

        start = time.perf_counter()
        try:
            result = evaluate_dataset(
                tap,
                dataset,
                names,
                limit=cell.limit,
                fp_outputs=fp_refs[name] if needs_fp else None,
                progress=progress,
                suite=suite,
            )
        except DivergedError as exc:
            raise DivergedError(f"dataset {name}: {exc}") from exc
        seconds = time.perf_counter() - start
        ctx.report(cell.cell_id, name, len(result.rows), len(result.rows))
        for row in result.rows:
            partial["rows"].append({"dataset": name, **row})
        unavailable = {**dict(result.unavailable), **unavailable_extra}
        partial["datasets"][name] = {
            "images": len(result.rows),
            "means": dict(result.means),
            "unavailable": unavailable,
            "settings": result.settings,
            "manifest_hash": cell.manifests.get(name),
            "limit": cell.limit,
            "seconds": seconds,
        }
        timings[f"eval_{name}_s"] = seconds
        for pair in pairs[:keep_n]:
            if pair.name not in tap.kept:
                continue
            lr, sr = tap.kept[pair.name]
            _, hr, _ = load_pair_tensors(pair, dataset.scale)
            box = centre_box(int(sr.shape[-1]), int(sr.shape[-2]), crop_side)
            crops.append(CropImage(name, pair.name, "sr", box, png_crop(sr, box)))
            up = pil_bicubic_upsample(lr.cpu(), dataset.scale)
            crops.append(CropImage(name, pair.name, "lr_up", box, png_crop(up, box)))
            if hr is not None:
                crops.append(CropImage(name, pair.name, "hr", box, png_crop(hr, box)))
    for name, values in partial["datasets"].items():
        for metric, value in values["means"].items():
            if not math.isfinite(value):
                raise DivergedError(f"{name}: mean {metric} is {value}")
    return CellOutcome(cell_id=cell.cell_id, status="done", **partial)


__all__ = [
    "CellContext",
    "CellOutcome",
    "CellSpec",
    "CropImage",
    "FPReferences",
    "centre_box",
    "environment_record",
    "execute_cell",
    "extract_curves",
    "png_crop",
]

"""Run-matrix configs: a TOML file validated into typed dataclasses, and its expansion into cells.

A run config is data: it is read with :mod:`tomllib` and nothing in it is ever executed. Every
problem is a :class:`~harness.errors.ConfigError` that names the file and the key (``methods[2].bits``),
with "did you mean" for misspelt keys and names. ``docs/run-matrix.md`` documents every key.

Expansion (issue 7): a *cell* is model × method variant × bits × calibration seed, evaluated on every
listed dataset. Methods that do not quantize (``fp``) get one cell with bits ``"FP"``; methods that
need no calibration get one cell with seed ``None`` (a seed they would not use must not multiply
identical cells).

Cell ids are deterministic: the first 16 hex digits of the SHA-256 of the canonical JSON (sorted keys,
no whitespace) of the *resolved* cell config — model spec, the method's full validated config (with
every default filled in, so a changed default changes the id), bits, scope, seed, calibration,
inference overrides, datasets, metrics, limit, visual-crop settings — plus each dataset's manifest hash
(:meth:`harness.datasets.ResolvedDataset.manifest_hash`). Presentation-only fields (the row label,
``ablation_of``) and resources (``num_cpus``/``num_gpus``) are not part of the id: renaming a row or
moving to a GPU does not invalidate finished results. Deviation to note: the id covers the model
*spec string* (``tiny``, a path, ``osediff:...``), not the weight bytes (hashing multi-GB weights on every
start would cost more than it saves); each cell records the loaded model's identity hash, and the
report flags a run whose cells disagree on it.

The quantized-model cache key (``model_key``) is the calibration-relevant part of the id (everything
but datasets, metrics, limit and visual settings), so evaluating the same calibrated model on more
datasets reuses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from harness.errors import ConfigError, QBenchError

CONFIG_VERSION = 1
"""The run-config format version this module reads (``config_version`` in the file)."""

CELL_SCHEMA_VERSION = 1
"""Version of the resolved cell config that is hashed into cell ids."""

BITS_RE = re.compile(r"^W(\d+)A(\d+)$")
MIN_BITS, MAX_BITS = 2, 8
SCOPES = ("U", "UV")
FP_BITS = "FP"
ID_LENGTH = 16

_TOP_KEYS = {
    "config_version": "format version (int, currently 1)",
    "name": "run name (default output directory runs/<name>)",
    "description": "free text shown in the report",
    "model": "model spec: tiny | bicubic | PATH | osediff:sd=DIR,pkl=FILE",
    "scope": "U or UV (default for every method)",
    "bits": "list of W<b>A<b> strings (default for every quantizing method)",
    "seeds": "list of calibration seeds (default [0])",
    "datasets": "list of dataset names",
    "metrics": "list of metric names",
    "limit": "first N images per dataset (optional)",
    "inference": "table of InferenceSettings overrides",
    "calibration": "table: source, n, lr_crop, teacher_batch_size",
    "resources": "table: num_cpus, num_gpus per cell",
    "visual": "table: images, crop (visual-comparison crops)",
    "methods": "array of [[methods]] tables",
}
_METHOD_KEYS = {
    "name": "registered method or variant name",
    "label": "row label in tables (default: the name)",
    "bits": "list of W<b>A<b> (default: top-level bits)",
    "scope": "U or UV (default: top-level scope)",
    "seeds": "list of calibration seeds (default: top-level seeds)",
    "params": "table of method config fields",
    "calibration": "table overriding top-level calibration keys",
    "ablation_of": "name of the method this entry is an ablation of",
    "model": "model spec overriding the top-level model (e.g. bicubic with fp)",
}
_CALIBRATION_KEYS = {
    "source": "tiny-train | a registered dataset | folder:lr=DIR,hr=DIR | hr:DIR (HR only, LR by bicubic)",
    "n": "number of crops",
    "lr_crop": "LR crop side in pixels",
    "teacher_batch_size": "batch size of the FP teacher pass",
}
_RESOURCE_KEYS = {"num_cpus": "CPUs per cell (float)", "num_gpus": "GPUs per cell (float)"}
_VISUAL_KEYS = {"images": "images per dataset with crops", "crop": "HR crop side in pixels"}
_INFERENCE_KEYS = (
    "timestep",
    "upscale",
    "latent_tile",
    "latent_overlap",
    "vae_encoder_tile",
    "vae_encoder_overlap",
    "vae_decoder_tile",
    "vae_decoder_overlap",
    "color_fix",
    "precision",
    "sample_posterior",
    "seed",
)
"""The fields of :class:`harness.model.InferenceSettings` (checked again by that class at run time)."""

TINY_TRAIN_SOURCE = "tiny-train"
HR_FOLDER_PREFIX = "hr:"


# --------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class Resources:
    """Ray resources requested by every cell."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration crops are drawn (:class:`harness.quant.calibration.CalibrationSettings`)."""

    source: str = TINY_TRAIN_SOURCE
    n: int = 500
    lr_crop: int = 128
    teacher_batch_size: int = 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VisualConfig:
    """Crops kept for the visual comparison: the first ``images`` pairs of each dataset, a centred
    ``crop``×``crop`` HR-pixel window (clipped to the image)."""

    images: int = 2
    crop: int = 96


@dataclass(frozen=True)
class MethodInfo:
    """What the expansion needs to know about a registered method."""

    quantizes: bool
    needs_calibration: bool


@dataclass(frozen=True)
class MethodEntry:
    """One ``[[methods]]`` table after validation.

    ``method_configs`` maps each bits string to the method's fully resolved config dict
    (``MethodConfig.to_dict()``), built by the method catalog so unknown params and bad values are
    caught when the config is loaded, not hours into a run.
    """

    index: int
    name: str
    label: str
    bits: tuple[str, ...]
    scope: str
    seeds: tuple[int | None, ...]
    params: dict[str, Any]
    calibration: CalibrationConfig | None
    ablation_of: str | None
    model: str
    quantizes: bool
    needs_calibration: bool
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """A validated run config (see ``docs/run-matrix.md``)."""

    path: Path | None
    source_sha256: str
    config_version: int
    name: str
    description: str
    model: str
    scope: str
    bits: tuple[str, ...]
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]
    limit: int | None
    inference: dict[str, Any]
    calibration: CalibrationConfig
    resources: Resources
    visual: VisualConfig
    methods: tuple[MethodEntry, ...]

    def with_limit(self, limit: int | None) -> RunConfig:
        """A copy with ``limit`` replaced (the CLI's ``--limit``); None keeps the config's value."""
        if limit is None:
            return self
        _positive_int(limit, "--limit", self.path)
        return dataclasses.replace(self, limit=limit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form stored as ``config.resolved.json``."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path) if self.path else None
        return json_data(data)


class MethodCatalog(Protocol):
    """What the config loader needs from the method registry (injectable for tests)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> MethodInfo: ...

    def resolve_config(self, name: str, bits: str, scope: str, params: dict) -> dict[str, Any]: ...


class RegistryCatalog:
    """:class:`MethodCatalog` backed by :mod:`harness.registry` (imported lazily)."""

    def names(self) -> list[str]:
        from harness.registry import list_methods

        return list_methods()

    def info(self, name: str) -> MethodInfo:
        from harness.registry import get_method

        entry = get_method(name)
        return MethodInfo(
            quantizes=bool(entry.cls.quantizes_model),
            needs_calibration=bool(entry.cls.needs_calibration),
        )

    def resolve_config(self, name: str, bits: str, scope: str, params: dict) -> dict[str, Any]:
        from harness.registry import get_method

        entry = get_method(name)
        return entry.make_config(bits=bits, scope=scope, **params).to_dict()


# --------------------------------------------------------------------------------------------
# validation helpers


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "<run config>"


def _err(path: Path | None, key: str, message: str) -> ConfigError:
    return ConfigError(f"{_where(path)}: {key}: {message}")


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, str], key: str, path) -> None:
    for name in table:
        if name not in allowed:
            close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(allowed))
            where = f"{key}.{name}" if key else name
            raise _err(path, where, f"unknown key.{hint} Known keys here: {known}.")


def _string(value: Any, key: str, path) -> str:
    if not isinstance(value, str):
        raise _err(path, key, f"must be a string, got {_type_name(value)} ({value!r})")
    if not value.strip():
        raise _err(path, key, "must not be empty")
    return value


def _positive_int(value: Any, key: str, path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(path, key, f"must be an integer, got {_type_name(value)} ({value!r})")
    if value < 1:
        raise _err(path, key, f"must be >= 1, got {value}")
    return value


def _non_negative_number(value: Any, key: str, path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(path, key, f"must be a number, got {_type_name(value)} ({value!r})")
    if value < 0:
        raise _err(path, key, f"must be >= 0, got {value}")
    return float(value)


def _table(value: Any, key: str, path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(path, key, f"must be a table, got {_type_name(value)} ({value!r})")
    return value


def _string_list(value: Any, key: str, path, *, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _err(path, key, f"must be a list of strings, got {_type_name(value)} ({value!r})")
    if not value and not allow_empty:
        raise _err(path, key, "must not be empty")
    items = tuple(_string(v, f"{key}[{i}]", path) for i, v in enumerate(value))
    duplicates = sorted({v for v in items if items.count(v) > 1})
    if duplicates:
        raise _err(path, key, f"lists {', '.join(map(repr, duplicates))} more than once")
    return items


def parse_bits(text: str, key: str = "bits", path: Path | None = None) -> str:
    """Validate ``W<b>A<b>`` with 2 ≤ b ≤ 8 (the quantization core's range)."""
    match = BITS_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise _err(path, key, f"expected a bits string like 'W4A4', got {text!r}")
    for part, bits in zip(("weight", "activation"), match.groups(), strict=True):
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise _err(path, key, f"{part} bits must be in [{MIN_BITS}, {MAX_BITS}], got {text!r}")
    return text


def _bits_list(value: Any, key: str, path) -> tuple[str, ...]:
    items = _string_list(value, key, path)
    return tuple(parse_bits(b, f"{key}[{i}]", path) for i, b in enumerate(items))


def _seed_list(value: Any, key: str, path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _err(path, key, f"must be a non-empty list of integers, got {value!r}")
    seeds = []
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise _err(path, f"{key}[{i}]", f"must be a non-negative integer, got {seed!r}")
        seeds.append(seed)
    if len(set(seeds)) != len(seeds):
        raise _err(path, key, "lists a seed more than once")
    return tuple(seeds)


def _scope(value: Any, key: str, path) -> str:
    value = _string(value, key, path)
    if value not in SCOPES:
        raise _err(path, key, f"must be one of {', '.join(SCOPES)}, got {value!r}")
    return value


def _calibration(raw: Any, key: str, path, base: CalibrationConfig) -> CalibrationConfig:
    table = _table(raw, key, path)
    _check_keys(table, _CALIBRATION_KEYS, key, path)
    values = dataclasses.asdict(base)
    for name, value in table.items():
        if name == "source":
            values[name] = _string(value, f"{key}.source", path)
        else:
            values[name] = _positive_int(value, f"{key}.{name}", path)
    return CalibrationConfig(**values)


def _inference(raw: Any, path) -> dict[str, Any]:
    table = _table(raw, "inference", path)
    allowed = {k: "InferenceSettings field" for k in _INFERENCE_KEYS}
    _check_keys(table, allowed, "inference", path)
    for name, value in table.items():
        if name in ("color_fix", "precision"):
            _string(value, f"inference.{name}", path)
        elif name == "sample_posterior":
            if not isinstance(value, bool):
                raise _err(path, f"inference.{name}", f"must be a boolean, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _err(path, f"inference.{name}", f"must be a non-negative integer, got {value!r}")
    if table:
        from harness.model import InferenceSettings  # checks ranges and tile/overlap pairs

        try:
            InferenceSettings.from_dict({**InferenceSettings().to_dict(), **table})
        except QBenchError as exc:
            raise _err(path, "inference", str(exc)) from None
    return dict(table)


def _close_hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _known_names(
    kind: str, names: tuple[str, ...], known: Iterable[str], key: str, path, extra_ok=None
) -> None:
    known = list(known)
    for i, name in enumerate(names):
        if name in known or (extra_ok is not None and extra_ok(name)):
            continue
        raise _err(
            path,
            f"{key}[{i}]",
            f"unknown {kind} {name!r}.{_close_hint(name, known)} Known: {', '.join(sorted(known))}.",
        )


# --------------------------------------------------------------------------------------------
# loading


def load_run_config(
    path: str | Path,
    *,
    methods: MethodCatalog | None = None,
    dataset_names: Iterable[str] | None = None,
    metric_names: Iterable[str] | None = None,
) -> RunConfig:
    """Read and validate a TOML run config.

    ``methods``, ``dataset_names`` and ``metric_names`` default to the real registries
    (:mod:`harness.registry`, ``datasets/*.toml``, :data:`harness.metrics.METRICS`); tests inject
    their own. ``folder:`` dataset specs are accepted as datasets.
    """
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: run config not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run config ({exc})") from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_run_config(
        data,
        path=path,
        source_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        methods=methods,
        dataset_names=dataset_names,
        metric_names=metric_names,
    )


def parse_run_config(
    data: Mapping[str, Any],
    *,
    path: Path | None = None,
    source_sha256: str = "",
    methods: MethodCatalog | None = None,
    dataset_names: Iterable[str] | None = None,
    metric_names: Iterable[str] | None = None,
) -> RunConfig:
    """Validate an already-parsed config mapping (see :func:`load_run_config`)."""
    _check_keys(data, _TOP_KEYS, "", path)
    version = data.get("config_version", CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _err(path, "config_version", f"must be an integer, got {version!r}")
    if version != CONFIG_VERSION:
        raise _err(
            path,
            "config_version",
            f"{version} is not supported (this qbench reads {CONFIG_VERSION})",
        )
    for required in ("model", "datasets", "metrics", "methods"):
        if required not in data:
            raise _err(path, required, f"is required ({_TOP_KEYS[required]})")
    default_name = path.stem if path is not None else "run"
    name = _string(data.get("name", default_name), "name", path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise _err(
            path,
            "name",
            f"must be letters, digits, '.', '_' or '-' (a directory name), got {name!r}",
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(path, "description", f"must be a string, got {_type_name(description)}")
    model = _string(data["model"], "model", path)
    scope = _scope(data.get("scope", "UV"), "scope", path)
    bits = _bits_list(data["bits"], "bits", path) if "bits" in data else ()
    seeds = _seed_list(data.get("seeds", [0]), "seeds", path)
    datasets = _string_list(data["datasets"], "datasets", path)
    metrics = _string_list(data["metrics"], "metrics", path)
    limit = _positive_int(data["limit"], "limit", path) if "limit" in data else None
    inference = _inference(data.get("inference", {}), path)
    calibration = _calibration(
        data.get("calibration", {}), "calibration", path, CalibrationConfig()
    )
    res_table = _table(data.get("resources", {}), "resources", path)
    _check_keys(res_table, _RESOURCE_KEYS, "resources", path)
    resources = Resources(
        num_cpus=_non_negative_number(res_table.get("num_cpus", 1), "resources.num_cpus", path),
        num_gpus=_non_negative_number(res_table.get("num_gpus", 0), "resources.num_gpus", path),
    )
    vis_table = _table(data.get("visual", {}), "visual", path)
    _check_keys(vis_table, _VISUAL_KEYS, "visual", path)
    visual = VisualConfig(
        images=_positive_int(vis_table.get("images", 2), "visual.images", path),
        crop=_positive_int(vis_table.get("crop", 96), "visual.crop", path),
    )

    if dataset_names is None:
        from harness.datasets import list_datasets

        dataset_names = list_datasets()
    known_datasets = list(dataset_names)
    _known_names(
        "dataset", datasets, known_datasets, "datasets", path, lambda n: n.startswith("folder:")
    )
    if metric_names is None:
        from harness.metrics import METRICS

        metric_names = list(METRICS)
    _known_names("metric", metrics, metric_names, "metrics", path)

    raw_methods = data["methods"]
    if not isinstance(raw_methods, list) or not raw_methods:
        raise _err(path, "methods", "must be a non-empty array of [[methods]] tables")
    catalog = methods if methods is not None else RegistryCatalog()
    entries = tuple(
        _method_entry(
            raw, i, path, catalog, model=model, scope=scope, bits=bits, seeds=seeds,
            calibration=calibration,
        )
        for i, raw in enumerate(raw_methods)
    )  # fmt: skip
    labels = [e.label for e in entries]
    for label in labels:
        if labels.count(label) > 1:
            raise _err(
                path, "methods", f"two entries have the label {label!r}; give each a unique label"
            )
    names_and_labels = {e.name for e in entries} | set(labels)
    for entry in entries:
        if entry.ablation_of is not None and entry.ablation_of not in names_and_labels:
            raise _err(
                path,
                f"methods[{entry.index}].ablation_of",
                f"{entry.ablation_of!r} is not a method name or label in this config."
                f"{_close_hint(entry.ablation_of, names_and_labels)}",
            )
        if entry.needs_calibration and entry.calibration is not None:
            source = entry.calibration.source
            key = f"methods[{entry.index}].calibration.source"
            known_source = (
                source == TINY_TRAIN_SOURCE
                or source.startswith(("folder:", HR_FOLDER_PREFIX))
                or source in known_datasets
            )
            if not known_source:
                raise _err(
                    path,
                    key,
                    f"unknown calibration source {source!r}.{_close_hint(source, known_datasets)} "
                    f"Use {TINY_TRAIN_SOURCE!r}, a registered dataset, 'folder:lr=DIR,hr=DIR' or "
                    "'hr:DIR'.",
                )
            if source.startswith(HR_FOLDER_PREFIX) and not source[len(HR_FOLDER_PREFIX) :].strip():
                raise _err(
                    path, key, "'hr:' needs a directory, e.g. 'hr:/data/DIV2K/DIV2K_train_HR'"
                )
            if source in datasets:
                raise _err(
                    path,
                    key,
                    f"{source!r} is also an evaluation dataset; calibrating on the evaluation "
                    "set would leak test data",
                )
    return RunConfig(
        path=path,
        source_sha256=source_sha256,
        config_version=version,
        name=name,
        description=description,
        model=model,
        scope=scope,
        bits=bits,
        seeds=seeds,
        datasets=datasets,
        metrics=metrics,
        limit=limit,
        inference=inference,
        calibration=calibration,
        resources=resources,
        visual=visual,
        methods=entries,
    )


def _method_entry(
    raw: Any,
    index: int,
    path: Path | None,
    catalog: MethodCatalog,
    *,
    model: str,
    scope: str,
    bits: tuple[str, ...],
    seeds: tuple[int, ...],
    calibration: CalibrationConfig,
) -> MethodEntry:
    key = f"methods[{index}]"
    table = _table(raw, key, path)
    _check_keys(table, _METHOD_KEYS, key, path)
    if "name" not in table:
        raise _err(path, f"{key}.name", "is required")
    name = _string(table["name"], f"{key}.name", path)
    try:
        info = catalog.info(name)
    except QBenchError as exc:  # UnknownNameError carries "did you mean"
        raise _err(path, f"{key}.name", str(exc)) from None
    label = _string(table.get("label", name), f"{key}.label", path)
    entry_scope = _scope(table["scope"], f"{key}.scope", path) if "scope" in table else scope
    if info.quantizes:
        if "bits" in table:
            entry_bits = _bits_list(table["bits"], f"{key}.bits", path)
        elif bits:
            entry_bits = bits
        else:
            raise _err(
                path,
                f"{key}.bits",
                f"method {name!r} quantizes: give bits here or at the top level",
            )
    else:
        if "bits" in table:
            raise _err(path, f"{key}.bits", f"method {name!r} does not quantize; remove 'bits'")
        entry_bits = (FP_BITS,)
    if info.needs_calibration:
        entry_seeds: tuple[int | None, ...] = (
            _seed_list(table["seeds"], f"{key}.seeds", path) if "seeds" in table else seeds
        )
        entry_calibration = (
            _calibration(table["calibration"], f"{key}.calibration", path, calibration)
            if "calibration" in table
            else calibration
        )
    else:
        for unused in ("seeds", "calibration"):
            if unused in table:
                raise _err(
                    path, f"{key}.{unused}", f"method {name!r} needs no calibration; remove it"
                )
        entry_seeds, entry_calibration = (None,), None
    params = _table(table.get("params", {}), f"{key}.params", path)
    for reserved in ("method", "bits", "scope"):
        if reserved in params:
            raise _err(
                path,
                f"{key}.params.{reserved}",
                f"set {reserved!r} on the method entry, not in params",
            )
    ablation_of = (
        _string(table["ablation_of"], f"{key}.ablation_of", path)
        if "ablation_of" in table
        else None
    )
    entry_model = _string(table["model"], f"{key}.model", path) if "model" in table else model
    method_configs = {}
    for i, b in enumerate(entry_bits):
        try:
            method_configs[b] = json_data(
                catalog.resolve_config(name, b, entry_scope, dict(params))
            )
        except QBenchError as exc:
            where = f"{key}.params" if params else f"{key}.bits[{i}]"
            raise _err(path, where, str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise _err(path, f"{key}.params", f"{type(exc).__name__}: {exc}") from None
    return MethodEntry(
        index=index,
        name=name,
        label=label,
        bits=entry_bits,
        scope=entry_scope,
        seeds=entry_seeds,
        params=dict(params),
        calibration=entry_calibration,
        ablation_of=ablation_of,
        model=entry_model,
        quantizes=info.quantizes,
        needs_calibration=info.needs_calibration,
        method_configs=method_configs,
    )


# --------------------------------------------------------------------------------------------
# expansion


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the text that is hashed into ids."""
    return json.dumps(json_data(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def short_hash(value: Any, length: int = ID_LENGTH) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]


def json_data(value: Any) -> Any:
    """Tuples → lists, Paths → strings, recursively (JSON has no tuples)."""
    if isinstance(value, dict):
        return {str(k): json_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_data(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def expand_cells(config: RunConfig, manifests: Mapping[str, str]) -> list:
    """Every cell of the matrix, in config order (method, then bits, then seed).

    ``manifests`` maps each dataset name to its manifest hash (see :func:`dataset_manifests`).
    Returns :class:`harness.cells.CellSpec` objects; two entries resolving to the same cell id
    are an error (the same experiment listed twice).
    """
    from harness.cells import CellSpec

    missing = [d for d in config.datasets if d not in manifests]
    if missing:
        raise ConfigError(f"no manifest hash for dataset(s) {', '.join(missing)}")
    cells: list[CellSpec] = []
    seen: dict[str, str] = {}
    for entry in config.methods:
        for bits in entry.bits:
            for seed in entry.seeds:
                calib = entry.calibration.to_dict() if entry.calibration is not None else None
                model_part = {
                    "schema": CELL_SCHEMA_VERSION,
                    "model": entry.model,
                    "method": entry.name,
                    "method_config": entry.method_configs[bits],
                    "bits": bits,
                    "scope": entry.scope,
                    "seed": seed,
                    "calibration": calib,
                    "inference": dict(config.inference),
                }
                eval_part = {
                    "datasets": list(config.datasets),
                    "manifests": {d: manifests[d] for d in config.datasets},
                    "metrics": list(config.metrics),
                    "limit": config.limit,
                    "visual": dataclasses.asdict(config.visual),
                }
                model_key = short_hash(model_part)
                cell_id = short_hash({**model_part, **eval_part})
                where = f"{entry.label} {bits} seed {seed}"
                if cell_id in seen:
                    raise ConfigError(
                        f"{_where(config.path)}: methods: {where} is the same cell as {seen[cell_id]}"
                    )
                seen[cell_id] = where
                cells.append(
                    CellSpec(
                        cell_id=cell_id,
                        model_key=model_key,
                        label=entry.label,
                        method=entry.name,
                        ablation_of=entry.ablation_of,
                        model=entry.model,
                        bits=bits,
                        scope=entry.scope,
                        seed=seed,
                        method_config=entry.method_configs[bits],
                        calibration=calib,
                        inference=dict(config.inference),
                        datasets=tuple(config.datasets),
                        manifests=dict(eval_part["manifests"]),
                        metrics=tuple(config.metrics),
                        limit=config.limit,
                        visual=dataclasses.asdict(config.visual),
                        num_cpus=config.resources.num_cpus,
                        num_gpus=config.resources.num_gpus,
                        quantizes=entry.quantizes,
                    )
                )
    return cells


def dataset_manifests(
    names: Iterable[str], resolver: Callable[[str], Any] | None = None
) -> dict[str, str]:
    """``{dataset name: manifest hash}``, resolving each dataset strictly (a broken dataset is an
    error before any cell runs). ``resolver(name) -> ResolvedDataset`` defaults to
    ``harness.datasets.get_dataset(name).resolve()``."""
    if resolver is None:
        from harness.datasets import get_dataset

        def resolver(name: str):
            return get_dataset(name).resolve()

    return {name: resolver(name).manifest_hash() for name in names}


__all__ = [
    "CONFIG_VERSION",
    "CalibrationConfig",
    "MethodCatalog",
    "MethodEntry",
    "MethodInfo",
    "RegistryCatalog",
    "Resources",
    "RunConfig",
    "VisualConfig",
    "canonical_json",
    "dataset_manifests",
    "expand_cells",
    "load_run_config",
    "parse_bits",
    "parse_run_config",
    "short_hash",
]

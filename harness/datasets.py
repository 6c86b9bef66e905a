"""Dataset registry: definitions in ``datasets/*.toml``, explicit pairing, validation.

A dataset definition is data (TOML read with :mod:`tomllib`; nothing in it can execute code). It
names the dataset, its version, scale, expected pair count, provenance, where to look for its root
directory, one or more *layouts* (which directories hold LR and HR images and how their file names
pair) and the HR policy. ``docs/datasets.md`` documents the format and every shipped definition.

Rules this module enforces (never silently):

- **Pairing** is by an explicit rule per layout, never by sort order: ``exact-stem`` (LR and HR
  share the file stem) or ``template`` (``lr_template``/``hr_template`` such as ``"{stem}x4"``
  map a pair name to each file stem). Unpaired files on either side, files that do not match the
  naming rule, non-image files, duplicate stems and sub-directories in an image directory are all
  reported as problems.
- **HR policy** when HR is not ``scale`` x LR: ``"crop"`` crops HR from the top-left to exactly
  ``scale`` x LR (a modcrop) *only* when the excess is smaller than ``scale`` pixels in each
  dimension; the crop is recorded per pair in :attr:`ImagePair.hr_crop`. Any other mismatch (HR too
  small, or an excess of ``scale`` px or more) is a problem. ``"error"``: any mismatch is a problem.
- **Checksums**: sha256 values listed in the definition and/or a manifest file inside the root
  (``sha256sum`` format). Manifest entries with ``..`` or absolute paths are rejected.
- :func:`validate_dataset` decodes every image and collects *every* problem before reporting.

Root precedence: the ``root`` argument, else each entry of ``root_candidates`` under each of
:func:`harness.paths.data_roots` (``$QBENCH_DATA`` then ``../shared/data``), else for the embedded
sets a path relative to the repository (``repo_root``). The first root in which a layout's
directories exist wins; layouts are tried in definition order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from harness import paths
from harness.errors import ConfigError, DatasetError, ImageError, UnknownNameError
from harness.images import LoadedImage, image_size, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HR_POLICIES = ("crop", "error")
PAIRING_RULES = ("exact-stem", "template")
SYNTH_RECORD_FILE = "degradation_record.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

_TOP_KEYS = {
    "name",
    "version",
    "description",
    "scale",
    "expected_count",
    "source",
    "citation",
    "licence",
    "root_candidates",
    "repo_root",
    "hr_policy",
    "layouts",
    "synthesize",
    "notes",
}
_REQUIRED_TOP_KEYS = {
    "name",
    "version",
    "description",
    "scale",
    "source",
    "citation",
    "licence",
    "hr_policy",
    "layouts",
}
_LAYOUT_KEYS = {
    "name",
    "description",
    "lr_dir",
    "hr_dir",
    "pairing",
    "lr_template",
    "hr_template",
    "checksum_file",
    "sha256",
    "expected_count",
}
_SYNTH_KEYS = {
    "source_dataset",
    "source_layout",
    "preset",
    "seed",
    "crop_size",
    "crops_per_image",
    "description",
}


# ----------------------------------------------------------------------------------------------
# definitions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where LR/HR images live under a root and how their names pair.

    ``lr_dirs``/``hr_dirs`` are parallel tuples of directories relative to the root (several
    entries for sets split into groups, e.g. RealSR's ``Canon/Test/4`` and ``Nikon/Test/4``);
    ``hr_dirs`` is empty for an LR-only set. ``lr_template``/``hr_template`` contain ``{stem}``
    once: the pair name. ``sha256`` maps paths relative to the root to their expected sha256.
    """

    name: str
    lr_dirs: tuple[str, ...]
    hr_dirs: tuple[str, ...] = ()
    pairing: str = "exact-stem"
    lr_template: str = "{stem}"
    hr_template: str = "{stem}"
    checksum_file: str | None = None
    sha256: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    expected_count: int | None = None
    description: str = ""

    @property
    def has_hr(self) -> bool:
        return bool(self.hr_dirs)

    def describe(self) -> str:
        """One line such as ``<root>/HR/{stem}.<ext> + <root>/LR_bicubic/X4/{stem}x4.<ext>``."""
        lr = " | ".join(f"<root>/{d}/{self.lr_template}.<ext>" for d in self.lr_dirs)
        if not self.has_hr:
            return f"{lr} (LR only)"
        hr = " | ".join(f"<root>/{d}/{self.hr_template}.<ext>" for d in self.hr_dirs)
        return f"HR {hr}  +  LR {lr}  ({self.pairing})"


@dataclass(frozen=True)
class SynthesisSpec:
    """How to synthesize a degraded crop set from another dataset's HR images."""

    source_dataset: str
    source_layout: str | None
    preset: str
    seed: int
    crop_size: int
    crops_per_image: int
    description: str = ""

    def settings(self, scale: int) -> dict[str, Any]:
        from harness.degradation import DEGRADATION_VERSION, get_preset

        return {
            "source_dataset": self.source_dataset,
            "preset": get_preset(self.preset).to_dict(),
            "seed": self.seed,
            "crop_size": self.crop_size,
            "crops_per_image": self.crops_per_image,
            "scale": scale,
            "degradation_version": DEGRADATION_VERSION,
            "crop_rule": "uniform random top-left per (image, crop index), seed derive_seed",
        }


@dataclass(frozen=True)
class ImagePair:
    """One LR image and its HR (None for LR-only sets).

    ``hr_crop`` is ``None`` when HR is exactly ``scale`` x LR, else the PIL-style box
    ``(left, top, right, bottom)`` that the ``crop`` policy applies to HR.
    """

    name: str
    lr_path: Path
    hr_path: Path | None
    hr_crop: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class DatasetDef:
    """A parsed dataset definition (see ``docs/datasets.md`` for every field)."""

    name: str
    version: str
    description: str
    scale: int
    source: str
    citation: str
    licence: str
    hr_policy: str
    layouts: tuple[Layout, ...]
    expected_count: int | None = None
    root_candidates: tuple[str, ...] = ()
    repo_root: str | None = None
    synthesize: SynthesisSpec | None = None
    notes: str = ""
    definition_path: Path | None = None
    fixed_root: Path | None = None  # folder pseudo-datasets only

    # -- locating -------------------------------------------------------------------------------

    def candidate_roots(self, root: str | Path | None = None) -> list[Path]:
        """Directories searched for this dataset, in precedence order."""
        if root is not None:
            return [Path(root).expanduser()]
        if self.fixed_root is not None:
            return [self.fixed_root]
        found: list[Path] = []
        if self.repo_root is not None:
            found.append(paths.repo_root() / self.repo_root)
        for data_root in paths.data_roots():
            found.extend(data_root / candidate for candidate in self.root_candidates)
        return found

    def _layouts(self, layout: str | None) -> tuple[Layout, ...]:
        if layout is None:
            return self.layouts
        chosen = tuple(item for item in self.layouts if item.name == layout)
        if not chosen:
            raise UnknownNameError(
                f"layout of dataset {self.name!r}", layout, [x.name for x in self.layouts]
            )
        return chosen

    def find_root(
        self, root: str | Path | None = None, *, layout: str | None = None, hr_only: bool = False
    ) -> tuple[Path, Layout] | None:
        """The first candidate root in which a layout's directories exist, or None.

        ``hr_only=True`` requires only the HR directories (used to find synthesis sources).
        """
        for candidate in self.candidate_roots(root):
            if not candidate.is_dir():
                continue
            for item in self._layouts(layout):
                if hr_only and not item.has_hr:
                    continue
                dirs = item.hr_dirs if hr_only else item.lr_dirs + item.hr_dirs
                if all((candidate / d).is_dir() for d in dirs):
                    return candidate, item
        return None

    def layout_help(self) -> str:
        """Multi-line description of the accepted layouts (for error messages)."""
        lines = [f"  - layout {item.name!r}: {item.describe()}" for item in self.layouts]
        if self.synthesize is not None:
            lines.append(
                f"  - or, when none is found, synthesized from the HR images of dataset "
                f"{self.synthesize.source_dataset!r} into "
                f"{paths.cache_dir() / f'{self.name}-{self.synthesize.seed}'}"
            )
        return "\n".join(lines)

    def _not_found(self, root: str | Path | None) -> DatasetError:
        looked: list[str] = []
        for candidate in self.candidate_roots(root):
            if not candidate.exists():
                looked.append(f"  - {candidate} (does not exist)")
            elif not candidate.is_dir():
                looked.append(f"  - {candidate} (not a directory)")
            else:
                entries = sorted(p.name + ("/" if p.is_dir() else "") for p in candidate.iterdir())
                shown = ", ".join(entries[:12]) + (" ..." if len(entries) > 12 else "")
                looked.append(f"  - {candidate} (exists but matches no layout; contains: {shown})")
        if not looked:
            looked.append("  - (no candidate directories: set QBENCH_DATA or pass --root DIR)")
        if self.root_candidates:
            hint = (
                "Pass --root DIR, or put the data under a QBENCH_DATA directory as "
                f"{' or '.join(self.root_candidates)}."
            )
        else:
            hint = "Pass --root DIR."
        if self.repo_root is not None:
            hint += (
                f" This set ships in the repository at {self.repo_root}/ and is missing from "
                "this checkout."
            )
        if self.synthesize is not None:
            registry = self.definition_path.parent if self.definition_path else None
            source = get_dataset(self.synthesize.source_dataset, registry)
            places = ", ".join(str(p) for p in source.candidate_roots(root)) or "(none)"
            hint += (
                f"\nSynthesis needs the HR images of {source.name!r} "
                f"({' or '.join(x.describe() for x in source.layouts)}); looked in: {places}."
            )
        return DatasetError(
            f"dataset {self.name!r}: no root directory found.\nExpected layout:\n"
            f"{self.layout_help()}\nLooked in:\n" + "\n".join(looked) + f"\n{hint}"
        )

    # -- resolving ------------------------------------------------------------------------------

    def resolve(
        self,
        root: str | Path | None = None,
        *,
        strict: bool = True,
        layout: str | None = None,
        synthesize: bool = True,
    ) -> ResolvedDataset:
        """Find the root, pair every file and check sizes from the image headers.

        With ``strict=True`` (the default, for evaluation) any problem raises one
        :class:`DatasetError` listing them all. With ``strict=False`` the problems are kept in
        :attr:`ResolvedDataset.problems` for :func:`validate_dataset` to report with the rest.
        For a definition with ``[synthesize]``, a missing released layout falls back to the cached
        (or, when ``synthesize=True``, newly built) degraded set.
        """
        located = self.find_root(root, layout=layout)
        provenance: dict[str, Any] = {}
        if located is None and self.synthesize is not None:
            located, provenance = _locate_synthesized(self, root, synthesize=synthesize)
        if located is None:
            raise self._not_found(root)
        found_root, found_layout = located
        resolved = _pair_files(self, found_root, found_layout, provenance)
        if strict:
            resolved.raise_if_problems()
        return resolved


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset bound to a root directory: its pairs, known checksums and any problems found."""

    definition: DatasetDef
    root: Path
    layout: Layout
    pairs: list[ImagePair]
    problems: tuple[str, ...] = ()
    checksums: dict[str, str] = field(default_factory=dict)
    unreadable: frozenset[str] = frozenset()
    expected_count: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def scale(self) -> int:
        return self.definition.scale

    def relpath(self, path: Path) -> str:
        """``path`` relative to the root (POSIX), or absolute when outside it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def files(self) -> list[Path]:
        """Every image file of every pair (LR, then HR)."""
        out: list[Path] = []
        for pair in self.pairs:
            out.append(pair.lr_path)
            if pair.hr_path is not None:
                out.append(pair.hr_path)
        return out

    def manifest_hash(self) -> str:
        """sha256 over the definition identity, sorted pair names, file sizes and known checksums.

        Used in result cell ids: it changes when a file is added, removed, renamed or resized, or
        when a known checksum changes.
        """
        entries = []
        for pair in sorted(self.pairs, key=lambda p: p.name):
            row: list[Any] = [pair.name]
            for file in (pair.lr_path, pair.hr_path):
                if file is None:
                    row.append(None)
                    continue
                rel = self.relpath(file)
                size = file.stat().st_size if file.exists() else -1
                row.append([rel, size, self.checksums.get(rel)])
            row.append(list(pair.hr_crop) if pair.hr_crop else None)
            entries.append(row)
        payload = {
            "dataset": self.definition.name,
            "version": self.definition.version,
            "layout": self.layout.name,
            "scale": self.definition.scale,
            "hr_policy": self.definition.hr_policy,
            "pairs": entries,
        }
        if self.provenance.get("synthesized"):
            payload["synthesis"] = {
                k: self.provenance[k] for k in ("preset", "seed", "crop_size", "crops_per_image")
            }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of this dataset, for storing with results."""
        return {
            "name": self.definition.name,
            "version": self.definition.version,
            "layout": self.layout.name,
            "root": str(self.root),
            "scale": self.definition.scale,
            "hr_policy": self.definition.hr_policy,
            "pairs": len(self.pairs),
            "manifest_hash": self.manifest_hash(),
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DatasetError(_problem_text(self, self.problems))


def _problem_text(resolved: ResolvedDataset, problems: tuple[str, ...] | list[str]) -> str:
    header = (
        f"dataset {resolved.definition.name!r} at {resolved.root} (layout "
        f"{resolved.layout.name!r}) has {len(problems)} problem(s):"
    )
    return header + "\n" + "\n".join(f"  - {p}" for p in problems)


# ----------------------------------------------------------------------------------------------
# parsing definitions
# ----------------------------------------------------------------------------------------------


def _check_relative(value: str, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {what} must be a non-empty string")
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", value):
        raise ConfigError(f"{where}: {what} {value!r} must be a relative path without '..'")
    return pure.as_posix()


def _check_template(template: str, where: str) -> str:
    if not isinstance(template, str) or template.count("{stem}") != 1:
        raise ConfigError(f"{where}: template {template!r} must contain '{{stem}}' exactly once")
    rest = template.replace("{stem}", "")
    if "{" in rest or "}" in rest or "/" in rest or "\\" in rest:
        raise ConfigError(f"{where}: template {template!r} may only contain '{{stem}}' and text")
    return template


def _as_dirs(value: Any, what: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: {what} must be a string or a non-empty list of strings")
    return tuple(_check_relative(v, what, where) for v in items)


def _positive_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def _parse_layout(raw: Any, where: str) -> Layout:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each [[layouts]] entry must be a table")
    unknown = set(raw) - _LAYOUT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown layout key(s) {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: every layout needs a 'name'")
    where = f"{where} layout {name!r}"
    if "lr_dir" not in raw:
        raise ConfigError(f"{where}: 'lr_dir' is required")
    lr_dirs = _as_dirs(raw["lr_dir"], "lr_dir", where)
    hr_dirs = _as_dirs(raw["hr_dir"], "hr_dir", where) if "hr_dir" in raw else ()
    if hr_dirs and len(hr_dirs) != len(lr_dirs):
        raise ConfigError(f"{where}: hr_dir and lr_dir must list the same number of directories")
    pairing = raw.get("pairing", "exact-stem")
    if pairing not in PAIRING_RULES:
        raise ConfigError(f"{where}: pairing must be one of {PAIRING_RULES}, got {pairing!r}")
    lr_template = _check_template(raw.get("lr_template", "{stem}"), where)
    hr_template = _check_template(raw.get("hr_template", "{stem}"), where)
    if pairing == "exact-stem" and (lr_template != "{stem}" or hr_template != "{stem}"):
        raise ConfigError(f"{where}: pairing 'exact-stem' takes no templates; use 'template'")
    if pairing == "template" and lr_template == hr_template == "{stem}":
        raise ConfigError(f"{where}: pairing 'template' needs lr_template and/or hr_template")
    shared = set(lr_dirs) & set(hr_dirs)
    if shared and (lr_template == hr_template or "{stem}" in (lr_template, hr_template)):
        raise ConfigError(
            f"{where}: LR and HR share directory {sorted(shared)}; they need two distinct "
            "templates, neither of them the bare '{stem}'"
        )
    sha_raw = raw.get("sha256", {})
    if not isinstance(sha_raw, dict):
        raise ConfigError(f'{where}: sha256 must be a table of path = "hex"')
    sums: list[tuple[str, str]] = []
    for rel, digest in sha_raw.items():
        rel = _check_relative(rel, "sha256 entry", where)
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise ConfigError(f"{where}: sha256 of {rel!r} must be 64 hex digits")
        sums.append((rel, digest.lower()))
    checksum_file = raw.get("checksum_file")
    if checksum_file is not None:
        checksum_file = _check_relative(checksum_file, "checksum_file", where)
    expected = raw.get("expected_count")
    if expected is not None:
        expected = _positive_int(expected, "expected_count", where)
    description = raw.get("description", "")
    return Layout(
        name=name,
        lr_dirs=lr_dirs,
        hr_dirs=hr_dirs,
        pairing=pairing,
        lr_template=lr_template,
        hr_template=hr_template,
        checksum_file=checksum_file,
        sha256=tuple(sorted(sums)),
        expected_count=expected,
        description=description if isinstance(description, str) else "",
    )


def _parse_synthesize(raw: Any, where: str) -> SynthesisSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [synthesize] must be a table")
    unknown = set(raw) - _SYNTH_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown [synthesize] key(s) {sorted(unknown)}")
    for key in ("source_dataset", "preset", "seed", "crop_size", "crops_per_image"):
        if key not in raw:
            raise ConfigError(f"{where}: [synthesize] needs {key!r}")
    from harness.degradation import PRESETS

    if raw["preset"] not in PRESETS:
        raise ConfigError(f"{where}: unknown degradation preset {raw['preset']!r}")
    seed = raw["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: [synthesize] seed must be a non-negative integer")
    return SynthesisSpec(
        source_dataset=str(raw["source_dataset"]),
        source_layout=raw.get("source_layout"),
        preset=str(raw["preset"]),
        seed=seed,
        crop_size=_positive_int(raw["crop_size"], "crop_size", where),
        crops_per_image=_positive_int(raw["crops_per_image"], "crops_per_image", where),
        description=str(raw.get("description", "")),
    )


def parse_definition(raw: dict[str, Any], path: Path | None = None) -> DatasetDef:
    """Validate a definition table and build a :class:`DatasetDef` (ConfigError naming the file)."""
    where = str(path) if path is not None else "dataset definition"
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})"
        )
    missing = _REQUIRED_TOP_KEYS - set(raw)
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {sorted(missing)}")
    for key in ("name", "version", "description", "source", "citation", "licence"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    name = raw["name"]
    if path is not None and path.stem != name:
        raise ConfigError(f"{where}: name {name!r} must equal the file name {path.stem!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ConfigError(
            f"{where}: name {name!r} must be lower-case letters, digits, '.', '-', '_'"
        )
    scale = _positive_int(raw["scale"], "scale", where)
    if raw["hr_policy"] not in HR_POLICIES:
        raise ConfigError(
            f"{where}: hr_policy must be one of {HR_POLICIES}, got {raw['hr_policy']!r}"
        )
    expected = raw.get("expected_count")
    if expected is not None:
        expected = _positive_int(expected, "expected_count", where)
    layouts_raw = raw["layouts"]
    if not isinstance(layouts_raw, list) or not layouts_raw:
        raise ConfigError(f"{where}: at least one [[layouts]] entry is required")
    layouts = tuple(_parse_layout(item, where) for item in layouts_raw)
    names = [item.name for item in layouts]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: layout names must be unique, got {names}")
    candidates_raw = raw.get("root_candidates", [])
    if not isinstance(candidates_raw, list):
        raise ConfigError(f"{where}: root_candidates must be a list of directory names")
    candidates = tuple(_check_relative(c, "root candidate", where) for c in candidates_raw)
    repo_root = raw.get("repo_root")
    if repo_root is not None:
        repo_root = _check_relative(repo_root, "repo_root", where)
    synthesize = _parse_synthesize(raw["synthesize"], where) if "synthesize" in raw else None
    if not candidates and repo_root is None:
        raise ConfigError(f"{where}: give root_candidates or repo_root")
    notes = raw.get("notes", "")
    return DatasetDef(
        name=name,
        version=raw["version"],
        description=raw["description"].strip(),
        scale=scale,
        source=raw["source"].strip(),
        citation=raw["citation"].strip(),
        licence=raw["licence"].strip(),
        hr_policy=raw["hr_policy"],
        layouts=layouts,
        expected_count=expected,
        root_candidates=candidates,
        repo_root=repo_root,
        synthesize=synthesize,
        notes=notes.strip() if isinstance(notes, str) else "",
        definition_path=path,
    )


def load_definition(path: str | Path) -> DatasetDef:
    """Read and validate one ``.toml`` definition file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read dataset definition ({exc})") from exc
    return parse_definition(raw, path)


def load_definitions(directory: str | Path | None = None) -> dict[str, DatasetDef]:
    """All definitions in ``directory`` (default ``datasets/``), keyed by name."""
    directory = Path(directory) if directory is not None else paths.datasets_dir()
    definitions: dict[str, DatasetDef] = {}
    for file in sorted(directory.glob("*.toml")):
        definition = load_definition(file)
        definitions[definition.name] = definition
    return definitions


def list_datasets(directory: str | Path | None = None) -> list[str]:
    """Sorted names of the registered datasets (``folder:...`` specs are not listed)."""
    return sorted(load_definitions(directory))


def parse_folder_spec(spec: str) -> DatasetDef:
    """``folder:lr=PATH[,hr=PATH][,scale=N][,hr_policy=crop|error]`` -> a pseudo-definition.

    LR and HR pair by exact stem. Without ``hr`` the set is LR-only (for no-reference metrics).
    ``scale`` defaults to 4. Paths may not contain commas.
    """
    body = spec[len("folder:") :]
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ConfigError(f"folder spec {spec!r}: expected key=value, got {part!r}")
        if key not in ("lr", "hr", "scale", "hr_policy"):
            raise ConfigError(
                f"folder spec {spec!r}: unknown key {key!r} (lr, hr, scale, hr_policy)"
            )
        options[key] = value
    if "lr" not in options:
        raise ConfigError(f"folder spec {spec!r}: 'lr=PATH' is required, e.g. folder:lr=out/sr")
    try:
        scale = int(options.get("scale", "4"))
    except ValueError:
        raise ConfigError(f"folder spec {spec!r}: scale must be an integer") from None
    if scale < 1:
        raise ConfigError(f"folder spec {spec!r}: scale must be >= 1")
    policy = options.get("hr_policy", "crop")
    if policy not in HR_POLICIES:
        raise ConfigError(f"folder spec {spec!r}: hr_policy must be one of {HR_POLICIES}")
    lr = Path(options["lr"]).expanduser().resolve()
    hr = Path(options["hr"]).expanduser().resolve() if "hr" in options else None
    base = Path(os.path.commonpath([lr, hr])) if hr is not None else lr.parent
    lr_rel = lr.relative_to(base).as_posix() or "."
    hr_rel = (hr.relative_to(base).as_posix() or ".") if hr is not None else None
    layout = Layout(
        name="folder",
        lr_dirs=(lr_rel,),
        hr_dirs=(hr_rel,) if hr_rel is not None else (),
        pairing="exact-stem",
        description="user folders paired by exact stem",
    )
    canonical = f"folder:lr={lr}" + (f",hr={hr}" if hr is not None else "") + f",scale={scale}"
    return DatasetDef(
        name=canonical,
        version="1",
        description="user-supplied folder" + (" pair" if hr is not None else " (LR only)"),
        scale=scale,
        source="user",
        citation="-",
        licence="unknown",
        hr_policy=policy,
        layouts=(layout,),
        fixed_root=base,
    )


def get_dataset(name_or_spec: str, directory: str | Path | None = None) -> DatasetDef:
    """A registered definition by name, or a ``folder:`` spec; UnknownNameError otherwise."""
    if name_or_spec.startswith("folder:"):
        return parse_folder_spec(name_or_spec)
    definitions = load_definitions(directory)
    if name_or_spec not in definitions:
        known = sorted(definitions) + ["folder:lr=PATH[,hr=PATH]"]
        raise UnknownNameError("dataset", name_or_spec, known)
    return definitions[name_or_spec]


# ----------------------------------------------------------------------------------------------
# pairing
# ----------------------------------------------------------------------------------------------


def _template_regex(template: str) -> re.Pattern[str]:
    before, after = template.split("{stem}")
    return re.compile(re.escape(before) + r"(?P<stem>.+)" + re.escape(after))


def _read_manifest(root: Path, rel: str, problems: list[str]) -> dict[str, str]:
    """Parse a ``sha256sum``-format manifest; malformed or unsafe lines become problems."""
    sums: dict[str, str] = {}
    text = (root / rel).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line.rstrip("\r\n"))
        if match is None:
            problems.append(f"{rel}:{number}: not a 'sha256  path' line: {line[:80]!r}")
            continue
        entry = match.group(2).strip()
        pure = PurePosixPath(entry.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", entry):
            problems.append(f"{rel}:{number}: rejected entry {entry!r} (absolute path or '..')")
            continue
        sums[pure.as_posix()] = match.group(1).lower()
    return sums


def _scan_side(
    root: Path,
    dirs: tuple[str, ...],
    template: str,
    side: str,
    other_template: str | None,
    report_unmatched: bool,
    skip: set[Path],
    problems: list[str],
    rel: Callable[[Path], str],
) -> dict[str, Path]:
    """Map pair name -> file for one side (LR or HR); everything unexpected becomes a problem.

    ``other_template`` is set when LR and HR share a directory: files matching it belong to the
    other side. ``report_unmatched`` is False for the second scan of a shared directory, so each
    stray file is reported once.
    """
    regex = _template_regex(template)
    other = _template_regex(other_template) if other_template is not None else None
    found: dict[str, Path] = {}
    duplicates: dict[str, list[Path]] = {}
    for directory in dirs:
        try:
            entries = sorted((root / directory).iterdir())
        except OSError as exc:
            problems.append(f"{directory}/: cannot list the {side} directory ({exc})")
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.resolve() in skip:
                continue
            if entry.is_dir():
                if report_unmatched:
                    problems.append(
                        f"{rel(entry)}/: unexpected sub-directory in an image directory"
                    )
                continue
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                if report_unmatched:
                    problems.append(
                        f"{rel(entry)}: extra file (not an image: extension "
                        f"{entry.suffix or '(none)'!r})"
                    )
                continue
            match = regex.fullmatch(entry.stem)
            if match is None:
                if other is not None and other.fullmatch(entry.stem):
                    continue  # the other side's file in a shared directory
                if report_unmatched:
                    naming = (
                        f"'{template}'" if other is None else f"'{template}' or '{other_template}'"
                    )
                    problems.append(
                        f"{rel(entry)}: extra file (name does not match the naming rule {naming})"
                    )
                continue
            name = match.group("stem")
            if name in found:
                duplicates.setdefault(name, [found[name]]).append(entry)
            else:
                found[name] = entry
    for name, files in duplicates.items():
        listed = ", ".join(rel(f) for f in files)
        problems.append(f"{side} pair name {name!r} is ambiguous: {listed}")
        found.pop(name, None)
    return found


def _pair_files(
    definition: DatasetDef, root: Path, layout: Layout, provenance: dict[str, Any]
) -> ResolvedDataset:
    problems: list[str] = []

    def rel(path: Path) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return str(path)

    # checksums: from the definition (or a synthesis record), then the manifest file
    checksums: dict[str, str] = dict(layout.sha256)
    checksums.update(provenance.pop("checksums", {}))
    skip: set[Path] = {(root / SYNTH_RECORD_FILE).resolve()}
    if layout.checksum_file is not None:
        manifest = root / layout.checksum_file
        skip.add(manifest.resolve())
        try:
            manifest_sums = (
                _read_manifest(root, layout.checksum_file, problems) if manifest.is_file() else {}
            )
        except OSError as exc:
            problems.append(f"{layout.checksum_file}: cannot read the checksum manifest ({exc})")
            manifest_sums = {}
        if manifest_sums:
            for path, digest in manifest_sums.items():
                if path in checksums and checksums[path] != digest:
                    problems.append(
                        f"{path}: checksum in {layout.checksum_file} ({digest[:12]}...) differs "
                        f"from the one in the definition ({checksums[path][:12]}...)"
                    )
                checksums[path] = digest

    shared = bool(set(layout.lr_dirs) & set(layout.hr_dirs))
    lr_files = _scan_side(
        root,
        layout.lr_dirs,
        layout.lr_template,
        "LR",
        layout.hr_template if shared else None,
        True,
        skip,
        problems,
        rel,
    )
    hr_files: dict[str, Path] = {}
    if layout.has_hr:
        hr_files = _scan_side(
            root,
            layout.hr_dirs,
            layout.hr_template,
            "HR",
            layout.lr_template if shared else None,
            not shared,
            skip,
            problems,
            rel,
        )
        hr_dir_hint = layout.hr_dirs[0]
        lr_dir_hint = layout.lr_dirs[0]
        for name in sorted(set(lr_files) - set(hr_files)):
            expected = f"{hr_dir_hint}/{layout.hr_template.replace('{stem}', name)}.<ext>"
            problems.append(f"{rel(lr_files[name])}: unpaired LR file (no HR {expected})")
        for name in sorted(set(hr_files) - set(lr_files)):
            expected = f"{lr_dir_hint}/{layout.lr_template.replace('{stem}', name)}.<ext>"
            problems.append(f"{rel(hr_files[name])}: unpaired HR file (no LR {expected})")

    names = sorted(set(lr_files) & set(hr_files)) if layout.has_hr else sorted(lr_files)
    pairs: list[ImagePair] = []
    unreadable: set[str] = set()
    scale = definition.scale
    for name in names:
        lr_path = lr_files[name]
        hr_path = hr_files.get(name)
        sizes: dict[str, tuple[int, int]] = {}
        for path in (lr_path, hr_path):
            if path is None:
                continue
            try:
                sizes[str(path)] = image_size(path)
            except ImageError as exc:
                unreadable.add(rel(path))
                problems.append(f"{rel(path)}: {_strip_path(str(exc), path)}")
        crop = None
        if hr_path is not None and str(lr_path) in sizes and str(hr_path) in sizes:
            crop, problem = _hr_crop(
                sizes[str(lr_path)], sizes[str(hr_path)], scale, definition.hr_policy
            )
            if problem:
                problems.append(f"{rel(hr_path)}: {problem} (LR {rel(lr_path)})")
        pairs.append(ImagePair(name=name, lr_path=lr_path, hr_path=hr_path, hr_crop=crop))

    expected_count = layout.expected_count or definition.expected_count
    if provenance.get("expected_count"):
        expected_count = provenance["expected_count"]
    if not pairs:
        problems.append(
            "no image pairs found" if layout.has_hr else "no images found in the LR directory"
        )
    if expected_count is not None and len(pairs) != expected_count:
        problems.append(
            f"found {len(pairs)} {'pairs' if layout.has_hr else 'images'}, expected "
            f"{expected_count}"
        )
    return ResolvedDataset(
        definition=definition,
        root=root,
        layout=layout,
        pairs=pairs,
        problems=tuple(problems),
        checksums=checksums,
        unreadable=frozenset(unreadable),
        expected_count=expected_count,
        provenance=provenance,
    )


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _hr_crop(
    lr_size: tuple[int, int], hr_size: tuple[int, int], scale: int, policy: str
) -> tuple[tuple[int, int, int, int] | None, str | None]:
    """Apply the HR policy to header sizes ``(width, height)``: ``(crop box or None, problem)``."""
    lw, lh = lr_size
    hw, hh = hr_size
    tw, th = lw * scale, lh * scale
    if (hw, hh) == (tw, th):
        return None, None
    mismatch = f"HR {hw}x{hh} is not {scale}x LR {lw}x{lh} (expected {tw}x{th})"
    if policy == "crop" and 0 <= hw - tw < scale and 0 <= hh - th < scale:
        return (0, 0, tw, th), None
    if policy == "crop":
        return None, (
            f"{mismatch}; the crop policy only removes an excess of fewer than {scale} px per "
            "dimension"
        )
    return None, f"{mismatch}; hr_policy is 'error'"


def load_pair(pair: ImagePair, scale: int | None = None) -> tuple[LoadedImage, LoadedImage | None]:
    """Decode a pair, applying the recorded HR crop (added to the HR's conversions).

    With ``scale`` given, a decoded HR that is not exactly ``scale`` x LR after the crop raises
    :class:`DatasetError` (the header check in ``resolve`` should already have caught it).
    """
    lr = load_image(pair.lr_path)
    if pair.hr_path is None:
        return lr, None
    hr = load_image(pair.hr_path)
    if pair.hr_crop is not None:
        left, top, right, bottom = pair.hr_crop
        note = (
            f"HR cropped to {right - left}x{bottom - top} from the top-left (hr_policy crop; "
            f"file is {hr.width}x{hr.height})"
        )
        hr = replace(
            hr,
            array=np.ascontiguousarray(hr.array[top:bottom, left:right]),
            conversions=hr.conversions + (note,),
        )
    if scale is not None and (hr.width, hr.height) != (lr.width * scale, lr.height * scale):
        raise DatasetError(
            f"{pair.hr_path}: HR {hr.width}x{hr.height} is not {scale}x LR "
            f"{lr.width}x{lr.height} ({pair.lr_path})"
        )
    return lr, hr


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    """Everything :func:`validate_dataset` found. ``ok`` is True when there are no problems."""

    dataset: str
    version: str
    root: Path
    layout: str
    scale: int
    hr_policy: str
    pairs: int
    expected_count: int | None
    problems: tuple[str, ...]
    conversions: tuple[tuple[str, str], ...]  # (file relative to root, conversion)
    crops: tuple[tuple[str, tuple[int, int, int, int]], ...]  # (pair name, HR crop box)
    decoded: bool
    checksums_listed: int
    checksums_verified: int
    files_without_checksum: int
    manifest_hash: str

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DatasetError(
                f"dataset {self.dataset!r} at {self.root} (layout {self.layout!r}) has "
                f"{len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_dataset(
    resolved: ResolvedDataset,
    *,
    decode: bool = True,
    check_checksums: bool = True,
    raise_on_problems: bool = False,
) -> ValidationReport:
    """Decode every image, check pairing, scale and checksums; collect every problem.

    Returns a :class:`ValidationReport`; with ``raise_on_problems=True`` a report with problems
    raises one :class:`DatasetError` listing all of them instead.
    """
    problems = list(resolved.problems)
    conversions: list[tuple[str, str]] = []
    crops: list[tuple[str, tuple[int, int, int, int]]] = []
    scale = resolved.definition.scale
    for pair in resolved.pairs:
        if pair.hr_crop is not None:
            crops.append((pair.name, pair.hr_crop))
        if not decode:
            continue
        # Sizes were checked against the scale and HR policy from the headers in resolve();
        # the decoders (Pillow, OpenCV) refuse data that disagrees with the header.
        for path in (pair.lr_path, pair.hr_path):
            if path is None:
                continue
            rel = resolved.relpath(path)
            if rel in resolved.unreadable:
                continue
            try:
                image = load_image(path)
            except ImageError as exc:
                problems.append(f"{rel}: {_strip_path(str(exc), path)}")
                continue
            conversions.extend((rel, c) for c in image.conversions)
    listed = verified = 0
    if check_checksums:
        for rel, expected in sorted(resolved.checksums.items()):
            listed += 1
            file = resolved.root / rel
            if not file.is_file():
                problems.append(f"{rel}: listed in the checksums but missing")
                continue
            try:
                actual = _sha256(file)
            except OSError as exc:
                problems.append(f"{rel}: cannot read for the checksum ({exc})")
                continue
            if actual != expected:
                problems.append(
                    f"{rel}: sha256 mismatch (expected {expected[:16]}..., got {actual[:16]}...)"
                )
            else:
                verified += 1
    without = sum(1 for f in resolved.files() if resolved.relpath(f) not in resolved.checksums)
    report = ValidationReport(
        dataset=resolved.definition.name,
        version=resolved.definition.version,
        root=resolved.root,
        layout=resolved.layout.name,
        scale=scale,
        hr_policy=resolved.definition.hr_policy,
        pairs=len(resolved.pairs),
        expected_count=resolved.expected_count,
        problems=tuple(problems),
        conversions=tuple(conversions),
        crops=tuple(crops),
        decoded=decode,
        checksums_listed=listed,
        checksums_verified=verified,
        files_without_checksum=without,
        manifest_hash=resolved.manifest_hash(),
    )
    if raise_on_problems:
        report.raise_if_problems()
    return report


# ----------------------------------------------------------------------------------------------
# synthesized degraded crop sets (div2k-val-realesrgan)
# ----------------------------------------------------------------------------------------------

SYNTH_LAYOUT = Layout(
    name="synthesized",
    lr_dirs=("LR",),
    hr_dirs=("HR",),
    pairing="exact-stem",
    description="HR crops and degraded LR written by qbench (see degradation_record.json)",
)


def synthesis_dir(definition: DatasetDef) -> Path:
    """``cache_dir()/<name>-<seed>``: where a synthesized set is written."""
    if definition.synthesize is None:
        raise DatasetError(f"dataset {definition.name!r} has no [synthesize] section")
    return paths.cache_dir() / f"{definition.name}-{definition.synthesize.seed}"


def _source_files(source_hr_dirs: list[Path]) -> list[Path]:
    files = []
    for directory in source_hr_dirs:
        files.extend(
            f
            for f in sorted(directory.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        )
    return files


def synthesize_degraded_set(
    source_hr_dirs: list[Path],
    out_dir: Path,
    *,
    settings: dict[str, Any],
    preset: str,
    seed: int,
    crop_size: int,
    crops_per_image: int,
    scale: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``HR/<stem>_<k>.png`` crops and ``LR/<stem>_<k>.png`` degraded images to ``out_dir``.

    For every source image (sorted by file name) and crop index ``k``: the crop's top-left corner
    is uniform over the valid positions, drawn from a generator seeded with
    ``derive_seed(seed, "<stem>/crop<k>")``; the LR is ``degrade(crop, preset,
    derive_seed(seed, "<stem>_<k>"))``. The record (settings, source files, per-image crop box,
    seed, source conversions and every degradation parameter) is written last, atomically, to
    ``degradation_record.json``; its presence marks a complete set. All unreadable or too-small
    source images are reported together before anything is written.
    """
    from harness.degradation import degrade, derive_seed
    from harness.images import save_png

    files = _source_files(source_hr_dirs)
    if not files:
        raise DatasetError(f"no source HR images in {', '.join(map(str, source_hr_dirs))}")
    problems: list[str] = []
    for file in files:
        try:
            width, height = image_size(file)
        except ImageError as exc:
            problems.append(str(exc))
            continue
        if min(width, height) < crop_size:
            problems.append(f"{file}: {width}x{height} is smaller than the crop size {crop_size}")
    if problems:
        raise DatasetError(
            f"cannot synthesize into {out_dir}; {len(problems)} source problem(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    names = [f.stem for f in files]
    if len(set(names)) != len(names):
        raise DatasetError(f"source HR directories contain duplicate stems: {sorted(names)}")
    (out_dir / "HR").mkdir(parents=True, exist_ok=True)
    (out_dir / "LR").mkdir(parents=True, exist_ok=True)
    images: dict[str, Any] = {}
    total = len(files) * crops_per_image
    done = 0
    for file in files:
        source = load_image(file)
        height, width = source.array.shape[:2]
        for index in range(crops_per_image):
            name = f"{file.stem}_{index:02d}"
            crop_rng = np.random.Generator(
                np.random.PCG64(derive_seed(seed, f"{file.stem}/crop{index}"))
            )
            top = int(crop_rng.integers(0, height - crop_size + 1))
            left = int(crop_rng.integers(0, width - crop_size + 1))
            crop = np.ascontiguousarray(
                source.array[top : top + crop_size, left : left + crop_size]
            )
            image_seed = derive_seed(seed, name)
            lr, params = degrade(crop, preset, image_seed, scale)
            save_png(out_dir / "HR" / f"{name}.png", crop)
            save_png(out_dir / "LR" / f"{name}.png", lr)
            images[name] = {
                "hr_sha256": _sha256(out_dir / "HR" / f"{name}.png"),
                "lr_sha256": _sha256(out_dir / "LR" / f"{name}.png"),
                "source": file.name,
                "source_conversions": list(source.conversions),
                "crop_box": [left, top, left + crop_size, top + crop_size],
                "seed": image_seed,
                "degradation": params,
            }
            done += 1
            if progress is not None:
                progress(done, total)
    record = {
        "settings": settings,
        "source_hr_dirs": [str(d) for d in source_hr_dirs],
        "source_files": [[f.name, f.stat().st_size] for f in files],
        "images": images,
    }
    tmp = out_dir / f".{SYNTH_RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out_dir / SYNTH_RECORD_FILE)
    return record


def _locate_synthesized(
    definition: DatasetDef, root: str | Path | None, *, synthesize: bool
) -> tuple[tuple[Path, Layout] | None, dict[str, Any]]:
    spec = definition.synthesize
    assert spec is not None
    registry_dir = (
        definition.definition_path.parent if definition.definition_path is not None else None
    )
    source = get_dataset(spec.source_dataset, registry_dir)
    located = source.find_root(root, layout=spec.source_layout, hr_only=True)
    out_dir = synthesis_dir(definition)
    record_path = out_dir / SYNTH_RECORD_FILE
    settings = spec.settings(definition.scale)
    source_files: list[Path] | None = None
    if located is not None:
        source_root, source_layout = located
        if not source_layout.has_hr:
            raise DatasetError(f"source dataset {source.name!r} layout has no HR directory")
        source_files = _source_files([source_root / d for d in source_layout.hr_dirs])
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{record_path}: unreadable synthesis record ({exc})") from exc
        if record.get("settings") != settings:
            raise DatasetError(
                f"{out_dir} was synthesized with different settings than dataset "
                f"{definition.name!r} v{definition.version} now specifies; delete the directory "
                "to rebuild it (it is never overwritten silently)"
            )
        if source_files is not None:
            current = [[f.name, f.stat().st_size] for f in source_files]
            if record.get("source_files") != current:
                raise DatasetError(
                    f"{out_dir} was synthesized from different source files than those now in "
                    f"{located[0] if located else '?'}; delete the directory to rebuild it"
                )
    elif located is None:
        return None, {}
    elif not synthesize:
        raise DatasetError(
            f"dataset {definition.name!r}: the degraded set is not synthesized yet; run "
            f"`qbench validate {definition.name}` to build it in {out_dir}"
        )
    else:
        source_root, source_layout = located
        record = synthesize_degraded_set(
            [source_root / d for d in source_layout.hr_dirs],
            out_dir,
            settings=settings,
            preset=spec.preset,
            seed=spec.seed,
            crop_size=spec.crop_size,
            crops_per_image=spec.crops_per_image,
            scale=definition.scale,
        )
    expected = None
    if source.expected_count is not None:
        expected = source.expected_count * spec.crops_per_image
    checksums: dict[str, str] = {}
    for name, entry in record.get("images", {}).items():
        for side in ("HR", "LR"):
            digest = entry.get(f"{side.lower()}_sha256")
            if isinstance(digest, str):
                checksums[f"{side}/{name}.png"] = digest
    provenance = {
        "checksums": checksums,  # moved into ResolvedDataset.checksums by _pair_files
        "synthesized": True,
        "record": str(record_path),
        "preset": spec.preset,
        "seed": spec.seed,
        "crop_size": spec.crop_size,
        "crops_per_image": spec.crops_per_image,
        "source_dataset": spec.source_dataset,
        "source_files": len(record.get("source_files", [])),
        "expected_count": expected,
    }
    return (out_dir, SYNTH_LAYOUT), provenance

"""Image-quality metrics as data over pyiqa: specs, offline availability, NIQE parameters, scoring.

Every public metric name maps to a :class:`MetricSpec` that pins the exact ``pyiqa.create_metric``
call, the direction (higher or lower is better), the reference it needs and the weight files pyiqa
would otherwise download. ``spec.as_record()`` is stored with every result, together with the
installed pyiqa version (:data:`PYIQA_VERSION`).

Reference behaviour (methods.md §9.2): PassionSR's ``measure.py`` and OSEDiff's
``test_metrics.py`` both call pyiqa: ``psnr`` / ``ssim`` with ``test_y_channel=True,
color_space='ycbcr'`` (Y channel of BT.601 YCbCr, crop border 0), ``lpips`` (AlexNet, v0.1),
``dists``, ``niqe``, ``musiq`` (KonIQ-10k), ``maniqa`` (PassionSR/QArtSR: KonIQ weights) or
``maniqa-pipal`` (OSEDiff), ``clipiqa``, and OSEDiff's folder-level ``fid``. qbench keeps these
calls exactly and adds ``psnr_fp`` / ``ssim_fp`` (the same formulas against the full-precision
model's output instead of HR, i.e. the quantization error alone).

Deliberate deviations from those scorers, each documented in ``docs/metrics.md``:

* **8-bit quantization before scoring.** SR tensors are rounded to 8-bit levels
  (``floor(clamp(x, 0, 1) * 255 + 0.5) / 255``, the rounding of :func:`harness.images.to_uint8`)
  before any metric, so a score computed in memory equals the score of the saved PNG. Inputs outside
  [0, 1] by more than :data:`RANGE_TOLERANCE` are refused instead of clamped silently.
* **No silent resize.** OSEDiff/PassionSR resize SR and HR to the smaller size when shapes differ;
  qbench raises :class:`~harness.errors.ImageError` naming both shapes.
* **NaN/Inf scores are never averaged.** NaN/Inf *inputs* raise :class:`~harness.errors.DivergedError`;
  a metric that fails or gives a non-finite score on a valid image (NIQE of a flat output: singular
  block covariance) raises :class:`~harness.errors.MetricUndefined`. Evaluation records that image's
  score as undefined and gives the metric no mean for the dataset (shown as "–" with the reason).
* **Seeded learned metrics.** Every pyiqa call of a metric with ``seeded=True`` runs inside
  :func:`seeded`, which seeds Python, NumPy and torch with :data:`METRIC_SEED` and restores the
  caller's random state afterwards. In pyiqa 0.1.16 none of the listed metrics samples randomly in
  eval mode (MANIQA uses ``uniform_crop`` at test time and ``random_crop`` only in training; MUSIQ's
  drop-path and FID's KID subsets are not used), but older pyiqa versions cropped MANIQA randomly,
  so the seed makes the result independent of whatever ran before.
* **Offline only.** :func:`create_metric` checks every required file on disk first and raises
  :class:`~harness.errors.MetricUnavailable` naming each missing file, its exact path and its source
  URL. Any download pyiqa, torchvision, CLIP or timm would still attempt is refused inside
  :func:`offline_guard`, so nothing hangs and no randomly initialised network is ever scored.
* **NIQE ships with qbench.** The NIQE prior (``mu_prisparam`` 1x36, ``cov_prisparam`` 36x36) comes
  from ``basicsr==1.4.2``'s ``niqe_pris_params.npz`` (Apache-2.0), converted to the ``.mat`` file
  pyiqa loads and stored in ``harness/assets/`` (see ``NIQE_PROVENANCE.md``); :func:`ensure_niqe_params`
  copies it into pyiqa's cache when absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from harness.errors import (
    ConfigError,
    DivergedError,
    ImageError,
    MetricUnavailable,
    MetricUndefined,
    QBenchError,
    UnknownNameError,
)

MetricKind = Literal["fr", "nr", "fp", "folder"]

PYIQA_VERSION: str = metadata.version("pyiqa")
"""Installed pyiqa version, recorded with every result (weights and defaults change across versions)."""

METRIC_SEED: int = 123
"""Seed applied around every call of a seeded metric (pyiqa's ``InferenceModel`` default ``seed``;
pyiqa 0.1.16 stores it but never applies it)."""

RANGE_TOLERANCE: float = 1e-6
"""Inputs may exceed [0, 1] by at most this much (float round-off); more is an error."""

PYIQA_WEIGHTS_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
"""Where pyiqa 0.1.16 fetches its own weight files (``get_url_from_name``, Hugging Face store)."""

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
NIQE_PARAMS_FILENAME = "niqe_modelparameters.mat"
NIQE_ASSET = ASSETS_DIR / NIQE_PARAMS_FILENAME
NIQE_MIN_SIDE = 96
"""pyiqa's NIQE splits the Y channel into 96x96 blocks; smaller images have no block and crash."""

CacheKind = Literal["pyiqa", "torch-checkpoints", "clip", "hf-hub"]

_CACHE_TEMPLATES: dict[str, str] = {
    "pyiqa": "$TORCH_HOME/hub/pyiqa",
    "torch-checkpoints": "$TORCH_HOME/hub/checkpoints",
    "clip": "$TORCH_HOME/hub/clip",
    "hf-hub": "$HF_HOME/hub",
}


# --------------------------------------------------------------------------------------------
# Cache locations (resolved at call time, so TORCH_HOME set later is honoured)


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``: ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``)."""
    import torch.hub

    return Path(torch.hub.get_dir())


def pyiqa_cache_dir() -> Path:
    """pyiqa's weight cache, ``$TORCH_HOME/hub/pyiqa`` (pyiqa's ``DEFAULT_CACHE_DIR``)."""
    return torch_hub_dir() / "pyiqa"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``huggingface_hub.constants.HF_HUB_CACHE``) used by timm."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class RequiredFile:
    """One weight file a metric needs, where it must be, and where pyiqa would fetch it from.

    ``cache`` selects the directory: ``"pyiqa"`` = ``$TORCH_HOME/hub/pyiqa``,
    ``"torch-checkpoints"`` = ``$TORCH_HOME/hub/checkpoints`` (torchvision backbones),
    ``"clip"`` = ``$TORCH_HOME/hub/clip`` (OpenAI CLIP, loaded by pyiqa's ``clip_model.load``),
    ``"hf-hub"`` = the Hugging Face cache, repository ``hf_repo_id`` (timm backbones), in which
    ``filename`` or one of ``alternatives`` must be cached. ``sha256`` is checked at load time when
    known (CLIP's URL carries it).
    """

    filename: str
    cache: CacheKind
    url: str
    sha256: str | None = None
    hf_repo_id: str | None = None
    alternatives: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        """The directory the file must be in (for ``hf-hub``: the repository's cache folder)."""
        if self.cache == "pyiqa":
            return pyiqa_cache_dir()
        if self.cache == "torch-checkpoints":
            return torch_hub_dir() / "checkpoints"
        if self.cache == "clip":
            return torch_hub_dir() / "clip"
        if self.cache == "hf-hub":
            return hf_hub_cache_dir() / ("models--" + str(self.hf_repo_id).replace("/", "--"))
        raise ValueError(f"unknown cache kind {self.cache!r}")

    @property
    def path(self) -> Path:
        """The exact expected path (``hf-hub``: ``snapshots/<revision>/`` inside the repo folder)."""
        if self.cache == "hf-hub":
            return self.directory / "snapshots" / "<revision>" / self.filename
        return self.directory / self.filename

    def find(self) -> Path | None:
        """The existing file, or ``None``. Disk only: never touches the network."""
        if self.cache != "hf-hub":
            return self.path if self.path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        for name in (self.filename, *self.alternatives):
            found = try_to_load_from_cache(
                str(self.hf_repo_id), name, cache_dir=str(hf_hub_cache_dir())
            )
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None

    def describe(self) -> str:
        """One line for errors and ``qbench doctor``: file, exact place, source."""
        if self.cache == "hf-hub":
            names = " or ".join((self.filename, *self.alternatives))
            return (
                f"{names} of Hugging Face repo {self.hf_repo_id} (expected in the HF cache as "
                f"{self.path}; on a connected machine run `huggingface-cli download "
                f"{self.hf_repo_id} {self.filename}` and copy {self.directory.name} into "
                f"{self.directory.parent}) from {self.url}"
            )
        return f"{self.filename} -> {self.path} (source: {self.url})"

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "filename": self.filename,
            "directory": _CACHE_TEMPLATES[self.cache],
            "url": self.url,
        }
        if self.hf_repo_id:
            record["hf_repo_id"] = self.hf_repo_id
            record["alternatives"] = list(self.alternatives)
        if self.sha256:
            record["sha256"] = self.sha256
        return record


def _pyiqa_file(filename: str) -> RequiredFile:
    return RequiredFile(filename, "pyiqa", f"{PYIQA_WEIGHTS_URL}/{filename}")


_ALEXNET = RequiredFile(
    "alexnet-owt-7be5be79.pth",
    "torch-checkpoints",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
)
_VGG16 = RequiredFile(
    "vgg16-397923af.pth",
    "torch-checkpoints",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
)
_CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
_CLIP_RN50 = RequiredFile(
    "RN50.pt",
    "clip",
    f"https://openaipublic.azureedge.net/clip/models/{_CLIP_RN50_SHA256}/RN50.pt",
    sha256=_CLIP_RN50_SHA256,
)
_MANIQA_VIT_REPO = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
_MANIQA_VIT = RequiredFile(
    "model.safetensors",
    "hf-hub",
    f"https://huggingface.co/{_MANIQA_VIT_REPO}/resolve/main/model.safetensors",
    hf_repo_id=_MANIQA_VIT_REPO,
    alternatives=("pytorch_model.bin",),
)


@dataclass(frozen=True)
class MetricSpec:
    """A fully specified metric: the exact pyiqa call, its direction, reference and weight files.

    ``kind``: ``"fr"`` full reference against HR; ``"nr"`` no reference; ``"fp"`` full reference
    against the full-precision model's output; ``"folder"`` one score for a folder pair (FID).
    ``call_kwargs`` are passed to the metric's forward call (FID only). ``min_side`` is the smallest
    image side the metric accepts. ``seeded`` marks calls wrapped in :func:`seeded`.
    """

    name: str
    pyiqa_name: str
    pyiqa_kwargs: Mapping[str, Any]
    lower_better: bool
    kind: MetricKind
    description: str
    required_files: tuple[RequiredFile, ...] = ()
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    min_side: int = 1
    seeded: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("fr", "nr", "fp", "folder"):
            raise ValueError(f"metric {self.name}: unknown kind {self.kind!r}")
        object.__setattr__(self, "pyiqa_kwargs", MappingProxyType(dict(self.pyiqa_kwargs)))
        object.__setattr__(self, "call_kwargs", MappingProxyType(dict(self.call_kwargs)))

    @property
    def arrow(self) -> str:
        """``↓`` when lower is better, else ``↑``."""
        return "↓" if self.lower_better else "↑"

    @property
    def reference(self) -> str:
        return {
            "fr": "HR",
            "nr": "none",
            "fp": "full-precision output",
            "folder": "HR folder",
        }[self.kind]

    @property
    def pyiqa_call(self) -> str:
        """The exact call as source text, e.g. ``pyiqa.create_metric('psnr', test_y_channel=True)``."""
        args = [repr(self.pyiqa_name)] + [f"{k}={v!r}" for k, v in self.pyiqa_kwargs.items()]
        return f"pyiqa.create_metric({', '.join(args)})"

    def as_record(self) -> dict[str, Any]:
        """JSON-able description stored with every result (includes the pyiqa version)."""
        return {
            "name": self.name,
            "pyiqa_name": self.pyiqa_name,
            "pyiqa_kwargs": dict(self.pyiqa_kwargs),
            "pyiqa_call": self.pyiqa_call,
            "call_kwargs": dict(self.call_kwargs),
            "pyiqa_version": PYIQA_VERSION,
            "lower_better": self.lower_better,
            "direction": self.arrow,
            "kind": self.kind,
            "reference": self.reference,
            "description": self.description,
            "required_files": [f.as_record() for f in self.required_files],
            "input_quantization": "8-bit: floor(clamp(x,0,1)*255+0.5)/255 before scoring",
            "seed": METRIC_SEED if self.seeded else None,
        }


_Y_CHANNEL = {"test_y_channel": True, "color_space": "ycbcr"}

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "psnr",
            "psnr",
            _Y_CHANNEL,
            lower_better=False,
            kind="fr",
            description=(
                "PSNR (dB) on the Y channel of BT.601 YCbCr against HR, crop border 0, as "
                "OSEDiff/PassionSR; pyiqa adds eps=1e-8 to the MSE (identical images give 80 dB)."
            ),
        ),
        MetricSpec(
            "ssim",
            "ssim",
            _Y_CHANNEL,
            lower_better=False,
            kind="fr",
            description=(
                "SSIM on the Y channel (rounded to integers, MATLAB-style) against HR: 11x11 "
                "Gaussian sigma 1.5, valid region, no downsampling, contrast term clamped at 0."
            ),
        ),
        MetricSpec(
            "psnr_fp",
            "psnr",
            _Y_CHANNEL,
            lower_better=False,
            kind="fp",
            description="Same formula as psnr, against the full-precision model's output.",
        ),
        MetricSpec(
            "ssim_fp",
            "ssim",
            _Y_CHANNEL,
            lower_better=False,
            kind="fp",
            description="Same formula as ssim, against the full-precision model's output.",
        ),
        MetricSpec(
            "lpips",
            "lpips",
            {"net": "alex", "version": "0.1"},
            lower_better=True,
            kind="fr",
            description="LPIPS v0.1 with the AlexNet trunk against HR.",
            required_files=(_ALEXNET, _pyiqa_file("LPIPS_v0.1_alex-df73285e.pth")),
            seeded=True,
        ),
        MetricSpec(
            "dists",
            "dists",
            {},
            lower_better=True,
            kind="fr",
            description="DISTS (VGG16 trunk) against HR.",
            required_files=(_VGG16, _pyiqa_file("DISTS_weights-f5e65c96.pth")),
            seeded=True,
        ),
        MetricSpec(
            "niqe",
            "niqe",
            {},
            lower_better=True,
            kind="nr",
            description=(
                "NIQE (no reference) on pyiqa's default Y of YIQ, rounded to 8 bit; prior "
                "parameters shipped with qbench (basicsr 1.4.2, Apache-2.0)."
            ),
            required_files=(_pyiqa_file(NIQE_PARAMS_FILENAME),),
            min_side=NIQE_MIN_SIDE,
            seeded=True,
        ),
        MetricSpec(
            "musiq",
            "musiq",
            {"pretrained": "koniq10k"},
            lower_better=False,
            kind="nr",
            description="MUSIQ trained on KonIQ-10k (no reference).",
            required_files=(_pyiqa_file("musiq_koniq_ckpt-e95806b9.pth"),),
            seeded=True,
        ),
        MetricSpec(
            "maniqa",
            "maniqa",
            {"train_dataset": "koniq", "scale": 0.8},
            lower_better=False,
            kind="nr",
            description=(
                "MANIQA with KonIQ-10k weights (PassionSR/QArtSR); NOT comparable with "
                "maniqa-pipal (OSEDiff)."
            ),
            required_files=(_MANIQA_VIT, _pyiqa_file("ckpt_koniq10k.pt")),
            seeded=True,
        ),
        MetricSpec(
            "maniqa-pipal",
            "maniqa-pipal",
            {},
            lower_better=False,
            kind="nr",
            description="MANIQA with PIPAL weights (OSEDiff's tables); not comparable with maniqa.",
            required_files=(_MANIQA_VIT, _pyiqa_file("MANIQA_PIPAL-ae6d356b.pth")),
            seeded=True,
        ),
        MetricSpec(
            "clipiqa",
            "clipiqa",
            {},
            lower_better=False,
            kind="nr",
            description="CLIP-IQA (OpenAI CLIP RN50, pyiqa's prompt ensemble), no reference.",
            required_files=(_CLIP_RN50,),
            seeded=True,
        ),
        MetricSpec(
            "fid",
            "fid",
            {},
            lower_better=True,
            kind="folder",
            description=(
                "FID between the SR folder and the HR folder (clean-fid resize, pyiqa's "
                "TF-Inception weights), one number per folder pair, as OSEDiff's scorer."
            ),
            required_files=(_pyiqa_file("pt_inception-2015-12-05-6726825d.pth"),),
            call_kwargs={"mode": "clean", "num_workers": 0, "verbose": False},
            seeded=True,
        ),
    )
}
"""Every public metric name -> its spec."""


def get_metric_spec(name: str) -> MetricSpec:
    """The spec for ``name``; :class:`UnknownNameError` (with close matches) if unknown."""
    try:
        return METRICS[name]
    except KeyError:
        raise UnknownNameError("metric", name, list(METRICS)) from None


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    """``"psnr, ssim"`` or a list -> validated, de-duplicated names in the given order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = item.strip()
        if not name:
            continue
        get_metric_spec(name)
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"no metric names given; known: {', '.join(METRICS)}")
    return names


# --------------------------------------------------------------------------------------------
# NIQE parameters


def niqe_params_digest(mu: np.ndarray, cov: np.ndarray) -> str:
    """sha256 of the NIQE prior's values (float64 little-endian ``mu`` then ``cov``, row-major).

    Independent of the container (``.npz`` or ``.mat``), so it shows the conversion is lossless.
    """
    data = np.ascontiguousarray(np.ravel(mu), dtype="<f8").tobytes()
    data += np.ascontiguousarray(cov, dtype="<f8").tobytes()
    return hashlib.sha256(data).hexdigest()


def convert_basicsr_niqe_npz(npz_path: str | Path, mat_path: str | Path) -> str:
    """Convert BasicSR's ``niqe_pris_params.npz`` to pyiqa's ``niqe_modelparameters.mat``.

    BasicSR keys ``mu_pris_param`` (1x36) and ``cov_pris_param`` (36x36, float64) become pyiqa's
    ``mu_prisparam`` and ``cov_prisparam`` (the names of the official MATLAB NIQE release, which
    pyiqa's ``NIQE`` reads with ``scipy.io.loadmat``). Values are copied unchanged. The MAT-5 header
    text is fixed (scipy would write the current time) so the output bytes are reproducible.
    Returns :func:`niqe_params_digest` of the values.
    """
    import scipy.io

    with np.load(npz_path) as source:
        mu = np.asarray(source["mu_pris_param"], dtype=np.float64)
        cov = np.asarray(source["cov_pris_param"], dtype=np.float64)
    if mu.shape != (1, 36) or cov.shape != (36, 36):
        raise ValueError(f"{npz_path}: unexpected shapes mu {mu.shape}, cov {cov.shape}")
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"mu_prisparam": mu, "cov_prisparam": cov}, format="5")
    data = bytearray(buffer.getvalue())
    header = b"MATLAB 5.0 MAT-file, NIQE prior from basicsr-1.4.2 niqe_pris_params.npz"
    data[:116] = header.ljust(116, b" ")
    _atomic_write_bytes(Path(mat_path), bytes(data))
    return niqe_params_digest(mu, cov)


def ensure_niqe_params() -> Path:
    """Copy the shipped NIQE prior into pyiqa's cache when absent; return the cached path.

    An existing file there (e.g. pyiqa's own download) is left untouched.
    """
    target = pyiqa_cache_dir() / NIQE_PARAMS_FILENAME
    if target.is_file():
        return target
    if not NIQE_ASSET.is_file():
        raise MetricUnavailable(
            f"niqe: the shipped NIQE parameters {NIQE_ASSET} are missing from this checkout"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(target, NIQE_ASSET.read_bytes())
    except OSError as exc:
        raise MetricUnavailable(
            f"niqe: cannot place the NIQE parameters in pyiqa's cache {target}: {exc}"
        ) from exc
    return target


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            tmp_file.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; these are shared, read-only data files
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


# --------------------------------------------------------------------------------------------
# Availability


@dataclass(frozen=True)
class MetricStatus:
    """Whether a metric can run here. ``missing`` lists expected paths; ``reason`` says what to do."""

    name: str
    available: bool
    missing: list[Path]
    reason: str


def metric_status(name: str) -> MetricStatus:
    """Check a metric's weight files on disk only (no network, no pyiqa import, never hangs).

    NIQE counts as available when its parameters are in pyiqa's cache or shipped with qbench
    (:func:`create_metric` copies them into the cache).
    """
    spec = get_metric_spec(name)
    missing_files = [f for f in spec.required_files if f.find() is None]
    if spec.name == "niqe" and missing_files and NIQE_ASSET.is_file():
        return MetricStatus(
            name,
            True,
            [],
            f"NIQE parameters will be copied from {NIQE_ASSET} to {missing_files[0].path}",
        )
    if not missing_files:
        return MetricStatus(
            name,
            True,
            [],
            "all weight files present" if spec.required_files else "no weights needed",
        )
    reason = "missing weight files (qbench never downloads): " + "; ".join(
        f.describe() for f in missing_files
    )
    return MetricStatus(name, False, [f.path for f in missing_files], reason)


# --------------------------------------------------------------------------------------------
# Offline guard and seeding

_GUARD_LOCK = threading.RLock()


class _DownloadRefused(MetricUnavailable):
    """A library tried to download a file while qbench was creating a metric."""


def _refuse_download(url: Any, dst: Any = None, *args: Any, **kwargs: Any) -> None:
    raise _DownloadRefused(
        f"refused to download {url} to {dst}: qbench runs offline; place the file at that path"
    )


def _offline_clip_download(url: str, root: str) -> str:
    """Replacement for pyiqa's CLIP ``_download``: use the cached file, verify its sha256."""
    target = Path(root) / os.path.basename(url)
    if not target.is_file():
        _refuse_download(url, target)
    expected = url.split("/")[-2]
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise MetricUnavailable(
            f"{target}: sha256 {digest.hexdigest()} does not match {expected} from {url}; "
            "replace the file with the original"
        )
    return str(target)


@contextlib.contextmanager
def offline_guard() -> Iterator[None]:
    """Make every download path used by the listed metrics fail fast instead of fetching.

    Patches, for the duration: pyiqa's ``download_util.download_url_to_file`` (pyiqa weights) and
    its ``DEFAULT_CACHE_DIR`` (re-read from ``TORCH_HOME`` now; pyiqa computes it at import),
    ``torch.hub.download_url_to_file`` (torchvision backbones), pyiqa's CLIP ``_download``, and
    sets ``huggingface_hub.constants.HF_HUB_OFFLINE`` (timm backbones). Not thread-safe with other
    code downloading at the same moment; a process-wide lock serialises qbench's own uses.
    """
    import huggingface_hub.constants as hf_constants
    import pyiqa.archs.clip_model as pyiqa_clip
    import pyiqa.utils.download_util as pyiqa_download
    import torch.hub

    with _GUARD_LOCK:
        saved = (
            pyiqa_download.download_url_to_file,
            pyiqa_download.DEFAULT_CACHE_DIR,
            torch.hub.download_url_to_file,
            pyiqa_clip._download,
            hf_constants.HF_HUB_OFFLINE,
        )
        pyiqa_download.download_url_to_file = _refuse_download
        pyiqa_download.DEFAULT_CACHE_DIR = str(pyiqa_cache_dir())
        torch.hub.download_url_to_file = _refuse_download
        pyiqa_clip._download = _offline_clip_download
        hf_constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            (
                pyiqa_download.download_url_to_file,
                pyiqa_download.DEFAULT_CACHE_DIR,
                torch.hub.download_url_to_file,
                pyiqa_clip._download,
                hf_constants.HF_HUB_OFFLINE,
            ) = saved


@contextlib.contextmanager
def seeded(seed: int = METRIC_SEED) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU and CUDA) inside; restore the caller's states after."""
    import torch

    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------
# Creating and calling metrics


def quantize_8bit(x: Any, *, what: str = "image") -> Any:
    """Validate a ``1 x 3 x H x W`` tensor in [0, 1] and round it to 8-bit levels.

    Returns ``floor(clamp(x, 0, 1) * 255 + 0.5) / 255`` as float32 (the values a saved PNG
    holds). NaN/Inf raise :class:`DivergedError`; values outside [0, 1] by more than
    :data:`RANGE_TOLERANCE`, or another shape, raise :class:`ImageError`.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise ImageError(f"{what}: expected a torch tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ImageError(f"{what}: expected shape 1 x 3 x H x W, got {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise DivergedError(f"{what}: contains NaN or Inf values")
    low, high = float(x.min()), float(x.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ImageError(f"{what}: values must be in [0, 1], got min {low:.6g}, max {high:.6g}")
    return (torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0).to(torch.float32)


@dataclass
class LoadedMetric:
    """A created pyiqa metric with its spec; :meth:`score` validates, quantizes and seeds."""

    spec: MetricSpec
    model: Any
    device: str
    effective_options: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """``spec.as_record()`` plus pyiqa's effective options (defaults merged with the kwargs)."""
        return {**self.spec.as_record(), "effective_options": self.effective_options}

    def score(self, sr: Any, ref: Any = None, *, image: str = "image") -> float:
        """Score one image. ``ref`` is HR (``fr``), the FP output (``fp``) or ``None`` (``nr``)."""
        spec = self.spec
        if spec.kind == "folder":
            raise ConfigError(f"{spec.name} is a folder-level metric; use score_folders")
        sr_q = quantize_8bit(sr, what=f"{image} (SR)")
        ref_q = None
        if spec.kind in ("fr", "fp"):
            ref_label = "HR" if spec.kind == "fr" else "full-precision output"
            if ref is None:
                raise ConfigError(f"{spec.name} needs a reference ({ref_label}) for {image}")
            ref_q = quantize_8bit(ref, what=f"{image} ({ref_label})")
            if tuple(sr_q.shape) != tuple(ref_q.shape):
                raise ImageError(
                    f"{image}: SR shape {tuple(sr_q.shape)} differs from {ref_label} shape "
                    f"{tuple(ref_q.shape)}; qbench never resizes to make them match"
                )
        height, width = int(sr_q.shape[2]), int(sr_q.shape[3])
        if min(height, width) < spec.min_side:
            raise ImageError(
                f"{image}: {spec.name} needs images of at least {spec.min_side}x{spec.min_side} "
                f"pixels, got {height}x{width}"
            )
        try:
            with _maybe_seeded(spec.seeded):
                if ref_q is None:
                    output = self.model(sr_q.to(self.device))
                else:
                    output = self.model(sr_q.to(self.device), ref_q.to(self.device))
        except QBenchError:
            raise
        except Exception as exc:
            raise MetricUndefined(
                f"{spec.name} failed on {image}: {type(exc).__name__}: {exc}"
            ) from exc
        return _finite_float(output, spec.name, image)

    def score_folders(self, sr_dir: str | Path, ref_dir: str | Path) -> float:
        """Folder-level score (FID) between two directories of images."""
        if self.spec.kind != "folder":
            raise ConfigError(f"{self.spec.name} is a per-image metric; use score")
        for folder in (sr_dir, ref_dir):
            if not Path(folder).is_dir():
                raise ConfigError(f"{self.spec.name}: {folder} is not a directory")
        try:
            with _maybe_seeded(self.spec.seeded):
                output = self.model(str(sr_dir), str(ref_dir), **dict(self.spec.call_kwargs))
        except QBenchError:
            raise
        except Exception as exc:
            raise QBenchError(
                f"{self.spec.name} failed on {sr_dir} vs {ref_dir}: {type(exc).__name__}: {exc}"
            ) from exc
        return _finite_float(output, self.spec.name, f"{sr_dir} vs {ref_dir}")


def _maybe_seeded(enabled: bool) -> contextlib.AbstractContextManager[None]:
    return seeded() if enabled else contextlib.nullcontext()


def _finite_float(output: Any, metric: str, image: str) -> float:
    import torch

    if isinstance(output, torch.Tensor):
        if output.numel() != 1:
            raise QBenchError(f"{metric} returned {output.numel()} values for {image}, expected 1")
        value = float(output.detach().reshape(-1)[0])
    else:
        value = float(output)
    if not math.isfinite(value):
        raise MetricUndefined(f"{metric} gave a non-finite score ({value}) for {image}")
    return value


def create_metric(name: str, device: str = "cpu") -> LoadedMetric:
    """Create a metric from its spec, offline.

    Checks every required file first and raises :class:`MetricUnavailable` listing each missing
    file with its exact path and source URL (fast: no pyiqa import is needed for the check). NIQE's
    parameters are copied into pyiqa's cache from qbench's assets when absent. The pyiqa call runs
    inside :func:`offline_guard`; any failure to load (a corrupt or incompatible file, a download
    the check did not foresee) becomes :class:`MetricUnavailable`, never a random-weight network.
    """
    spec = get_metric_spec(name)
    if spec.name == "niqe":
        ensure_niqe_params()
    status = metric_status(name)
    if not status.available:
        raise MetricUnavailable(f"{name}: {status.reason}")
    try:
        import pyiqa
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        with offline_guard():
            model = pyiqa.create_metric(spec.pyiqa_name, device=device, **dict(spec.pyiqa_kwargs))
    except QBenchError as exc:
        raise MetricUnavailable(f"{name}: {exc}") from exc
    except Exception as exc:
        files = ", ".join(str(f.find() or f.path) for f in spec.required_files) or "none"
        raise MetricUnavailable(
            f"{name}: pyiqa could not create the metric ({type(exc).__name__}: {exc}); "
            f"weight files used: {files}"
        ) from exc
    model.eval()
    effective = dict(DEFAULT_CONFIGS[spec.pyiqa_name]["metric_opts"])
    effective.update(spec.pyiqa_kwargs)
    return LoadedMetric(spec, model, device, _jsonable(effective))


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


class MetricSuite:
    """A set of metrics created once; unavailable ones are recorded with their reason.

    ``score(sr, hr, fp)`` returns every available per-image metric's value. ``fr`` metrics need
    ``hr`` and ``fp`` metrics need ``fp``; a missing reference is an error, not a skip. Folder
    metrics (FID) are created here but computed with :meth:`score_folders`.
    """

    def __init__(self, names: str | Sequence[str], device: str = "cpu"):
        self.names = parse_metric_names(names)
        self.device = device
        self.metrics: dict[str, LoadedMetric] = {}
        self.unavailable: dict[str, str] = {}
        for name in self.names:
            try:
                self.metrics[name] = create_metric(name, device=device)
            except MetricUnavailable as exc:
                self.unavailable[name] = str(exc)

    @property
    def available(self) -> list[str]:
        return [n for n in self.names if n in self.metrics]

    @property
    def per_image(self) -> list[str]:
        return [n for n in self.available if self.metrics[n].spec.kind != "folder"]

    @property
    def folder_level(self) -> list[str]:
        return [n for n in self.available if self.metrics[n].spec.kind == "folder"]

    def records(self) -> dict[str, dict[str, Any]]:
        """``LoadedMetric.record()`` of every available metric (stored with results)."""
        return {name: self.metrics[name].record() for name in self.available}

    def spec_records(self) -> dict[str, dict[str, Any]]:
        """Alias of :meth:`records` (the name :mod:`harness.evaluate` looks for)."""
        return self.records()

    def score(
        self,
        sr: Any,
        hr: Any = None,
        fp: Any = None,
        *,
        image: str = "image",
        undefined: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """Score one SR image with every available per-image metric.

        A metric with no finite value for this image (:class:`MetricUndefined`, e.g. NIQE of a flat
        output of a collapsed 2-bit model) raises, unless ``undefined`` is a dict: then the reason is
        stored there under the metric's name and the metric is left out of the returned scores, so
        one undefined score does not discard the image's other metrics.
        """
        scores: dict[str, float] = {}
        for name in self.per_image:
            metric = self.metrics[name]
            ref = {"fr": hr, "fp": fp, "nr": None}[metric.spec.kind]
            try:
                scores[name] = metric.score(sr, ref, image=image)
            except MetricUndefined as exc:
                if undefined is None:
                    raise
                undefined[name] = str(exc)
        return scores

    def score_folders(self, sr_dir: str | Path, hr_dir: str | Path) -> dict[str, float]:
        return {
            name: self.metrics[name].score_folders(sr_dir, hr_dir) for name in self.folder_level
        }

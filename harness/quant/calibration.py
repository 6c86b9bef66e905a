"""Calibration data: PassionSR's protocol (methods.md §6.4) as a reusable, cached builder.

Protocol: N seeded random LR crops (PassionSR: 500 crops of 128×128 from DIV2K-train bicubic ×4)
with the aligned HR crop at ``scale``× the coordinates (512×512), and FP teacher tensors computed
through the base model exactly as in evaluation:

- ``x``   = PIL bicubic ×scale of the LR crop, in [-1, 1] (OSEDiff's preprocessing);
- ``z_l`` = posterior sample of the VAE encoder × scaling factor, one generator seeded with the
  model's ``settings.seed`` per crop (so every crop gets the noise a single image gets at evaluation;
  PassionSR draws from one global stream instead — a documented deviation, [RECON]);
- ``eps`` = UNet(z_L, T) with T = ``settings.timestep`` (999) and the constant prompt embedding;
- ``z_h`` = x0 from (z_L, ε) in float64;
- ``image`` = VAE decoder(z_H) clamped to [-1, 1] (no colour fix);
- ``hr``  = the aligned HR crop (PassionSR's ``cali_g``), in [0, 1].

Sources: a list of HR/LR pairs (the HR must be exactly ``scale``× the LR, else
:class:`DatasetError`), or HR images whose LR is made here by PIL bicubic ÷scale of the whole image
(HR sizes not divisible by ``scale`` are trimmed at the right/bottom to a multiple first; the trim is
recorded per crop). Sources smaller than the crop are an error, never skipped.

Crop selection: ``numpy.random.default_rng(seed)``; for each of the N crops a source index, then the
LR top-left corner, uniformly. The crop list (source file names and boxes) and its hash are recorded.

Caching: tensors are stored under ``harness.paths.cache_dir()/calibration/<key>.safetensors``, where
the key hashes the model identity, the crop list with the crop pixels, the settings and the
inference settings that affect the teacher (timestep, seed, posterior sampling, upscale). A corrupt
cache file is rebuilt (and the rebuild recorded).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.errors import ConfigError, DatasetError
from harness.images import load_image, to_uint8
from harness.model import pil_bicubic_upsample

CACHE_VERSION = 1


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibration set is drawn (PassionSR defaults: 500 crops of 128 → 512, seed 42)."""

    n: int = 500
    lr_crop: int = 128
    scale: int = 4
    seed: int = 42
    teacher_batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("n", "lr_crop", "scale", "teacher_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CropRecord:
    """One calibration crop: where it came from (file names, boxes as x, y, w, h)."""

    index: int
    hr_file: str
    lr_file: str | None
    lr_box: tuple[int, int, int, int]
    hr_box: tuple[int, int, int, int]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "hr_file": self.hr_file,
            "lr_file": self.lr_file,
            "lr_box": list(self.lr_box),
            "hr_box": list(self.hr_box),
            "notes": list(self.notes),
        }


@dataclass
class _Source:
    name_hr: str
    name_lr: str | None
    hr: np.ndarray  # H x W x 3 float32 [0, 1]
    lr: np.ndarray  # h x w x 3 float32 [0, 1]
    notes: tuple[str, ...] = ()


@dataclass
class CalibrationBatch:
    """A batch of calibration crops with their FP teacher tensors (all float32, NCHW)."""

    indices: list[int]
    lr: torch.Tensor  # [B, 3, h, w] in [0, 1]
    hr: torch.Tensor  # [B, 3, H, W] in [0, 1]
    x: torch.Tensor  # [B, 3, H, W] upsampled LR in [-1, 1]
    z_l: torch.Tensor
    eps: torch.Tensor
    z_h: torch.Tensor
    image: torch.Tensor  # FP decoded image in [-1, 1]

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class CalibrationSet:
    """N calibration crops and their FP teacher tensors (see the module docstring)."""

    settings: CalibrationSettings
    crops: list[CropRecord]
    lr: torch.Tensor  # uint8 [N, 3, h, w]
    hr: torch.Tensor  # uint8 [N, 3, H, W]
    z_l: torch.Tensor
    eps: torch.Tensor
    z_h: torch.Tensor
    image: torch.Tensor
    model_identity: str
    timestep: int
    inference: dict
    cache_key: str
    crops_hash: str
    source_kind: str  # "pairs" | "hr_bicubic"
    cache_status: str = "built"
    cache_path: str | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.crops)

    def batch(
        self, indices: Sequence[int], device: torch.device | str | None = None
    ) -> CalibrationBatch:
        idx = list(indices)
        lr = self.lr[idx].float() / 255.0
        up = torch.cat(
            [pil_bicubic_upsample(lr[i : i + 1], self.settings.scale) for i in range(len(idx))]
        )

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device) if device is not None else t

        return CalibrationBatch(
            indices=idx,
            lr=dev(lr),
            hr=dev(self.hr[idx].float() / 255.0),
            x=dev(up * 2.0 - 1.0),
            z_l=dev(self.z_l[idx]),
            eps=dev(self.eps[idx]),
            z_h=dev(self.z_h[idx]),
            image=dev(self.image[idx]),
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> Iterator[CalibrationBatch]:
        """Batches in order (or shuffled with ``seed``); the last batch may be smaller."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        order = list(range(len(self)))
        if shuffle:
            order = torch.randperm(
                len(self), generator=torch.Generator().manual_seed(seed)
            ).tolist()
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size], device)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def record(self) -> dict:
        return {
            "settings": self.settings.to_dict(),
            "source_kind": self.source_kind,
            "n": len(self),
            "timestep": self.timestep,
            "inference": self.inference,
            "model_identity": self.model_identity,
            "crops_hash": self.crops_hash,
            "cache_key": self.cache_key,
            "cache_status": self.cache_status,
            "crops": [c.to_dict() for c in self.crops],
        }


# --------------------------------------------------------------------------- sources


def _pair_paths(pair) -> tuple[Path, Path]:
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return Path(pair[0]), Path(pair[1])
    for hr_attr, lr_attr in (("hr_path", "lr_path"), ("hr", "lr")):
        if hasattr(pair, hr_attr) and hasattr(pair, lr_attr):
            return Path(getattr(pair, hr_attr)), Path(getattr(pair, lr_attr))
    raise DatasetError(
        f"a calibration pair must be (hr_path, lr_path) or have .hr/.lr paths, got {pair!r}"
    )


def _load_pairs(pairs, scale: int) -> list[_Source]:
    sources = []
    for pair in pairs:
        hr_path, lr_path = _pair_paths(pair)
        hr, lr = load_image(hr_path), load_image(lr_path)
        if (hr.height, hr.width) != (lr.height * scale, lr.width * scale):
            raise DatasetError(
                f"calibration pair {hr_path} ({hr.width}x{hr.height}) and {lr_path} "
                f"({lr.width}x{lr.height}) are not exactly x{scale}; refusing to re-pair or resize"
            )
        notes = tuple(f"hr: {c}" for c in hr.conversions) + tuple(
            f"lr: {c}" for c in lr.conversions
        )
        sources.append(_Source(hr_path.name, lr_path.name, hr.array, lr.array, notes))
    return sources


def bicubic_downscale(hr01: np.ndarray, scale: int) -> np.ndarray:
    """HR float [0, 1] (H, W divisible by ``scale``) → LR float k/255 by PIL bicubic ÷scale."""
    image = Image.fromarray(to_uint8(hr01))
    small = image.resize((image.width // scale, image.height // scale), Image.BICUBIC)
    return np.asarray(small, dtype=np.float32) / 255.0


def _load_hr_only(hr_images, scale: int) -> list[_Source]:
    sources = []
    for item in hr_images:
        path = Path(item)
        hr = load_image(path)
        notes = [f"hr: {c}" for c in hr.conversions]
        array = hr.array
        height, width = (hr.height // scale) * scale, (hr.width // scale) * scale
        if (height, width) != (hr.height, hr.width):
            notes.append(
                f"hr trimmed {hr.width}x{hr.height} -> {width}x{height} (multiple of {scale})"
            )
            array = array[:height, :width]
        if hr.bit_depth != 8:
            notes.append("hr quantized to 8 bit before bicubic downscaling")
        lr = bicubic_downscale(array, scale)
        notes.append(f"lr = PIL bicubic /{scale} of the hr")
        sources.append(_Source(path.name, None, array, lr, tuple(notes)))
    return sources


def select_crops(sources: list[_Source], settings: CalibrationSettings) -> list[CropRecord]:
    """The seeded crop list (module docstring)."""
    c, s = settings.lr_crop, settings.scale
    small = [src.name_hr for src in sources if min(src.lr.shape[:2]) < c]
    if small:
        raise DatasetError(
            f"calibration source(s) smaller than the {c}px LR crop: {', '.join(small[:5])}"
            + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        )
    rng = np.random.default_rng(settings.seed)
    crops = []
    for i in range(settings.n):
        k = int(rng.integers(len(sources)))
        src = sources[k]
        h, w = src.lr.shape[:2]
        y = int(rng.integers(0, h - c + 1))
        x = int(rng.integers(0, w - c + 1))
        crops.append(
            CropRecord(
                i, src.name_hr, src.name_lr, (x, y, c, c), (x * s, y * s, c * s, c * s), src.notes
            )
        )
    return crops


# --------------------------------------------------------------------------- teacher


def encode_per_sample(model, x: torch.Tensor) -> torch.Tensor:
    """z_L for a batch, each sample with its own generator seeded ``model.settings.seed`` (the noise a
    single image gets in ``super_resolve``)."""
    moments = model.encode_moments(x)
    latents = []
    for i in range(x.shape[0]):
        generator = torch.Generator().manual_seed(model.settings.seed)
        latents.append(model.latent_from_moments(moments[i : i + 1], generator))
    return torch.cat(latents)


def pipeline_forward(
    model, x: torch.Tensor, timestep: int | None = None
) -> dict[str, torch.Tensor]:
    """The untiled one-step pipeline with per-sample posterior noise: ``z_l``, ``eps``, ``z_h``, ``image``."""
    z_l = encode_per_sample(model, x)
    eps = model.predict_eps(z_l, timestep)
    z_h = model.x0_from_eps(z_l, eps, timestep)
    return {"z_l": z_l, "eps": eps, "z_h": z_h, "image": model.decode(z_h)}


def _hash_crops(crops: list[CropRecord], lr: torch.Tensor, hr: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([c.to_dict() for c in crops], sort_keys=True).encode())
    digest.update(lr.numpy().tobytes())
    digest.update(hr.numpy().tobytes())
    return digest.hexdigest()


def _inference_record(model) -> dict:
    s = model.settings
    return {
        "timestep": s.timestep,
        "seed": s.seed,
        "sample_posterior": s.sample_posterior,
        "upscale": s.upscale,
    }


def build_calibration_set(
    model,
    *,
    pairs: Sequence | None = None,
    hr_images: Sequence | None = None,
    settings: CalibrationSettings | None = None,
    cache: bool = True,
    cache_root: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CalibrationSet:
    """Build (or load from cache) the calibration set for ``model`` (an FP ``OneStepSR``).

    Give exactly one of ``pairs`` (HR/LR path pairs) or ``hr_images`` (HR paths; LR by PIL bicubic).
    """
    from harness.quant.io import model_identity

    settings = settings or CalibrationSettings()
    if (pairs is None) == (hr_images is None):
        raise ConfigError("give exactly one of pairs= or hr_images= to build a calibration set")
    if model.settings.upscale != settings.scale:
        raise ConfigError(
            f"calibration scale {settings.scale} differs from the model's upscale {model.settings.upscale}"
        )
    f = getattr(model, "vae_factor", 8)
    if (settings.lr_crop * settings.scale) % (f * 4):
        raise ConfigError(
            f"LR crop {settings.lr_crop} gives a {settings.lr_crop * settings.scale}px image; it must be "
            f"a multiple of {f * 4} (VAE factor {f} x UNet downsampling)"
        )
    items = list(pairs if pairs is not None else hr_images)
    if not items:
        raise DatasetError("no calibration images were given")
    source_kind = "pairs" if pairs is not None else "hr_bicubic"
    sources = (
        _load_pairs(items, settings.scale)
        if pairs is not None
        else _load_hr_only(items, settings.scale)
    )
    crops = select_crops(sources, settings)
    by_name = {src.name_hr: src for src in sources}
    lr_list, hr_list = [], []
    for crop in crops:
        src = by_name[crop.hr_file]
        x, y, w, h = crop.lr_box
        hx, hy, hw, hh = crop.hr_box
        lr_list.append(to_uint8(np.ascontiguousarray(src.lr[y : y + h, x : x + w])))
        hr_list.append(to_uint8(np.ascontiguousarray(src.hr[hy : hy + hh, hx : hx + hw])))
    lr = torch.from_numpy(np.stack(lr_list)).permute(0, 3, 1, 2).contiguous()
    hr = torch.from_numpy(np.stack(hr_list)).permute(0, 3, 1, 2).contiguous()
    identity = model_identity(model)
    crops_hash = _hash_crops(crops, lr, hr)
    inference = _inference_record(model)
    key_material = {
        "cache_version": CACHE_VERSION,
        "model": identity,
        "crops": crops_hash,
        "settings": settings.to_dict(),
        "inference": inference,
        "source_kind": source_kind,
    }
    cache_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    common = dict(
        settings=settings, crops=crops, lr=lr, hr=hr, model_identity=identity,
        timestep=model.settings.timestep, inference=inference, cache_key=cache_key,
        crops_hash=crops_hash, source_kind=source_kind,
    )  # fmt: skip

    path = None
    status = "built"
    if cache:
        from harness.paths import cache_dir

        root = Path(cache_root) if cache_root is not None else cache_dir()
        path = root / "calibration" / f"{cache_key}.safetensors"
        if path.is_file():
            try:
                stored = load_file(str(path))
                if int(stored["z_l"].shape[0]) == len(crops):
                    return CalibrationSet(
                        **common, z_l=stored["z_l"], eps=stored["eps"], z_h=stored["z_h"],
                        image=stored["image"], cache_status="hit", cache_path=str(path),
                    )  # fmt: skip
                status = "rebuilt (cached file had the wrong size)"
            except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
                status = "rebuilt (cached file was corrupt)"

    teacher = {"z_l": [], "eps": [], "z_h": [], "image": []}
    n = len(crops)
    bs = settings.teacher_batch_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n, bs):
            lr01 = lr[start : start + bs].float() / 255.0
            up = torch.cat(
                [pil_bicubic_upsample(lr01[i : i + 1], settings.scale) for i in range(len(lr01))]
            )
            device = model.alphas_cumprod.device
            out = pipeline_forward(model, (up * 2.0 - 1.0).to(device))
            for key in teacher:
                teacher[key].append(out[key].detach().float().cpu())
            if progress is not None:
                progress("calibration teacher", min(start + bs, n), n)
    model.train(was_training)
    tensors = {key: torch.cat(values).contiguous() for key, values in teacher.items()}
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise DatasetError(f"the FP teacher produced non-finite {key}; check the base model")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"cache_key": cache_key, "crops_hash": crops_hash})
        os.replace(tmp, path)
    return CalibrationSet(
        **common, **tensors, cache_status=status, cache_path=None if path is None else str(path)
    )


# --------------------------------------------------------------------------- calibration passes


def calibration_passes(
    qmodel,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    scope: str,
    progress: Callable[[str, int, int], None] | None = None,
    after_batch: Callable[[CalibrationBatch], None] | None = None,
    stage: str = "calibration",
) -> int:
    """Run the (quantized) model over the calibration set once, without gradients, so that attached
    observers see every activation. Scope ``UV``: the whole pipeline from the upsampled LR
    (quantized encoder → UNet → decoder; the UNet sees the quantized encoder's latents, as in
    PassionSR's init pass). Scope ``U``: the UNet on the FP teacher latents z_L.

    ``after_batch(batch)`` runs extra forwards (e.g. PTQ4DM's literal noisy latents). A non-finite
    output raises :class:`DivergedError` naming the batch, the stage and the first quantized module
    whose output was non-finite. Returns the number of batches.
    """
    from harness.errors import DivergedError
    from harness.quant.state import first_nonfinite_module

    model = getattr(qmodel, "model", qmodel)
    device = model.alphas_cumprod.device
    total = calibration.num_batches(batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k, batch in enumerate(calibration.batches(batch_size, device=device)):
                if scope == "UV":

                    def run(batch=batch):
                        return pipeline_forward(model, batch.x)["image"]

                else:

                    def run(batch=batch):
                        return model.predict_eps(batch.z_l)

                out = run()
                if not bool(torch.isfinite(out).all()):
                    culprit = first_nonfinite_module(model, run)
                    raise DivergedError(
                        f"{stage}: non-finite {'image' if scope == 'UV' else 'UNet'} output at batch "
                        f"{k} (crops {batch.indices[0]}..{batch.indices[-1]}); first non-finite "
                        f"quantized module: {culprit or 'none found (NaN arose outside quant layers)'}"
                    )
                if after_batch is not None:
                    after_batch(batch)
                if progress is not None:
                    progress(stage, k + 1, total)
    finally:
        model.train(was_training)
    return total


def calibration_sources(source: str) -> dict:
    """``tiny-train`` (the tiny model's training photos), ``hr:DIR`` (HR images; LR by bicubic) or a
    dataset name (its HR/LR pairs) → keyword arguments for ``build_calibration_set``."""
    if source == "tiny-train":
        from harness.tiny.photos import training_sources

        return {"hr_images": [s.path() for s in training_sources()]}
    if source.startswith("hr:"):
        from harness.datasets import IMAGE_EXTENSIONS

        folder = Path(source[3:]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"calibration folder {folder} does not exist")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return {"hr_images": images}
    from harness.datasets import get_dataset

    return {"pairs": get_dataset(source).resolve().pairs}

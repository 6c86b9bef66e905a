"""Where things are: the repository, dataset roots and caches.

Dataset roots are searched in this order: an explicit ``root`` argument, the ``QBENCH_DATA``
environment variable (one or more directories separated by ``os.pathsep``), then ``../shared/data``
next to the repository (the development machine's evaluation images).
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The repository root (the directory that holds ``harness/`` and ``datasets/``)."""
    return Path(__file__).resolve().parent.parent


def datasets_dir() -> Path:
    """Directory of dataset definition files and the embedded demo images."""
    return repo_root() / "datasets"


def data_roots() -> list[Path]:
    """Candidate parent directories that hold dataset folders, in search order."""
    roots: list[Path] = []
    env = os.environ.get("QBENCH_DATA", "")
    roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    shared = repo_root().parent / "shared" / "data"
    if shared.is_dir():
        roots.append(shared)
    return roots


def cache_dir() -> Path:
    """qbench's cache (calibration teacher tensors, FP references): ``$QBENCH_CACHE`` or ``~/.cache/qbench``."""
    env = os.environ.get("QBENCH_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "qbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def torch_home() -> Path:
    """``$TORCH_HOME`` or ``~/.cache/torch``: where pyiqa and torchvision keep downloaded weights."""
    env = os.environ.get("TORCH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "torch"

"""The exceptions qbench raises at its boundaries.

Every error that a user can cause (a bad file, a bad config, a missing weight) is a subclass of
:class:`QBenchError`, so the CLI can print it as one clear message instead of a traceback.
"""

from __future__ import annotations


class QBenchError(Exception):
    """Base class: an error with a message meant for the user."""


class ConfigError(QBenchError):
    """A config value or file is invalid (unknown key, wrong type, out of range)."""


class DatasetError(QBenchError):
    """A dataset root or layout is wrong: missing directory, unpaired files, bad counts."""


class ImageError(QBenchError):
    """An image file cannot be decoded or violates a documented limit."""


class MetricUnavailable(QBenchError):
    """A metric cannot run here, typically because its weights are missing and cannot be fetched."""


class ModelError(QBenchError):
    """A model directory or checkpoint is missing, malformed or for another base model."""


class DivergedError(QBenchError):
    """A computation produced NaN or Inf."""


class MetricUndefined(QBenchError):
    """A metric has no finite value for one image (e.g. NIQE of a flat image, whose block
    covariance is singular). The image itself is fine; the score is recorded as undefined."""


class UnknownNameError(QBenchError, KeyError):
    """An unknown registry name (method, dataset, metric), with close matches suggested."""

    def __init__(self, kind: str, name: str, known: list[str]):
        import difflib

        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}."
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]

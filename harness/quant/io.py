"""Saving a quantized model and loading it back onto a fresh base model without recalibrating.

Format (a directory):

- ``quantized.json``: ``format`` = ``"qbench-quantized"``, ``format_version``, the label
  "simulated quantization: accuracy, not speed", the method config (``MethodConfig.to_dict``), the
  base model's name/path (if known) and **identity hash**, every target with its bits and quantizer
  specs, the list of saved tensor keys and the calibration record.
- ``quant_params.safetensors``: every state tensor of the quantized model that the base model does
  not have — quantizer ranges (``x_min``, ``x_max``, ``initialized``) and anything a method learned
  (LET scales, low-rank factors, …). Base weights are not duplicated: they come from the base model.

Loading rebuilds the same targets with the method's layer factories, checks that the fresh base
model has the recorded identity (else :class:`ModelError`: the parameters were calibrated for another
model), and loads the tensors strictly (missing, unexpected or mis-shaped keys are a
:class:`ModelError` naming the file). Corrupt or truncated files are a :class:`ModelError` naming the
file.

The identity hash is SHA-256 over every parameter and buffer (persistent or not, so the constant
prompt embedding and ᾱ table count) in name order: name, dtype, shape and raw bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from harness.errors import ConfigError, ModelError, QBenchError

FORMAT = "qbench-quantized"
FORMAT_VERSION = 1
CONFIG_FILE = "quantized.json"
PARAMS_FILE = "quant_params.safetensors"


def model_identity(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (module docstring)."""
    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.named_parameters():
        tensors[name] = tensor
    for name, tensor in model.named_buffers():
        tensors.setdefault(name, tensor)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_quantized(qmodel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``quant_params.safetensors`` then ``quantized.json`` into ``out_dir`` (created).

    Both files are written atomically (temporary file in the same directory, fsync, rename; the
    temporary file is removed if the write fails, e.g. on a full disk), and the record last (an
    older record is removed first): a directory whose ``quantized.json`` exists holds the complete
    parameters file that belongs to it.
    """
    from harness.fsutil import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().cpu().contiguous().clone() for k, v in qmodel.quant_state_dict().items()
    }
    # The record is the commit record: drop an older one first, so that a failure below never
    # leaves an old record next to new (or half-replaced) parameters.
    (out / CONFIG_FILE).unlink(missing_ok=True)
    params_path = out / PARAMS_FILE
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{PARAMS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            tensors, tmp, metadata={"format": FORMAT, "base_model_identity": qmodel.base_identity}
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, params_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **qmodel.record(),
        "targets": [t.to_dict() for t in qmodel.targets.values()],
        "param_keys": sorted(tensors),
        "extra": extra or {},
    }
    atomic_write_text(out / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return out


def read_record(path: str | Path) -> dict:
    """Read and validate ``quantized.json`` of a saved quantized model directory."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
        raise ModelError(f"{config_path}: no saved quantized model here (missing {CONFIG_FILE})")
    try:
        record = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path}: corrupt quantized-model record ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelError(f"{config_path}: not a {FORMAT} record")
    if record.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{config_path}: format_version {record.get('format_version')!r} is not supported "
            f"(expects {FORMAT_VERSION})"
        )
    for key in ("method_config", "base_model_identity", "targets", "param_keys"):
        if key not in record:
            raise ModelError(f"{config_path}: missing field {key!r}")
    return record


def load_quantized(path: str | Path, base_model: nn.Module | None = None):
    """Load a saved quantized model onto ``base_model`` (a fresh, unquantized base model; default:
    ``harness.loaders.load_model(record["base_model"])``). Returns a ``QuantizedModel``."""
    from harness.quant.api import (
        MethodConfig,
        QuantizedModel,
        Target,
        _check_plain_model,
        apply_targets,
    )
    from harness.registry import get_method

    directory = Path(path)
    record = read_record(directory)
    config_path = directory / CONFIG_FILE
    try:
        config = MethodConfig.from_dict(record["method_config"])
        targets = {t["name"]: Target.from_dict(t) for t in record["targets"]}
    except (QBenchError, KeyError, TypeError) as exc:
        raise ModelError(f"{config_path}: invalid method config or targets ({exc})") from exc
    if base_model is None:
        name = record.get("base_model")
        if not name:
            raise ModelError(
                f"{config_path}: no base model recorded; pass the base model explicitly"
            )
        from harness.loaders import load_model

        base_model = load_model(name)
    _check_plain_model(base_model)
    identity = model_identity(base_model)
    if identity != record["base_model_identity"]:
        raise ModelError(
            f"{config_path}: these quantization parameters were made for base model "
            f"{record['base_model_identity'][:12]} ({record.get('base_model') or 'unnamed'}), "
            f"not for the given model {identity[:12]}"
        )
    params_path = directory / PARAMS_FILE
    if not params_path.is_file():
        raise ModelError(f"{params_path}: missing quantization parameters file")
    try:
        tensors = load_file(str(params_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{params_path}: corrupt or truncated safetensors file ({exc})") from exc
    if sorted(tensors) != sorted(record["param_keys"]):
        raise ModelError(f"{params_path}: tensor keys do not match {CONFIG_FILE}")

    base_keys = tuple(base_model.state_dict().keys())
    method = get_method(config.method).create()
    method.configure(config)
    try:
        apply_targets(base_model, targets, method)
    except (QBenchError, TypeError) as exc:
        raise ModelError(f"{config_path}: cannot rebuild the quantized layers ({exc})") from exc
    expected = {k: v for k, v in base_model.state_dict().items() if k not in set(base_keys)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{params_path}: does not fit the rebuilt model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"{params_path}: {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )
    result = base_model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"{params_path}: unexpected keys {result.unexpected_keys[:3]}")
    qmodel = QuantizedModel(
        base_model, config, targets, identity, base_keys, record.get("base_model")
    )
    qmodel.calibration_record = record.get("calibration", {})
    qmodel.set_quant_state(True, True)
    method.after_load(qmodel)
    return qmodel


__all__ = ["ConfigError", "load_quantized", "model_identity", "read_record", "save_quantized"]

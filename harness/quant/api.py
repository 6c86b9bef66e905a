"""The one entry point, ``quantize(model, config, calibration) -> QuantizedModel``, and method configs.

Flow (torchao's ``quantize_`` and optimum-quanto's quantize → calibrate → freeze, written for
OneStepSR):

1. :class:`MethodConfig` (validated, versioned) names the method, the bits (``"W4A4"``), the scope
   (``U`` = UNet, ``UV`` = UNet + VAE encoder + decoder, PassionSR's main setting and the default),
   ``include``/``exclude`` patterns, per-name bit ``overrides`` (default: PassionSR's 8-bit list) and
   the split/attention switches.
2. :func:`resolve_targets` turns the config into one :class:`Target` per quantized module (fully
   qualified names under the ``OneStepSR`` root) with its bits and quantizer specs from the method.
3. :func:`apply_targets` replaces ``nn.Conv2d``/``nn.Linear`` with quantized layers and installs the
   quantized attention processor; the model is modified **in place**.
4. The method's ``calibrate`` hook sets the ranges (and trains whatever it trains).
5. The returned :class:`QuantizedModel` records which module got which bits.

Patterns (``include``, ``exclude``, ``overrides`` keys) are shell globs over fully qualified names
(``fnmatch``; ``*`` also crosses dots) or, with a ``re:`` prefix, Python regular expressions that must
match the whole name. A pattern matches a module if it matches the module's name or the name of one of
its ancestors (so ``unet.mid_block`` selects everything inside the mid block). A user-given pattern
that matches no candidate module is a :class:`ConfigError`.

PassionSR's 8-bit list (methods.md §6.1, ``first_layer_name``) in diffusers names: LDM's UNet
``time_embed.0`` is diffusers' ``unet.time_embedding.linear_1`` and LDM's ``out.2`` is
``unet.conv_out``; the VAE names ``quant_conv``, ``post_quant_conv``, ``encoder.conv_out`` and
``decoder.conv_out`` are the same in both. PassionSR matches by substring; here the six names are
exact. In LDM's naming ``time_embed.0`` and ``out.2`` occur only at the UNet's top level (ResBlocks
use ``out_layers.*``), so both select the same six layers.
The default list is applied to the modules in scope only (with scope ``U`` the four VAE entries are
dropped); user-given overrides must each match a quantized module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.errors import ConfigError, ModelError
from harness.quant.attention import (
    AttentionQuantizers,
    install_attention_quantizers,
    is_diffusers_attention,
)
from harness.quant.layers import SPLIT_AXES, LayerQuantSpec, QuantLayer, quant_layer_for
from harness.quant.quantizer import MAX_BITS, MIN_BITS, QuantSpec
from harness.quant.state import (
    check_quantizers_finite,
    iter_attention_quantizers,
    iter_quant_layers,
    set_quant_state,
    uncalibrated_quantizers,
)

SCOPES = ("U", "UV")
COMPONENTS = ("unet", "vae.encoder", "vae.decoder")

PASSIONSR_8BIT_OVERRIDES: dict[str, str] = {
    "unet.time_embedding.linear_1": "W8A8",  # LDM time_embed.0
    "unet.conv_out": "W8A8",  # LDM out.2
    "vae.quant_conv": "W8A8",
    "vae.post_quant_conv": "W8A8",
    "vae.encoder.conv_out": "W8A8",
    "vae.decoder.conv_out": "W8A8",
}
"""PassionSR's forced-W8A8 layers (methods.md §6.1) in diffusers names."""

LDM_TO_DIFFUSERS_8BIT = {
    "time_embed.0": "unet.time_embedding.linear_1",
    "out.2": "unet.conv_out",
    "quant_conv": "vae.quant_conv",
    "post_quant_conv": "vae.post_quant_conv",
    "encoder.conv_out": "vae.encoder.conv_out",
    "decoder.conv_out": "vae.decoder.conv_out",
}

_BITS_RE = re.compile(r"^W(\d+)A(\d+)$")


# --------------------------------------------------------------------------- bits


@dataclass(frozen=True)
class BitWidths:
    weights: int
    activations: int

    def __str__(self) -> str:
        return f"W{self.weights}A{self.activations}"


def parse_bits(text: str) -> BitWidths:
    """``"W4A4"`` → ``BitWidths(4, 4)``; each in [2, 8], else :class:`ConfigError` naming the value."""
    if not isinstance(text, str):
        raise ConfigError(f"bits must be a string like 'W4A4', got {text!r}")
    match = _BITS_RE.match(text.strip().upper())
    if not match:
        raise ConfigError(f"bits {text!r} is not of the form 'W<b>A<b>' (e.g. 'W4A4', 'W8A8')")
    w, a = int(match.group(1)), int(match.group(2))
    for kind, b in (("weight", w), ("activation", a)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(
                f"bits {text!r}: {kind} bits must be in [{MIN_BITS}, {MAX_BITS}], got {b} "
                "(fake quantization here covers 2..8 bits; use the 'fp' method for full precision)"
            )
    return BitWidths(w, a)


# --------------------------------------------------------------------------- patterns


def _compile(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"a module pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(
                f"pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from exc
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _self_and_ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def pattern_matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` matches ``name`` or one of its ancestors (see the module docstring)."""
    match = _compile(pattern)
    return any(match(n) for n in _self_and_ancestors(name))


def component_of(name: str) -> str | None:
    """``unet``, ``vae.encoder`` (incl. ``vae.quant_conv``), ``vae.decoder`` (incl.
    ``vae.post_quant_conv``) or None for a fully qualified module name."""
    if name.startswith("unet."):
        return "unet"
    if name.startswith("vae.encoder.") or name == "vae.quant_conv":
        return "vae.encoder"
    if name.startswith("vae.decoder.") or name == "vae.post_quant_conv":
        return "vae.decoder"
    return None


def in_scope(name: str, scope: str) -> bool:
    component = component_of(name)
    if component is None:
        return False
    return component == "unet" if scope == "U" else True


# --------------------------------------------------------------------------- config


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a JSON-ish value against a type hint (bool/int/float/str, tuple[...], dict,
    Optional, Literal). Lists become tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {
            _coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base config of every method: validated on construction, versioned, JSON round-trip.

    Subclasses add method fields (with defaults) and may raise ``config_version``. Fields:

    - ``method``: registered method name (variants have their own names).
    - ``bits``: ``"W<b>A<b>"`` with 2 ≤ b ≤ 8.
    - ``scope``: ``"U"`` or ``"UV"`` (default).
    - ``include``/``exclude``: module patterns (module docstring); empty include = everything in scope.
    - ``overrides``: ``{pattern: "W8A8"}``; None = PassionSR's 8-bit list (:data:`PASSIONSR_8BIT_OVERRIDES`).
    - ``split_skip_inputs``: separate quantizers for the two halves of the concatenated skip inputs of
      UNet up-block ResNets (``conv1``, ``conv_shortcut``), split at the true concat boundary
      (Q-Diffusion's shortcut split).
    - ``split_all_unet_inputs``: PassionSR's literal ``split: True``: every UNet conv/linear input is
      split at C//2 (overrides the skip boundary); ``linear_split_axis="token"`` adds quirk Q3.
    - ``quantize_attention``: quantize the UNet attention matmul operands (Q, K, V, softmax output).
    - ``quantize_bias``: fake-quantize biases per tensor at the weight bits (PassionSR does).
    """

    config_version: ClassVar[int] = 1

    method: str = ""
    bits: str = "W4A4"
    scope: str = "UV"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: dict[str, str] | None = None
    split_skip_inputs: bool = True
    split_all_unet_inputs: bool = False
    linear_split_axis: str = "channel"
    quantize_attention: bool = True
    quantize_bias: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(
                getattr(self, f.name), hints[f.name], f"{self.method or 'config'}.{f.name}"
            )
            object.__setattr__(self, f.name, value)
        self.validate()

    # -- validation
    def validate(self) -> None:
        """Field checks beyond types; subclasses extend (call ``super().validate()``)."""
        if not self.method:
            raise ConfigError("config.method must name a registered method")
        self.bit_widths  # noqa: B018 - parses and validates
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.linear_split_axis not in SPLIT_AXES:
            raise ConfigError(
                f"linear_split_axis must be one of {SPLIT_AXES}, got {self.linear_split_axis!r}"
            )
        for pattern in (*self.include, *self.exclude, *(self.overrides or {})):
            _compile(pattern)
        for pattern, bits in (self.overrides or {}).items():
            try:
                parse_bits(bits)
            except ConfigError as exc:
                raise ConfigError(f"override {pattern!r}: {exc}") from exc

    @property
    def bit_widths(self) -> BitWidths:
        return parse_bits(self.bits)

    @property
    def effective_overrides(self) -> dict[str, str]:
        return dict(PASSIONSR_8BIT_OVERRIDES if self.overrides is None else self.overrides)

    # -- serialization
    def to_dict(self) -> dict:
        data = {"config_version": self.config_version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict) -> MethodConfig:
        """Rebuild a config from :meth:`to_dict` output. Called on the base class it looks the config
        class up in the method registry by ``data["method"]``."""
        if not isinstance(data, dict):
            raise ConfigError(f"a method config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        target = cls
        if cls is MethodConfig:
            from harness.registry import get_method

            target = get_method(str(data.get("method", ""))).config_cls
        version = data.pop("config_version", None)
        if version != target.config_version:
            raise ConfigError(
                f"config_version {version!r} is not supported by {target.__name__} "
                f"(expects {target.config_version})"
            )
        known = set(target.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown field(s) for method {data.get('method')!r}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return target(**data)

    def replace(self, **changes) -> MethodConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One quantized module: its kind, component, bits and quantizer specs."""

    name: str
    kind: str  # "conv2d" | "linear" | "attention"
    component: str
    w_bits: int | None
    a_bits: int
    override: str | None = None
    layer: LayerQuantSpec | None = None
    attention: QuantSpec | None = None

    @property
    def bits_label(self) -> str:
        return f"A{self.a_bits}" if self.kind == "attention" else f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "component": self.component,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "override": self.override,
            "layer": None if self.layer is None else self.layer.to_dict(),
            "attention": None if self.attention is None else self.attention.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        return cls(
            name=data["name"],
            kind=data["kind"],
            component=data["component"],
            w_bits=data["w_bits"],
            a_bits=data["a_bits"],
            override=data.get("override"),
            layer=None if data.get("layer") is None else LayerQuantSpec.from_dict(data["layer"]),
            attention=None
            if data.get("attention") is None
            else QuantSpec.from_dict(data["attention"]),
        )


def _kind_of(module: nn.Module) -> str | None:
    if type(module) is nn.Conv2d:
        return "conv2d"
    if type(module) is nn.Linear:
        return "linear"
    if is_diffusers_attention(module):
        return "attention"
    return None


def _check_plain_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, (QuantLayer, AttentionQuantizers)):
            raise ModelError(
                f"the model is already quantized ({name}); quantize a fresh base model"
            )
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            raise ModelError(
                f"{name} is an unmerged LoRA layer; merge LoRA into the base weights before quantizing"
            )


def candidate_modules(model: nn.Module, config: MethodConfig) -> dict[str, str]:
    """Quantizable modules in the config's scope: ``{name: kind}``. Attention modules are candidates
    only in the UNet and only with ``quantize_attention`` (VAE attention matmuls stay float)."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is None or not in_scope(name, config.scope):
            continue
        if kind == "attention" and (not config.quantize_attention or component_of(name) != "unet"):
            continue
        out[name] = kind
    return out


def skip_split_points(model: nn.Module, prefix: str = "unet") -> dict[str, int]:
    """``{layer name: split_at}`` for the layers that read the concatenated skip inputs of the UNet's
    up blocks: each up-block ResNet's ``conv1`` and ``conv_shortcut`` get
    ``split_at`` = channels of the upsampling path (diffusers concatenates ``[hidden, skip]``).

    The upsampling-path width is the output width of whatever ran before the ResNet: the previous
    ResNet of the same block, else the last ResNet of the previous up block (the upsampler keeps the
    width), else the mid block's last ResNet.
    """
    unet = model.get_submodule(prefix) if prefix else model
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return {}
    points: dict[str, int] = {}
    mid = getattr(unet, "mid_block", None)
    previous = mid.resnets[-1].out_channels if mid is not None and hasattr(mid, "resnets") else None
    for b, block in enumerate(up_blocks):
        for j, resnet in enumerate(block.resnets):
            hidden = previous
            total = resnet.in_channels
            if hidden is None or not 0 < hidden < total:
                raise ModelError(
                    f"cannot determine the skip split of {prefix}.up_blocks.{b}.resnets.{j}: "
                    f"input {total} channels, upsampling path {hidden}"
                )
            base = f"{prefix}.up_blocks.{b}.resnets.{j}"
            points[f"{base}.conv1"] = hidden
            if getattr(resnet, "conv_shortcut", None) is not None:
                points[f"{base}.conv_shortcut"] = hidden
            previous = resnet.out_channels
    return points


def _match_overrides(name: str, overrides: dict[str, str]) -> tuple[str | None, BitWidths | None]:
    matched = [(p, parse_bits(b)) for p, b in overrides.items() if pattern_matches(p, name)]
    if not matched:
        return None, None
    distinct = {str(b) for _, b in matched}
    if len(distinct) > 1:
        raise ConfigError(
            f"module {name} is matched by overrides with different bits: "
            + ", ".join(f"{p!r}→{b}" for p, b in matched)
        )
    return matched[0][0], matched[0][1]


def resolve_targets(
    model: nn.Module, config: MethodConfig, method: QuantMethod
) -> dict[str, Target]:
    """Config → ``{name: Target}`` (module docstring). Raises :class:`ConfigError` for patterns that
    match nothing and for conflicting overrides."""
    _check_plain_model(model)
    candidates = candidate_modules(model, config)
    if not candidates:
        raise ConfigError(f"no quantizable module in scope {config.scope!r}")
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(pattern_matches(pattern, n) for n in candidates):
                raise ConfigError(
                    f"{kind} pattern {pattern!r} matches no quantizable module in scope {config.scope!r}"
                )
    selected = {
        n: k
        for n, k in candidates.items()
        if (not config.include or any(pattern_matches(p, n) for p in config.include))
        and not any(pattern_matches(p, n) for p in config.exclude)
    }
    if not selected:
        raise ConfigError("include/exclude leave no module to quantize")
    overrides = config.effective_overrides
    if config.overrides is not None:
        for pattern in overrides:
            if not any(pattern_matches(pattern, n) for n in selected):
                raise ConfigError(
                    f"override pattern {pattern!r} matches no quantized module in scope {config.scope!r}"
                )
    else:  # the default list only applies where it names a selected module
        overrides = {
            p: b for p, b in overrides.items() if any(pattern_matches(p, n) for n in selected)
        }
    splits = (
        skip_split_points(model)
        if config.split_skip_inputs and "unet" in dict(model.named_children())
        else {}
    )
    default_bits = config.bit_widths
    modules = dict(model.named_modules())
    targets: dict[str, Target] = {}
    for name, kind in selected.items():
        pattern, bits = _match_overrides(name, overrides)
        bits = bits or default_bits
        component = component_of(name) or ""
        if kind == "attention":
            target = Target(name, kind, component, None, bits.activations, pattern)
            spec = method.attention_spec(target, config)
            targets[name] = dataclasses.replace(target, attention=spec)
            continue
        split_at = splits.get(name)
        if config.split_all_unet_inputs and component == "unet":
            in_dim = modules[name].weight.shape[1]
            groups = getattr(modules[name], "groups", 1)
            split_at = in_dim // 2 if in_dim >= 2 and groups == 1 else None
        target = Target(name, kind, component, bits.weights, bits.activations, pattern)
        spec = method.layer_spec(target, config, split_at)
        targets[name] = dataclasses.replace(target, layer=spec)
    return targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_targets(model: nn.Module, targets: dict[str, Target], method: QuantMethod) -> None:
    """Replace/instrument every target in place (layers first, then attention processors)."""
    modules = dict(model.named_modules())
    for name, target in targets.items():
        if name not in modules:
            raise ModelError(f"target module {name} does not exist in this model")
        module = modules[name]
        if target.kind == "attention":
            continue
        if _kind_of(module) != target.kind:
            raise ModelError(f"target {name} is a {type(module).__name__}, expected {target.kind}")
        _set_submodule(model, name, method.make_layer(module, target))
    for name, target in targets.items():
        if target.kind == "attention":
            module = model.get_submodule(name)
            install_attention_quantizers(
                module, target.attention, method.make_attention_quantizers(module, target)
            )


# --------------------------------------------------------------------------- method base


class QuantMethod:
    """Base class of a quantization method (one per file in ``methods/``).

    Register with ``@register_method("name", config_cls=...)``. Override :meth:`calibrate`; the spec
    and factory hooks default to PassionSR's quantizer framework (methods.md §6.1–6.2): weights
    per-output-channel asymmetric on the unsigned grid, activations and attention operands per tensor
    asymmetric, PassionSR rounding, optional per-tensor bias quantizer at the weight bits.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    quantizes_model: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    description: ClassVar[str] = ""

    # -- specs
    def configure(self, config: MethodConfig) -> None:
        """Called with the method's config before its layers are built (when quantizing and when
        loading a saved model), for layer factories that depend on config fields (e.g. ranks)."""

    def after_load(self, qmodel: QuantizedModel) -> None:
        """Called after a saved model's parameters are loaded (e.g. to restore an inference setting
        such as QArtSR's retraining timestep)."""

    def weight_spec(self, target: Target, config: MethodConfig) -> QuantSpec:
        return QuantSpec(bits=target.w_bits, granularity="channel", axis=0)

    def activation_spec(self, target: Target, config: MethodConfig) -> QuantSpec:
        return QuantSpec(bits=target.a_bits)

    def bias_spec(self, target: Target, config: MethodConfig) -> QuantSpec | None:
        return QuantSpec(bits=target.w_bits) if config.quantize_bias else None

    def layer_spec(
        self, target: Target, config: MethodConfig, split_at: int | None
    ) -> LayerQuantSpec:
        return LayerQuantSpec(
            weight=self.weight_spec(target, config),
            activation=self.activation_spec(target, config),
            bias=self.bias_spec(target, config),
            split_at=split_at,
            split_axis=config.linear_split_axis if target.kind == "linear" else "channel",
        )

    def attention_spec(self, target: Target, config: MethodConfig) -> QuantSpec:
        return self.activation_spec(target, config)

    # -- factories (subclass layers here: LET, low-rank branches, ...)
    def make_layer(self, module: nn.Module, target: Target) -> QuantLayer:
        return quant_layer_for(module, target.layer)

    def make_attention_quantizers(self, attn: nn.Module, target: Target) -> AttentionQuantizers:
        return AttentionQuantizers(target.attention)

    # -- reports
    def size_report(self, model: nn.Module, packed: dict | None = None) -> dict:
        """Packed size vs FP32 (:func:`harness.quant.packing.size_report`). Methods that add
        tensors stored at another precision (QArtSR's 16-bit low-rank branch) override this so the
        size counts what a deployment would store."""
        from harness.quant.packing import size_report

        return size_report(model, packed)

    # -- calibration
    def calibrate(
        self, qmodel: QuantizedModel, calibration, config: MethodConfig, progress=None
    ) -> dict:
        raise NotImplementedError(f"method {self.name!r} does not implement calibrate()")


# --------------------------------------------------------------------------- quantized model


class QuantizedModel:
    """A base model quantized in place, with the record of what was done.

    Attribute access falls through to the wrapped model (``qmodel.super_resolve(lr)``,
    ``qmodel.settings`` …), and so does assignment of anything but the record fields
    (``qmodel.settings = ...`` changes the model's settings); ``qmodel(x)`` calls the model's
    ``forward``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MethodConfig,
        targets: dict[str, Target],
        base_identity: str,
        base_param_keys: tuple[str, ...],
        base_model: str | None = None,
    ):
        self.__dict__["model"] = model
        self.config = config
        self.targets = targets
        self.base_identity = base_identity
        self.base_param_keys = base_param_keys
        self.base_model = base_model
        self.calibration_record: dict = {}

    _OWN = frozenset(
        {
            "config",
            "targets",
            "base_identity",
            "base_param_keys",
            "base_model",
            "calibration_record",
        }
    )

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "model":
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)

    def __setattr__(self, name: str, value) -> None:
        """Own record fields stay here; anything else (e.g. ``settings``) is set on the model."""
        if name in self._OWN:
            self.__dict__[name] = value
        elif name == "model":
            raise AttributeError("QuantizedModel.model cannot be replaced")
        else:
            setattr(self.__dict__["model"], name, value)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- views
    def quant_layers(self) -> dict[str, QuantLayer]:
        return dict(iter_quant_layers(self.model))

    def attention_quantizers(self) -> dict[str, AttentionQuantizers]:
        return dict(iter_attention_quantizers(self.model))

    def layer_bits(self) -> dict[str, str]:
        """``{module name: "W4A4" | "A4" (attention)}``."""
        return {name: t.bits_label for name, t in self.targets.items()}

    def set_quant_state(self, weights: bool, activations: bool) -> None:
        set_quant_state(self.model, weights, activations)

    def quant_state_dict(self) -> dict[str, torch.Tensor]:
        """Every state tensor that is not part of the base model (quantizer ranges, learned params)."""
        base = set(self.base_param_keys)
        return {k: v for k, v in self.model.state_dict().items() if k not in base}

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for target in self.targets.values():
            key = f"{target.component}:{target.bits_label}"
            counts[key] = counts.get(key, 0) + 1
        return {
            "method": self.config.method,
            "bits": self.config.bits if self.targets else "FP",
            "scope": self.config.scope,
            "quantized_modules": len(self.targets),
            "by_component_and_bits": dict(sorted(counts.items())),
            "label": SIMULATED_LABEL,
        }

    def record(self) -> dict:
        return {
            "label": SIMULATED_LABEL,
            "method_config": self.config.to_dict(),
            "base_model": self.base_model,
            "base_model_identity": self.base_identity,
            "summary": self.summary(),
            "layer_bits": self.layer_bits(),
            "calibration": self.calibration_record,
        }


SIMULATED_LABEL = "simulated quantization: accuracy, not speed"


def quantize(
    model: nn.Module,
    config: MethodConfig,
    calibration=None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    base_model: str | None = None,
) -> QuantizedModel:
    """Quantize ``model`` in place with ``config`` and return a :class:`QuantizedModel`.

    ``calibration`` is a :class:`~harness.quant.calibration.CalibrationSet` built from this base model
    (checked by identity hash); methods that need no data (``fp``) accept None. ``progress(stage, done,
    total)`` is called by methods that report progress. Raises :class:`ConfigError` for invalid
    targeting, :class:`DivergedError` (with its cause) if calibration produces NaN/Inf.
    """
    from harness.quant.io import model_identity
    from harness.registry import get_method

    if not isinstance(config, MethodConfig):
        raise ConfigError(f"config must be a MethodConfig, got {type(config).__name__}")
    entry = get_method(config.method)
    if not isinstance(config, entry.config_cls):
        raise ConfigError(
            f"method {config.method!r} expects a {entry.config_cls.__name__}, got {type(config).__name__}"
        )
    method = entry.create()
    method.configure(config)
    _check_plain_model(model)
    base_keys = tuple(model.state_dict().keys())
    identity = model_identity(model)
    if calibration is not None and calibration.model_identity != identity:
        raise ConfigError(
            "the calibration set was built from another base model "
            f"({calibration.model_identity[:12]} vs {identity[:12]}); rebuild it for this model"
        )
    if calibration is None and method.needs_calibration:
        raise ConfigError(f"method {config.method!r} needs a calibration set")
    targets = resolve_targets(model, config, method) if method.quantizes_model else {}
    apply_targets(model, targets, method)
    qmodel = QuantizedModel(model, config, targets, identity, base_keys, base_model)
    record = method.calibrate(qmodel, calibration, config, progress) or {}
    if targets:
        check_quantizers_finite(model)
        missing = uncalibrated_quantizers(model)
        if missing:
            raise ModelError(
                f"method {config.method!r} left {len(missing)} quantizer(s) without a range, "
                f"e.g. {missing[0]}"
            )
    qmodel.calibration_record = {
        "method": record,
        "data": None if calibration is None else calibration.record(),
    }
    return qmodel


__all__ = [
    "BitWidths",
    "LDM_TO_DIFFUSERS_8BIT",
    "MethodConfig",
    "PASSIONSR_8BIT_OVERRIDES",
    "QuantMethod",
    "QuantizedModel",
    "SIMULATED_LABEL",
    "Target",
    "apply_targets",
    "candidate_modules",
    "component_of",
    "parse_bits",
    "pattern_matches",
    "quantize",
    "resolve_targets",
    "skip_split_points",
]

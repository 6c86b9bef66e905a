"""The method registry: ``@register_method``, named variants, lazy imports and "did you mean".

A method is a class (subclass of :class:`harness.quant.api.QuantMethod`) with a typed config
dataclass (subclass of :class:`harness.quant.api.MethodConfig`) and a
``calibrate(qmodel, calibration, config, progress=None) -> dict`` hook. Each lives in its own module
``methods/<module>.py`` and registers itself on import::

    @register_method("minmax", config_cls=MinMaxConfig, description="...")
    class MinMax(QuantMethod): ...

    register_variant("qartsr-no-trq", base="qartsr", trq=False, description="...")

A variant is a named config of the same method class: ``get_method("qartsr-no-trq").make_config()``
is a ``QArtSRConfig`` with ``method="qartsr-no-trq"`` and the overridden defaults.

Lazy import (lm-evaluation-harness style): ``get_method(name)`` imports only the module that should
define ``name`` — ``methods/<name with '-' → '_'>.py`` or, for a variant ``base-suffix``,
``methods/<base>.py`` — and falls back to importing every module in ``methods/`` before reporting an
:class:`~harness.errors.UnknownNameError` with close matches.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError, UnknownNameError

METHODS_PACKAGE = "methods"


@dataclass(frozen=True)
class MethodEntry:
    """A registered name: the method class, its config class and (for variants) default overrides."""

    name: str
    cls: type
    config_cls: type
    module: str
    description: str = ""
    base: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def make_config(self, **fields: Any):
        """A validated config for this name: variant defaults, then ``fields``; ``method`` is the name."""
        if "method" in fields and fields["method"] != self.name:
            raise ConfigError(f"config for {self.name!r} cannot have method={fields['method']!r}")
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"unknown field(s) for method {self.name!r}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return self.config_cls(**{**self.defaults, **fields, "method": self.name})

    def create(self):
        """A fresh instance of the method class."""
        return self.cls()


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type | None = None, description: str = ""):
    """Class decorator registering a method under ``name`` (a unique, lower-case name)."""
    from harness.quant.api import MethodConfig, QuantMethod

    def decorate(cls: type) -> type:
        if not isinstance(cls, type) or not issubclass(cls, QuantMethod):
            raise TypeError(f"@register_method({name!r}) must decorate a QuantMethod subclass")
        cfg = config_cls or cls.config_cls
        if not (isinstance(cfg, type) and issubclass(cfg, MethodConfig)):
            raise TypeError(f"method {name!r}: config_cls must subclass MethodConfig")
        _check_new(name, cls.__module__)
        cls.name = name
        cls.config_cls = cfg
        doc = description or cls.description or (cls.__doc__ or "").strip().split("\n")[0]
        cls.description = doc
        _REGISTRY[name] = MethodEntry(name, cls, cfg, cls.__module__, doc)
        return cls

    return decorate


def register_variant(name: str, base: str, description: str = "", **overrides: Any) -> MethodEntry:
    """Register ``name`` as ``base`` with different config defaults (validated now)."""
    base_entry = get_method(base)
    if base_entry.base is not None:
        raise ConfigError(f"variant {name!r}: base {base!r} is itself a variant")
    import inspect

    caller = inspect.stack()[1].frame.f_globals.get("__name__", base_entry.module)
    _check_new(name, caller)
    entry = MethodEntry(
        name=name,
        cls=base_entry.cls,
        config_cls=base_entry.config_cls,
        module=caller,
        description=description
        or f"{base} with {', '.join(f'{k}={v!r}' for k, v in overrides.items())}",
        base=base,
        defaults=dict(overrides),
    )
    entry.make_config()  # validates the overrides
    _REGISTRY[name] = entry
    return entry


def _check_new(name: str, module: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ConfigError(f"method names are non-empty lower-case strings, got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.module != module:
        raise ConfigError(f"method {name!r} is registered twice ({existing.module} and {module})")


def _method_modules() -> list[str]:
    package = importlib.import_module(METHODS_PACKAGE)
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")
    )


def _import(module: str) -> None:
    importlib.import_module(f"{METHODS_PACKAGE}.{module}")


def _import_all() -> None:
    for module in _method_modules():
        _import(module)


def get_method(name: str) -> MethodEntry:
    """The entry for ``name``, importing its module lazily; :class:`UnknownNameError` if unknown."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    modules = _method_modules()
    for candidate in (name.replace("-", "_"), name.split("-")[0]):
        if candidate in modules:
            _import(candidate)
            if name in _REGISTRY:
                return _REGISTRY[name]
    _import_all()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownNameError("method", name, sorted(_REGISTRY))


def list_methods() -> list[str]:
    """Every registered method and variant name (imports all method modules)."""
    _import_all()
    return sorted(_REGISTRY)


def method_entries() -> list[MethodEntry]:
    """Every registered entry, sorted by name (imports all method modules)."""
    _import_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]

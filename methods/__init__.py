"""Quantization methods, one module per method, each registering itself with
:func:`harness.registry.register_method` on import (imported lazily by the registry).

- ``fp``: no quantization (the reference row through the same path).
- ``minmax``: the papers' "MaxMin" baseline (methods.md §4).
- ``ptq4dm``: PTQ4DM adapted to one-step SR (methods.md §5.4).
"""

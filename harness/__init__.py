"""qbench: a harness for quantizing one-step diffusion super-resolution models.

The engine lives here; quantization methods live in ``methods/`` (one file each), renderers in
``reports/``. See ``docs/ARCHITECTURE.md``.
"""

__version__ = "0.1.0"

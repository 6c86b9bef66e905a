"""The ``qbench`` command line (typer).

This module only assembles the app: each area registers its own commands from
``harness/commands/<area>.py`` through a ``register(app, ls_app)`` function, so the CLI stays thin and
every command's logic lives in a plain, testable function.
"""

from __future__ import annotations

import importlib
import sys

import typer

from harness.errors import QBenchError

app = typer.Typer(
    name="qbench",
    help=(
        "Quantize one-step diffusion super-resolution models and compare the methods.\n\n"
        "Examples:\n\n"
        "  qbench ls methods\n\n"
        "  qbench doctor\n\n"
        "  qbench run-matrix configs/demo.toml\n\n"
        "  qbench report runs/demo"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
ls_app = typer.Typer(
    help="List what is registered: methods, datasets, metrics.", no_args_is_help=True
)
app.add_typer(ls_app, name="ls")

COMMAND_MODULES = ("data", "metrics", "model", "quant", "matrix")

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"harness.commands.{_name}")
    except ModuleNotFoundError as exc:  # an area not built yet must not break the others
        if exc.name != f"harness.commands.{_name}":
            raise
        continue
    _module.register(app, ls_app)


def main() -> None:
    """Entry point that turns :class:`QBenchError` into a one-line message and exit code 2."""
    try:
        app()
    except QBenchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)

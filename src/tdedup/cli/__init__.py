"""The ``tdedup`` command line: one typer app, one module per command group."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tdedup",
    help="Find the tensors a family of model checkpoints shares, store them once, load them once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Find the tensors a family of model checkpoints shares, store them once, load them once."""


# Each module registers its commands on ``app`` when imported.
from . import analyze, bundle_commands, demo, load  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()

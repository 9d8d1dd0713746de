"""The ``tdedup`` typer app: every command registered here, explicitly, in help order.

Command modules only define functions (thin wrappers over the library); nothing registers
itself on import, so this file is the list of what the CLI offers.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from .._version import __version__
from . import analyze, bundle_commands, demo, edit_commands, index, load
from .common import OneLineUsageErrors

app = typer.Typer(
    name="tdedup",
    cls=OneLineUsageErrors,  # usage errors as one ``error:`` line, like every other error
    help="Find the tensors a family of model checkpoints shares, store them once, load them once.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tdedup {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = None,
) -> None:
    """Find the tensors a family of model checkpoints shares, store them once, load them once."""


app.command()(analyze.analyze)
app.command("index")(index.index_command)
app.command()(bundle_commands.pack)
app.command()(edit_commands.add)
app.command()(edit_commands.remove)
app.command()(bundle_commands.convert)
app.command()(bundle_commands.unpack)
app.command()(bundle_commands.verify)
app.command()(bundle_commands.inspect)
app.command()(load.load)
app.command()(demo.demo)


def main() -> None:
    """Console-script entry point."""
    # Started with fd 1 or 2 closed (cron, a daemon), Python leaves sys.stdout or
    # sys.stderr None: print(file=None) would write warnings and hints into stdout's
    # JSON, and a report written to a missing stdout would crash. Both go nowhere, as
    # typer.echo's output already does.
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    app()

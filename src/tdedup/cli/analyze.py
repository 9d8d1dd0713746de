"""``tdedup analyze``: what a set of checkpoints shares."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..analyzers.overlap import compute_overlap
from ..analyzers.scan import hash_models, index_models
from . import app
from .common import byte_progress, guarded, stdout_console


@app.command()
@guarded
def analyze(
    paths: Annotated[list[str], typer.Argument(help="Models: files or folders, as PATH or NAME=PATH.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Report the tensors a set of checkpoints shares."""
    models = index_models(paths)
    with byte_progress("hashing", sum(m.tensor_bytes for m in models)) as advance:
        scanned = hash_models(models, advance)
    report = compute_overlap(scanned.models, scanned.hashed)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        stdout_console().print(report.to_dict())

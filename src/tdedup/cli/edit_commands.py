"""``tdedup add`` and ``tdedup remove``: change a bundle's models in place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..format.bundle.constants import DEFAULT_LEVEL
from .common import (
    BundleArg,
    Delta,
    Derive,
    Exclude,
    Include,
    Json,
    Level,
    Quiet,
    counted,
    guarded,
    human_bytes,
    phased_progress,
    print_json,
    stdout_console,
)

if TYPE_CHECKING:
    from ..ops.add import EditResult

# The library is imported inside each command: ``tdedup --help`` imports this module.

Output = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Write the new bundle here instead of replacing BUNDLE.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing --output.")]


def _report(r: EditResult, verb: str, as_json: bool) -> None:
    if as_json:
        print_json({"bundle": str(r.path), verb: r.changed, "models": r.models,
                    "copied_blobs": r.copied_blobs, "new_blobs": r.new_blobs,
                    "bundle_bytes": r.bundle_bytes, "seconds": round(r.seconds, 3)})
        return
    out = stdout_console()
    out.print(f"{verb} {counted(len(r.changed), 'model')}: {r.path} now holds "
              f"{counted(len(r.models), 'model')}, {human_bytes(r.bundle_bytes)}",
              markup=False, highlight=False)
    out.print(f"  {counted(r.copied_blobs, 'blob')} copied unchanged, {r.new_blobs} new, "
              f"{r.seconds:.2f} s", markup=False, highlight=False)


@guarded
def add(
    bundle: BundleArg,
    paths: Annotated[list[str], typer.Argument(
        help="Models to add: files, folders, hf://org/name[@rev], bundles; as PATH or "
        "NAME=PATH (NAME=BUNDLE renames a bundle's one model).")],
    output: Output = None,
    force: Force = False,
    include: Include = None,
    exclude: Exclude = None,
    level: Level = DEFAULT_LEVEL,
    delta: Delta = "auto",
    derive: Derive = "auto",
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Add models to a bundle; what it holds is copied, never re-encoded."""
    from ..ops.add import add as add_models
    from ..format.checkpoints.sources import ModelArg
    from ..ops.inputs import (
        check_model_names,
        check_new_output,
        check_output_not_input,
        expand_inputs,
        staged_bundles,
    )
    args = expand_inputs(paths, include=include or (), exclude=exclude or ())
    target = output or bundle
    check_output_not_input(target, [a.path for a in args])
    if output is not None:
        check_output_not_input(output, [bundle])
        check_new_output(output, force)
    # A name clash is refused before any bundle among the new models is restored.
    check_model_names(args, into=ModelArg(None, bundle))
    # Bundles among the new models are restored beside the target and added as models.
    with staged_bundles(args, Path(target).resolve().parent) as staged, \
            phased_progress(quiet) as progress:
        r = add_models(bundle, staged, output=output, level=level, delta=delta,
                       derive=derive, progress=progress, force=force)
    _report(r, "added", as_json)


@guarded
def remove(
    bundle: BundleArg,
    names: Annotated[list[str], typer.Argument(help="Names of the models to drop.")],
    output: Output = None,
    force: Force = False,
    level: Level = DEFAULT_LEVEL,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Drop models from a bundle, and the blobs no other model needs."""
    from ..ops.add import remove as remove_models
    from ..ops.inputs import check_new_output, check_output_not_input
    if output is not None:
        check_output_not_input(output, [bundle])
        check_new_output(output, force)
    with phased_progress(quiet) as progress:
        r = remove_models(bundle, names, output=output, level=level, progress=progress,
                          force=force)
    _report(r, "removed", as_json)

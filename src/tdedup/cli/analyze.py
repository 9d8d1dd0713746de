"""``tdedup analyze``: what a set of checkpoints shares.

stdout carries exactly one rendering: rich tables (default), JSON (``--json``) or
Markdown (``--markdown -``); a Markdown file can be written beside either. Progress,
warnings and the threshold verdict go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .._fs import forget_temp, fsync_dir, open_temp
from ..errors import OutputError, UsageError, display_path
from .common import (
    EXIT_THRESHOLD,
    Exclude,
    Include,
    Quiet,
    byte_progress,
    guarded,
    hint,
    human_bytes,
    stdout_console,
    warn,
    warn_skipped,
)

if TYPE_CHECKING:
    from ..analyzers.derivation import DerivableModel
    from ..analyzers.drift import DriftReport
    from ..format.checkpoints.sources import ModelArg
    from ..analyzers.overlap import OverlapReport
    from ..analyzers.scan import ScannedModels
    from ..format.checkpoints.records import ModelSource

# The analyzers (numpy, gguf, the delta planner) and the rich renderers are imported by the
# functions that use them: ``tdedup --help`` imports this module and must start fast.

# Weight files of other formats that a folder may hold: their tensors are not counted,
# which the user should know before trusting a low ratio.
_UNREAD_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".onnx", ".msgpack")


def warn_unread_weights(models: list[ModelSource]) -> None:
    """Warn, per model, about weight files in formats analyze does not read."""
    from ..format.checkpoints.records import FileKind
    for m in models:
        unread = [f.rel_path for f in m.files
                  if f.kind is FileKind.OTHER and f.rel_path.lower().endswith(_UNREAD_WEIGHTS)]
        if unread:
            more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
            warn(f"{m.name}: {unread[0]}{more} not analyzed (only safetensors and GGUF "
                 "tensors are read)")


def check_markdown_target(target: str | None, args: Sequence[ModelArg]) -> None:
    """Refuse, before any hashing, a Markdown file that cannot be written or that would
    replace an input: one of the files given (any part of a split GGUF, a bundle) or a
    file inside an input folder."""
    if target in (None, "-"):
        return
    from ..ops.inputs import check_output_file, check_output_not_input, input_files

    check_output_file(target)
    if not Path(target).resolve().parent.is_dir():
        raise OutputError("cannot write the Markdown report: no such folder",
                          path=display_path(target))
    check_output_not_input(target, input_files(args))


def write_markdown(target: str, text: str) -> None:
    """Write the Markdown report to stdout for ``-``, else to a file atomically, as every
    output is written: a temporary name beside it, fsynced, renamed over it (a link is
    followed: its target is written)."""
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(os.path.realpath(target))
    tmp = None
    try:
        tmp, f = open_temp(path)
        with f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        forget_temp(tmp)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            forget_temp(tmp)
        raise OutputError(f"cannot write the Markdown report: {e.strerror or e}",
                          path=display_path(target)) from e
    fsync_dir(path.parent)


def render_json(report: OverlapReport, drift: DriftReport | None = None,
                models: list[ModelSource] | None = None,
                derived: list[DerivableModel] | None = None) -> str:
    """The JSON report, one model, pair or group per line.

    Readable and grep-able, and json's C encoder does it: ``indent=2`` falls back to the
    pure-Python encoder and took ~14 ms on the corpus's 1,000 groups, 3% of analyze.
    """
    doc = report.to_dict()
    doc["skipped"] = {m.name: list(m.skipped) for m in models or [] if m.skipped}
    if drift is not None:
        doc["drift"] = drift.to_dict()
    if derived:
        doc["derived"] = [d.to_dict() for d in derived]
    fields = list(doc.items())
    lines = ["{"]
    for i, (key, value) in enumerate(fields):
        if isinstance(value, list) and value:
            value_text = "[\n" + ",\n".join(f"    {json.dumps(v)}" for v in value) + "\n  ]"
        else:
            value_text = json.dumps(value)
        lines.append(f"  {json.dumps(key)}: {value_text}{',' if i < len(fields) - 1 else ''}")
    return "\n".join(lines + ["}"]) + "\n"


def analyze_paths(paths: Sequence[str | ModelArg], *, dask: str | None = None,
                  index: Path | None = None, quiet: bool = False
                  ) -> tuple[ScannedModels, OverlapReport]:
    """Index, hash (with a progress bar on stderr) and compare the given models; on a
    Dask cluster and through an incremental index when asked."""
    from ..analyzers.overlap import compute_overlap
    from ..analyzers.scan import hash_models, index_models, screen_models
    from .index import report_counts, scan_backends
    models = index_models(paths)
    warn_unread_weights(models)
    warn_skipped(models)
    # The report needs classes of equal tensors, not every digest: tensors no other can
    # equal are set apart without being read in full (an index keeps true digests only).
    screen = screen_models(models) if index is None else None
    with scan_backends(dask, index) as (idx, runner), \
            byte_progress("hashing", sum(m.tensor_bytes for m in models),
                          quiet=quiet) as advance:
        scanned = hash_models(models, advance, index=idx, runner=runner, screen=screen)
    report_counts(scanned, index)
    return scanned, compute_overlap(scanned.models, scanned.hashed)


def differing_slots(scanned: ScannedModels) -> int:
    """Tensor slots (name, dtype, length) that more than one model fills with different
    bytes: what ``--drift`` would describe. Metadata only, no tensor bytes are read."""
    seen: dict[tuple, set] = {}
    for hs in scanned.hashed.values():
        for h in hs:
            seen.setdefault((h.record.name, h.record.dtype, h.record.length), set()).add(h.digest)
    return sum(1 for digests in seen.values() if len(digests) > 1)


def drift_markdown(drift: DriftReport, max_rows: int = 60) -> str:
    """The drift section of the Markdown report: per-layer rows and the size estimate."""
    from .analyze_render import md_escape, share

    lines = ["", "### Drift of differing tensors, by layer", "",
             "| model | vs | layer | tensors | bytes changed | elements changed | rel. L2 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for g in drift.layers[:max_rows]:
        rel = "-" if g.rel_l2 is None else f"{g.rel_l2:.2e}"
        lines.append(f"| {md_escape(g.model)} | {md_escape(g.reference)} | "
                     f"{md_escape(g.layer)} | {g.tensors} | "
                     f"{share(g.bytes_changed, 1)} | {share(g.elements_changed, 1)} | {rel} |")
    e = drift.estimate
    if e:
        lines += ["", f"Estimated bundle tensors: {human_bytes(e['with_deltas_bytes'])} with "
                      f"deltas, {human_bytes(e['without_deltas_bytes'])} without "
                      f"({e['ratio_vs_without_deltas']:.2f}x), {e['delta_blobs']} deltas."]
    return "\n".join(lines) + "\n"


@guarded
def analyze(
    paths: Annotated[Optional[list[str]], typer.Argument(
        help="Models: .safetensors or .gguf files (a split GGUF by any part), sharded or "
             "Diffusers folders, any folder, hub cache folders, hf://org/name[@rev], "
             "bundles; as PATH or NAME=PATH.",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the report as JSON on stdout (docs/analyze-json.md).")] = False,
    markdown: Annotated[Optional[str], typer.Option(
        "--markdown", metavar="FILE",
        help="Also write a Markdown report (for a CI job summary); '-' for stdout.")] = None,
    min_dedup_ratio: Annotated[Optional[float], typer.Option(
        "--min-dedup-ratio", metavar="X", min=0.0,
        help="Exit 1, after the report, when the dedup ratio is below X.")] = None,
    top: Annotated[int, typer.Option(
        "--top", min=0, help="How many of the largest shared tensors to list.")] = 10,
    drift: Annotated[bool, typer.Option(
        "--drift", help="Also describe tensors that differ between models (bytes, "
        "elements and byte planes changed, relative L2, by layer) and estimate the bundle "
        "with base-plus-delta storage. Reads the differing tensors again.")] = False,
    dask: Annotated[Optional[str], typer.Option(
        "--dask", metavar="ADDRESS",
        help="Hash on a Dask cluster: a scheduler address (tcp://host:8786) or local[:N] "
             "for N local worker processes. Workers must see the models at the same "
             "paths (a shared file system). Needs the dask extra (pip install tdedup\\[dask]).")] = None,
    index: Annotated[Optional[Path], typer.Option(
        "--index", metavar="PATH",
        help="Keep every file's tensor hashes in this SQLite index and hash only files "
             "that are new or changed since (created when missing).")] = None,
    hf_cache: Annotated[bool, typer.Option(
        "--hf-cache", help="Analyze every cached revision of every model repository of the "
        "Hugging Face cache: the PATHS given, else the one huggingface_hub uses "
        "(HF_HUB_CACHE, HF_HOME). One model per revision, named org/name@rev.")] = False,
    include: Include = None,
    exclude: Exclude = None,
    quiet: Quiet = False,
) -> None:
    """Report the tensors a set of checkpoints shares, and what storing them once saves."""
    if as_json and markdown == "-":
        raise UsageError("--json and --markdown - both write to stdout; give --markdown a "
                         "file name")
    from ..analyzers.derivation import derivation_report
    from ..ops.inputs import expand_inputs, scan_args, staged_bundles
    if hf_cache:
        from ..format.checkpoints.hub_cache import default_cache_dir
        roots = paths or [str(default_cache_dir())]
        args = [a for r in roots for a in scan_args(r)]
        args = expand_inputs([], include=include or (), exclude=exclude or (), models=args)
    elif not paths:
        raise UsageError("no models given", hint="tdedup analyze PATH..., or --hf-cache")
    else:
        args = expand_inputs(paths, include=include or (), exclude=exclude or (),
                             bundle_models=True)
    check_markdown_target(markdown, args)  # before hashing gigabytes, not after
    # Bundles among the inputs are restored for as long as their tensors are read.
    with staged_bundles(args) as staged:
        scanned, report = analyze_paths(staged, dask=dask, index=index, quiet=quiet)
        # A bundle's model is reported at the bundle's path, not the staging folder.
        bundles = {a.name: a.bundle for a in staged if a.bundle is not None}
        for summary in report.models:
            if summary.name in bundles:
                summary.path = str(bundles[summary.name])
        drift_report = None
        if drift:
            from ..analyzers.drift import compute_drift
            drift_report = compute_drift(scanned)
        derived = derivation_report(scanned)
    if as_json:
        sys.stdout.write(render_json(report, drift_report, scanned.models, derived))
    elif markdown != "-":
        from .analyze_render import derived_table, drift_table, print_report
        console = stdout_console()
        print_report(report, console, top=top)
        if drift_report is not None:
            console.print(drift_table(drift_report, width=console.width))
        if derived:
            console.print(derived_table(derived))
    if markdown is not None:
        from .analyze_render import derived_markdown, markdown_report
        skipped = {m.name: list(m.skipped) for m in scanned.models if m.skipped}
        text = markdown_report(report, top=top, min_ratio=min_dedup_ratio, skipped=skipped)
        write_markdown(markdown, text + (drift_markdown(drift_report) if drift_report else "")
                       + (derived_markdown(derived) if derived else ""))
    if not drift and not quiet:
        n = differing_slots(scanned)
        if n:
            hint(f"{n} tensor slots hold different bytes in different models; --drift "
                 "shows how far they drifted and what base-plus-delta storage would save")
    if min_dedup_ratio is None:
        return
    # The ratio as JSON reports it, compared and printed with all its digits: never
    # "2.000 is below 2".
    from .analyze_render import below_threshold, exact_number, reported_ratio
    if below_threshold(report, min_dedup_ratio):
        print(f"tdedup: dedup ratio {exact_number(reported_ratio(report))} is below "
              f"--min-dedup-ratio {exact_number(min_dedup_ratio)}", file=sys.stderr)
        raise typer.Exit(EXIT_THRESHOLD)

"""``tdedup pack``, ``convert``, ``unpack``, ``verify`` and ``inspect``."""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import OutputError, UsageError
from ..format.bundle.constants import DEFAULT_LEVEL, BundleLayout
from .common import (
    BundleArg,
    Delta,
    Derive,
    Exclude,
    Force,
    Include,
    Json,
    Level,
    Quiet,
    counted,
    guarded,
    human_bytes,
    phased_progress,
    plain,
    print_json,
    stdout_console,
    warn,
)

if TYPE_CHECKING:
    from ..format.bundle.reader import Bundle

# The library (numpy, zstd, the planner) is imported inside each command, not here:
# ``tdedup --help`` imports this module and must start in well under 150 ms.


@guarded
def pack(
    paths: Annotated[list[str], typer.Argument(help="Models: files, folders, hub cache folders, hf://org/name[@rev], bundles (merged); as PATH or NAME=PATH (NAME=BUNDLE renames a bundle's one model).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle to write (.tdd).")],
    level: Level = DEFAULT_LEVEL,
    delta: Delta = "auto",
    layout: Annotated[Optional[BundleLayout], typer.Option("--layout", help="compact (the default): compress every blob; serving: keep self-contained blobs raw and aligned, for loads that map them (deltas stay compressed). A merge keeps the first bundle's layout unless this is given.", show_default=False)] = None,
    force: Force = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planner's size estimate and what would be stored as what; write nothing.")] = False,
    include: Include = None,
    exclude: Exclude = None,
    derive: Derive = "auto",
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write one deduplicated bundle holding every model given."""
    from ..ops.inputs import (
        check_model_names,
        check_new_output,
        check_output_not_input,
        expand_inputs,
        is_bundle,
    )
    from ..ops.pack import pack as pack_models
    args = expand_inputs(paths, include=include or (), exclude=exclude or ())
    check_output_not_input(output, [a.path for a in args])
    first = next((a for a in args if is_bundle(a.path)), None)
    if dry_run:
        if first is not None:  # what the merge would refuse, before anything is restored
            check_model_names(args, into=first)
        from ..ops.estimate import estimate
        from ..ops.inputs import staged_bundles
        with staged_bundles(args) as staged:
            e = estimate(staged, delta=delta, derive=derive, layout=layout,
                         keep=first.path if first is not None else None)
        _print_estimate(e, as_json, first.path if first is not None else None)
        return
    check_new_output(output, force)
    if first is not None:
        _merge(args, output, level=level, delta=delta, derive=derive, layout=layout,
               force=force, as_json=as_json,
               quiet=quiet)
        return
    with phased_progress(quiet) as progress:
        r = pack_models(args, output, level=level, delta=delta, progress=progress,
                        layout=layout or BundleLayout.COMPACT, derive=derive, force=force)
    for name, entries in r.skipped.items():
        shown = ", ".join(entries[:5])
        warn(f"{name}: skipped {shown}" + (f" and {len(entries) - 5} more"
                                           if len(entries) > 5 else ""))
    if as_json:
        print_json({"bundle": str(r.path), "layout": r.layout, "models": r.models,
                    "logical_bytes": r.logical_bytes, "tensor_bytes": r.tensor_bytes,
                    "distinct_tensor_bytes": r.distinct_tensor_bytes,
                    "bundle_bytes": r.bundle_bytes, "ratio": round(r.ratio, 4),
                    "seconds": round(r.seconds, 3), "encodings": r.encodings,
                    "skipped": r.skipped})
        return
    out = stdout_console()
    speed = r.logical_bytes / r.seconds if r.seconds else 0
    out.print(plain(f"packed {counted(len(r.models), 'model')} into {r.path} "
                    f"({r.layout} layout)"))
    how = (f"{r.ratio:.2f}x smaller" if r.ratio >= 1 else
           f"{1 / r.ratio:.2f}x larger: nothing shared, and the bundle's own bytes")
    out.print(f"  logical {human_bytes(r.logical_bytes)} -> bundle "
              f"{human_bytes(r.bundle_bytes)}  ({how})")
    out.print(f"  {r.seconds:.2f} s, {human_bytes(speed)}/s; blobs: "
              + ", ".join(f"{n} {k}" for k, n in sorted(r.encodings.items())))


def _merge(args, output: Path, *, level: int, delta: str, derive: str,
           layout: BundleLayout | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Bundles among the inputs: see ``ops.add.merge``."""
    from ..ops.add import merge

    with phased_progress(quiet) as progress:
        r = merge(args, output, level=level, delta=delta, layout=layout, progress=progress,
                  derive=derive, force=force)
    if as_json:
        print_json({"bundle": str(r.path), "layout": r.layout, "models": r.models,
                    "bundle_bytes": r.bundle_bytes, "copied_blobs": r.copied_blobs,
                    "new_blobs": r.new_blobs, "seconds": round(r.seconds, 3)})
        return
    stdout_console().print(plain(
        f"merged {counted(len(r.models), 'model')} into {r.path} ({r.layout} layout): "
        f"{human_bytes(r.bundle_bytes)} ({counted(r.copied_blobs, 'blob')} copied, "
        f"{r.new_blobs} new) in {r.seconds:.2f} s"))


def _print_estimate(e: dict, as_json: bool, kept: Path | None) -> None:
    if as_json:
        print_json(e)
        return
    out = stdout_console()
    out.print(plain(f"estimate (the planners', not a pack; nothing written) for "
                    f"{counted(e['models'], 'model')}, {e['layout']} layout:"))
    out.print(f"  tensors {human_bytes(e['tensor_bytes'])}, distinct "
              f"{human_bytes(e['distinct_tensor_bytes'])} in "
              f"{counted(e['distinct_tensors'], 'blob')}")
    kinds = [f"{e['self_blobs']} self-contained", counted(e["delta_blobs"], "delta"),
             f"{e['derived_blobs']} derived"]
    if kept is not None:
        kinds.append(f"{e['copied_blobs']} kept from {kept}")
    out.print(plain("  stored as: " + ", ".join(kinds)))
    for k, n in sorted(e["delta_encodings"].items()):
        out.print(plain(f"    {n} {k.lower()} (delta)"))
    for k, n in sorted(e["derived_transforms"].items()):
        out.print(plain(f"    {n} {k} (derived)"))
    if kept is not None:
        out.print(plain(f"  a merge copies {kept}'s blobs and adds the other models "
                        "against them"))
    out.print(f"  estimated tensor bytes stored: ~{human_bytes(e['estimated_bytes'])} "
              f"(~{human_bytes(e['estimated_without_deltas_bytes'])} with every blob "
              "self-contained)")


@guarded
def convert(
    bundle: Annotated[Path, typer.Argument(help="The bundle to re-lay (.tdd); it is not modified.")],
    layout: Annotated[BundleLayout, typer.Option("--layout", help="serving: every self-contained blob raw and aligned; compact: compressed.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle to write (not the input).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    level: Annotated[int, typer.Option("--level", min=-7, max=22, help="zstd level of blobs compressed for the compact layout.")] = DEFAULT_LEVEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
) -> None:
    """Re-lay a bundle in another layout without re-planning (deltas copied byte for byte)."""
    from ..ops.convert import convert as convert_bundle
    with phased_progress(quiet) as progress:
        r = convert_bundle(bundle, output, layout, force=force, level=level, progress=progress)
    if as_json:
        print_json({"bundle": str(r.path), "layout": r.layout,
                    "source_bytes": r.source_bytes, "bundle_bytes": r.bundle_bytes,
                    "decoded": r.decoded, "encoded": r.encoded, "copied": r.copied,
                    "seconds": round(r.seconds, 3), "encodings": r.encodings})
        return
    stdout_console().print(plain(
        f"wrote {r.path} ({r.layout} layout): {human_bytes(r.source_bytes)} -> "
        f"{human_bytes(r.bundle_bytes)} in {r.seconds:.2f} s; "
        f"{counted(r.decoded, 'blob')} decoded, "
        f"{r.encoded} compressed, {r.copied} copied as they were"))


@guarded
def unpack(
    bundle: BundleArg,
    dest: Annotated[Optional[Path], typer.Argument(help="Folder to restore into: DEST/NAME/<original paths> (a hub id's '/' becomes '--').", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Restore only this model (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty DEST (only the bundle's own files are replaced).")] = False,
    hf_cache: Annotated[Optional[Path], typer.Option("--hf-cache", metavar="DIR", help="Restore models packed from the Hugging Face cache into the cache layout at DIR (blobs, snapshot symlinks, refs), instead of DEST.")] = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Restore every original file byte for byte (sha256 checked)."""
    from ..ops.unpack import unpack as unpack_bundle
    from ..ops.hub_unpack import unpack_to_cache
    if (dest is None) == (hf_cache is None):
        raise UsageError("give either DEST or --hf-cache DIR")
    target = dest if dest is not None else hf_cache
    assert target is not None
    if bundle.exists() and target.exists() and \
            (bundle.resolve() == target.resolve() or target.resolve() in bundle.resolve().parents):
        raise OutputError("the destination holds the input bundle (it would be read and written)", path=target)
    model = [unicodedata.normalize("NFC", m) for m in model] if model else None
    with phased_progress(quiet) as progress:
        if hf_cache is not None:
            r = unpack_to_cache(bundle, hf_cache, models=model, progress=progress)
        else:
            r = unpack_bundle(bundle, target, models=model, force=force, progress=progress)
    if as_json:
        print_json({"dest": str(r.dest), "models": r.models, "files": r.files,
                    "bytes": r.bytes, "seconds": round(r.seconds, 3)})
        return
    speed = r.bytes / r.seconds if r.seconds else 0
    stdout_console().print(plain(f"restored {counted(r.files, 'file')} of "
                                 f"{counted(len(r.models), 'model')} "
                                 f"({human_bytes(r.bytes)}) into {r.dest} in {r.seconds:.2f} "
                                 f"s ({human_bytes(speed)}/s); every sha256 matches"))


@guarded
def verify(
    bundle: BundleArg,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Decode every blob, check every hash and every file's sha256."""
    from ..ops.verify import verify as verify_bundle
    with phased_progress(quiet) as progress:
        r = verify_bundle(bundle, progress=progress)
    if as_json:
        print_json({"bundle": str(bundle), "ok": True, "blobs": r.blobs,
                    "stored_bytes": r.stored_bytes, "files": r.files,
                    "logical_bytes": r.logical_bytes, "seconds": round(r.seconds, 3)})
        return
    stdout_console().print(f"ok: {counted(r.blobs, 'blob')} ({human_bytes(r.stored_bytes)} "
                           f"stored), {counted(r.files, 'file')} "
                           f"({human_bytes(r.logical_bytes)}) verified in {r.seconds:.2f} s")


def inspect_dict(b: Bundle) -> dict:
    """What ``inspect --json`` prints: models, files, sharing, encodings, sizes."""
    from ..ops.convert import layout_of
    blobs = b.manifest.blobs
    uses = Counter(t.hash for m in b.manifest.models for f in m.files for t in f.tensors)
    by_enc: dict[str, dict[str, int]] = {}
    for rec in blobs.values():
        e = by_enc.setdefault(rec.encoding.name.lower(), {"blobs": 0, "stored_bytes": 0,
                                                          "decoded_bytes": 0})
        e["blobs"] += 1
        e["stored_bytes"] += rec.stored_length
        e["decoded_bytes"] += rec.decoded_length
    models = []
    for m in b.manifest.models:
        hashes = [t.hash for f in m.files for t in f.tensors]
        shared = sum(blobs[h].decoded_length for h in hashes if uses[h] > 1)
        models.append({
            "name": m.name, "layout": m.layout, "files": len(m.files),
            "file_bytes": m.file_bytes, "tensors": len(hashes), "tensor_bytes": m.tensor_bytes,
            "shared_tensor_bytes": shared,
            "delta_tensors": sum(1 for h in hashes if blobs[h].base is not None),
            "file_list": [{"path": f.path, "size": f.size, "kind": f.kind,
                           "tensors": len(f.tensors), "sha256": f.sha256} for f in m.files],
        })
    deltas = [{"blob": rec.hash, "base": rec.base, "encoding": rec.encoding.name.lower(),
               "decoded_bytes": rec.decoded_length, "stored_bytes": rec.stored_length,
               "ratio": round(rec.decoded_length / rec.stored_length, 3)
               if rec.stored_length else None}
              for rec in blobs.values() if rec.base is not None]
    return {"bundle": str(b.path), "bundle_bytes": b.size,
            "format_version": list(b.manifest.format_version),
            "tool_version": b.manifest.tool_version, "layout": layout_of(b.manifest),
            "models": models,
            "blobs": len(blobs), "encodings": by_enc, "deltas": deltas,
            "summary": b.manifest.summary}


@guarded
def inspect(
    bundle: BundleArg,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Show what a bundle holds: models, files, sharing, encodings, sizes."""
    from rich.table import Table

    from ..format.bundle.reader import Bundle
    with Bundle(bundle, mapped=False) as b:
        # Cheap integrity checks (no decoding): zero padding and every blob's stored
        # checksum, so that inspect never describes a corrupted bundle as sound.
        b.check_padding()
        for rec in b.manifest.blobs.values():
            b.check_stored(rec)
        info = inspect_dict(b)
    if as_json:
        print_json(info)
        return
    out = stdout_console()
    out.print(plain(f"{info['bundle']}: format {'.'.join(map(str, info['format_version']))}, "
                    f"{human_bytes(info['bundle_bytes'])}, {counted(info['blobs'], 'blob')}, "
                    f"layout "
                    f"{info['layout']}, written by tdedup {info['tool_version']}"))
    t = Table(title="models")
    for col in ("model", "layout", "files", "tensors", "file bytes", "shared tensor bytes",
                "delta tensors"):
        # A name is never cut (org/name@main and org/name@v1 looked alike): it wraps.
        t.add_column(col, justify="left" if col in ("model", "layout") else "right",
                     overflow="fold" if col == "model" else "ellipsis")
    for m in info["models"]:
        t.add_row(plain(m["name"]), plain(m["layout"]), str(m["files"]), str(m["tensors"]),
                  human_bytes(m["file_bytes"]), human_bytes(m["shared_tensor_bytes"]),
                  str(m["delta_tensors"]))
    out.print(t)
    e = Table(title="encodings")
    for col in ("encoding", "blobs", "decoded bytes", "stored bytes", "ratio (x)"):
        e.add_column(col, justify="left" if col == "encoding" else "right")
    for name, v in sorted(info["encodings"].items()):
        ratio = v["decoded_bytes"] / v["stored_bytes"] if v["stored_bytes"] else 1.0
        e.add_row(name, str(v["blobs"]), human_bytes(v["decoded_bytes"]),
                  human_bytes(v["stored_bytes"]), f"{ratio:.2f}x")
    out.print(e)
    if info["deltas"]:
        d = Table(title=f"deltas ({len(info['deltas'])}, largest first)")
        for col in ("blob", "base", "encoding", "decoded bytes", "stored bytes", "ratio (x)"):
            d.add_column(col)
        for x in sorted(info["deltas"], key=lambda x: -x["decoded_bytes"])[:15]:
            d.add_row(x["blob"][:12], x["base"][:12], x["encoding"],
                      human_bytes(x["decoded_bytes"]), human_bytes(x["stored_bytes"]),
                      f"{x['ratio']}x")
        out.print(d)


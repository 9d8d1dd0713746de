"""``tdedup pack``, ``convert``, ``unpack``, ``verify`` and ``inspect``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..format.bundle.constants import DEFAULT_LEVEL, BundleLayout
from .common import guarded, human_bytes, phased_progress, plain, stdout_console, warn

if TYPE_CHECKING:
    from ..format.bundle.reader import Bundle

# The library (numpy, zstd, the planner) is imported inside each command, not here:
# ``tdedup --help`` imports this module and must start in well under 150 ms.


@guarded
def pack(
    paths: Annotated[list[str], typer.Argument(help="Models: files or folders, as PATH or NAME=PATH.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle to write (.tdd).")],
    level: Annotated[int, typer.Option("--level", min=-7, max=22, help="zstd level (1 is both smaller and faster than 3 on float planes).")] = DEFAULT_LEVEL,
    delta: Annotated[str, typer.Option("--delta", help="auto: store near-identical tensors as base + delta; off: never.")] = "auto",
    layout: Annotated[BundleLayout, typer.Option("--layout", help="compact: compress every blob; serving: keep self-contained blobs raw and aligned, for loads that map them (deltas stay compressed).")] = BundleLayout.COMPACT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
    derive: Annotated[str, typer.Option("--derive", help="auto: store tensors another model's tensor computes (a cast, a ggml quantization) as transform + residual, and repeated file layouts against each other; off: never.")] = "auto",
) -> None:
    """Write one deduplicated bundle holding every model given."""
    from ..ops.pack import pack as pack_models
    with phased_progress(quiet) as progress:
        r = pack_models(paths, output, level=level, delta=delta, progress=progress,
                        layout=layout, derive=derive)
    for name, entries in r.skipped.items():
        shown = ", ".join(entries[:5])
        warn(f"{name}: skipped {shown}" + (f" and {len(entries) - 5} more"
                                           if len(entries) > 5 else ""))
    if as_json:
        print(json.dumps({"bundle": str(r.path), "layout": r.layout, "models": r.models,
                          "logical_bytes": r.logical_bytes, "tensor_bytes": r.tensor_bytes,
                          "distinct_tensor_bytes": r.distinct_tensor_bytes,
                          "bundle_bytes": r.bundle_bytes, "ratio": round(r.ratio, 4),
                          "seconds": round(r.seconds, 3), "encodings": r.encodings,
                          "skipped": r.skipped}, indent=2))
        return
    out = stdout_console()
    speed = r.logical_bytes / r.seconds if r.seconds else 0
    out.print(plain(f"packed {len(r.models)} models into {r.path} ({r.layout} layout)"))
    out.print(f"  logical {human_bytes(r.logical_bytes)} -> bundle {human_bytes(r.bundle_bytes)}"
              f"  ({r.ratio:.2f}x smaller)")
    out.print(f"  {r.seconds:.2f} s, {human_bytes(speed)}/s; blobs: "
              + ", ".join(f"{n} {k}" for k, n in sorted(r.encodings.items())))


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
        print(json.dumps({"bundle": str(r.path), "layout": r.layout,
                          "source_bytes": r.source_bytes, "bundle_bytes": r.bundle_bytes,
                          "decoded": r.decoded, "encoded": r.encoded, "copied": r.copied,
                          "seconds": round(r.seconds, 3), "encodings": r.encodings}, indent=2))
        return
    stdout_console().print(plain(
        f"wrote {r.path} ({r.layout} layout): {human_bytes(r.source_bytes)} -> "
        f"{human_bytes(r.bundle_bytes)} in {r.seconds:.2f} s; {r.decoded} blobs decoded, "
        f"{r.encoded} compressed, {r.copied} copied as they were"))


@guarded
def unpack(
    bundle: Annotated[Path, typer.Argument(help="The bundle (.tdd).")],
    dest: Annotated[Path, typer.Argument(help="Folder to restore into: DEST/NAME/<original paths>.")],
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Restore only this model (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty DEST (only the bundle's own files are replaced).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
) -> None:
    """Restore every original file byte for byte (sha256 checked)."""
    from ..ops.unpack import unpack as unpack_bundle
    with phased_progress(quiet) as progress:
        r = unpack_bundle(bundle, dest, models=model, force=force, progress=progress)
    speed = r.bytes / r.seconds if r.seconds else 0
    stdout_console().print(plain(f"restored {r.files} files of {len(r.models)} models "
                                 f"({human_bytes(r.bytes)}) into {r.dest} in {r.seconds:.2f} "
                                 f"s ({human_bytes(speed)}/s); every sha256 matches"))


@guarded
def verify(
    bundle: Annotated[Path, typer.Argument(help="The bundle (.tdd).")],
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
) -> None:
    """Decode every blob, check every hash and every file's sha256."""
    from ..ops.verify import verify as verify_bundle
    with phased_progress(quiet) as progress:
        r = verify_bundle(bundle, progress=progress)
    stdout_console().print(f"ok: {r.blobs} blobs ({human_bytes(r.stored_bytes)} stored), "
                           f"{r.files} files ({human_bytes(r.logical_bytes)}) verified in "
                           f"{r.seconds:.2f} s")


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
    bundle: Annotated[Path, typer.Argument(help="The bundle (.tdd).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
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
        print(json.dumps(info, indent=2))
        return
    out = stdout_console()
    out.print(plain(f"{info['bundle']}: format {'.'.join(map(str, info['format_version']))}, "
                    f"{human_bytes(info['bundle_bytes'])}, {info['blobs']} blobs, layout "
                    f"{info['layout']}, written by tdedup {info['tool_version']}"))
    t = Table(title="models")
    for col in ("model", "layout", "files", "tensors", "file bytes", "shared tensors",
                "delta tensors"):
        t.add_column(col, justify="left" if col in ("model", "layout") else "right")
    for m in info["models"]:
        t.add_row(plain(m["name"]), plain(m["layout"]), str(m["files"]), str(m["tensors"]),
                  human_bytes(m["file_bytes"]), human_bytes(m["shared_tensor_bytes"]),
                  str(m["delta_tensors"]))
    out.print(t)
    e = Table(title="encodings")
    for col in ("encoding", "blobs", "decoded", "stored", "ratio"):
        e.add_column(col, justify="left" if col == "encoding" else "right")
    for name, v in sorted(info["encodings"].items()):
        ratio = v["decoded_bytes"] / v["stored_bytes"] if v["stored_bytes"] else 1.0
        e.add_row(name, str(v["blobs"]), human_bytes(v["decoded_bytes"]),
                  human_bytes(v["stored_bytes"]), f"{ratio:.2f}x")
    out.print(e)
    if info["deltas"]:
        d = Table(title=f"deltas ({len(info['deltas'])}, largest first)")
        for col in ("blob", "base", "encoding", "decoded", "stored", "ratio"):
            d.add_column(col)
        for x in sorted(info["deltas"], key=lambda x: -x["decoded_bytes"])[:15]:
            d.add_row(x["blob"][:12], x["base"][:12], x["encoding"],
                      human_bytes(x["decoded_bytes"]), human_bytes(x["stored_bytes"]),
                      f"{x['ratio']}x")
        out.print(d)


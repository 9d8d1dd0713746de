"""``add`` and ``remove``: change which models a bundle holds without re-encoding it.

A bundle grows by a fine-tune a week. Unpacking and packing everything again re-encodes
every blob; here the blobs already stored are copied into the new bundle by the kernel
(``copy_file_range``: no byte passes through Python, and file systems that share extents
make it a reflink), and only the new models' tensors are hashed, planned and encoded.

New tensors may be stored as deltas against tensors the bundle already holds: the
bundle's tensors are handed to the delta planner as earlier candidates (raw blobs are
read in place in the bundle, others decoded once into a temporary spill file beside the
output), so an added fine-tune is stored as it would be by a fresh pack of both.

The result is written as pack writes (temporary name, fsync, rename over the target), so
the old bundle stays valid until the new one replaces it.

``merge`` is ``pack``'s part when bundles are among its inputs: the first bundle is kept
(re-laid first, as ``convert`` does, when another layout is asked for) and the rest added.
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .._fs import InputFile, mapped, open_temp
from .._version import __version__
from ..analyzers.delta_planning import DeltaChoice, plan_deltas
from ..analyzers.scan import ScannedModels, hash_models
from ..analyzers.tensor_hashes import HashedTensor
from ..errors import UsageError, display_path
from ..format.bundle.constants import DEFAULT_LEVEL, MAX_DELTA_DEPTH, BlobEncoding, BundleLayout
from ..format.bundle.hashing import hash_bytes
from ..format.bundle.manifest import FileEntry, Manifest, ModelEntry, TensorEntry
from ..format.bundle.reader import Bundle
from ..format.bundle.writer import BundleWriter
from ..format.checkpoints.dtypes import element_width
from ..format.checkpoints.records import (
    FileKind,
    ModelLayout,
    ModelSource,
    SourceFile,
    TensorRecord,
)
from ..format.checkpoints.sources import (
    ModelArg,
    assign_names,
    open_model,
    parse_model_arg,
)
from ..format.codecs.zstd import zstd_compress
from . import ProgressFn
from .convert import convert, layout_of
from .inputs import bundle_names, check_model_names, is_bundle, staged_bundles
from .pack import ROTATED_DTYPES, choose_encoding, layout_bytes, parse_layout, sha256_file

#: Blobs encoded ahead of the writer (bounds memory to a few blobs).
WINDOW = 6


@dataclass(slots=True)
class EditResult:
    """What ``add`` or ``remove`` wrote."""

    path: Path
    models: list[str]  # every model of the new bundle
    changed: list[str]  # the models added or removed
    copied_blobs: int
    new_blobs: int
    bundle_bytes: int
    seconds: float
    layout: str = BundleLayout.COMPACT.value


def _renamed(models: list[ModelEntry], renames: Mapping[str, str] | None) -> list[ModelEntry]:
    """The bundle's models, those in ``renames`` under their new names."""
    if not renames:
        return list(models)
    return [ModelEntry(renames.get(m.name, m.name), m.layout, m.files, m.hub) for m in models]


def summary_of(manifest: Manifest) -> dict:
    """The manifest's ``summary`` object, recomputed from its models and blobs."""
    tensors = {t.hash: t.length for m in manifest.models for f in m.files for t in f.tensors}
    counts: dict[str, int] = {}
    for rec in manifest.blobs.values():
        counts[rec.encoding.name.lower()] = counts.get(rec.encoding.name.lower(), 0) + 1
    return {"models": len(manifest.models),
            "logical_bytes": sum(m.file_bytes for m in manifest.models),
            "tensor_bytes": sum(m.tensor_bytes for m in manifest.models),
            "distinct_tensor_bytes": sum(tensors.values()),
            "stored_blob_bytes": sum(b.stored_length for b in manifest.blobs.values()),
            "encodings": counts}


def _windowed(pool: ThreadPoolExecutor, fn, items, window: int = WINDOW):
    """``pool.map(fn, items)`` in order, with at most ``window`` results held ahead."""
    pending: list = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def _copy_blobs(writer: BundleWriter, bundle: Bundle, digests, progress) -> int:
    """Kernel-copy blobs of ``bundle`` (every stored checksum checked first), in file
    order."""
    recs = sorted((bundle.blob(d) for d in digests), key=lambda r: r.offset)
    total = sum(r.stored_length for r in recs)
    for rec in recs:
        bundle.check_stored(rec)  # never carry a corrupted blob into a new bundle
    with open(bundle.path, "rb") as src:
        for rec in recs:
            writer.copy_blob(rec, src.fileno())
            progress("copying", rec.stored_length, total)
    return len(recs)


def _finish(writer: BundleWriter, models: list[ModelEntry], level: int, layout: str) -> int:
    manifest = Manifest(models, {}, tool_version=__version__)
    manifest.blobs = writer.blobs
    manifest.summary = {**summary_of(manifest), "layout": layout}
    return writer.finish(manifest, level=level, validate=True)


def remove(bundle_path: str | os.PathLike, names: Sequence[str], *,
           output: str | os.PathLike | None = None, level: int = DEFAULT_LEVEL,
           progress: ProgressFn | None = None,
           renames: Mapping[str, str] | None = None) -> EditResult:
    """Drop models ``names`` and the blobs no other model needs; nothing is re-encoded.
    ``renames``: new names of kept models (old name -> new).

    Writes ``output`` (default: over ``bundle_path``, atomically)."""
    t0 = time.perf_counter()
    report = progress or (lambda phase, n, total: None)
    target = Path(output or bundle_path)
    names = [unicodedata.normalize("NFC", n) for n in names]
    with Bundle(bundle_path) as b:
        unknown = [n for n in names if n not in b.model_names]
        for n in unknown:
            b.model(n)  # raises ModelNotFoundError naming what the bundle has
        kept = [m for m in b.manifest.models if m.name not in set(names)]
        if not kept:
            raise UsageError("removing every model would leave an empty bundle",
                             path=bundle_path, hint="delete the file instead")
        b.check_padding()
        layout = layout_of(b.manifest)
        with BundleWriter(target, alignment=b.manifest.alignment) as w:
            copied = _copy_blobs(w, b, b.manifest.blobs_of(kept), report)
            kept = _renamed(kept, renames)
            size = _finish(w, kept, level, layout)
    return EditResult(target, [m.name for m in kept], list(names), copied, 0, size,
                      time.perf_counter() - t0, layout)


# -- add ---------------------------------------------------------------------------------

def _bundle_models(b: Bundle, wanted: set[tuple[str, int]], make_spill,
                   pool: ThreadPoolExecutor
                   ) -> tuple[list[ModelSource], dict[str, list[HashedTensor]]]:
    """The bundle's models as planner candidates: only tensors whose (dtype, length) a new
    tensor has. Raw blobs are located in the bundle itself; others are decoded (on the
    pool) into a spill file (``make_spill(nbytes)`` makes it). Their stored checksums are
    checked by the copy, before anything encoded against them is written."""
    tensors = [(m, t) for m in b.manifest.models for f in m.files for t in f.tensors
               if t.length and (t.dtype, t.length) in wanted]
    placed: dict[str, tuple[Path, int]] = {}
    to_decode = []
    for _, t in tensors:
        if t.hash not in placed:
            rec = b.blob(t.hash)
            if rec.encoding is BlobEncoding.RAW:
                placed[t.hash] = (b.path, rec.offset)
            else:
                placed[t.hash] = (b.path, -1)
                to_decode.append(t.hash)
    spill = make_spill(sum(b.blob(d).decoded_length for d in to_decode))

    pos = 0
    with open(spill, "r+b") as out:
        for digest, data in zip(to_decode, _windowed(pool, b.read_blob, to_decode)):
            out.write(data)
            placed[digest] = (spill, pos)
            pos += memoryview(data).nbytes
    out_models, hashed = [], {}
    for m in b.manifest.models:
        raw = SourceFile("<bundle>", b.path, b.size, FileKind.SAFETENSORS)
        spilled = SourceFile("<spill>", spill, pos, FileKind.SAFETENSORS)
        hs = []
        for mm, t in tensors:
            if mm is not m:
                continue
            path, off = placed[t.hash]
            sf = raw if path == b.path else spilled
            r = TensorRecord(m.name, sf.rel_path, t.name, t.dtype, tuple(t.shape), off,
                             t.length)
            sf.tensors.append(r)
            hs.append(HashedTensor(r, t.hash))
        out_models.append(ModelSource(m.name, b.path, ModelLayout.FOLDER,
                                      [f for f in (raw, spilled) if f.tensors]))
        hashed[m.name] = hs
    return out_models, hashed


#: Decoded candidates up to this size are spilled into memory (a memfd), larger ones into
#: a temporary file beside the output (never more than a quarter of the free memory).
MEMORY_SPILL = 2 << 30


def _spill_file(stack: ExitStack, target: Path, nbytes: int) -> Path:
    """Where decoded candidate bases go: an anonymous memory file when they fit, else a
    temporary file beside the output; removed when ``stack`` closes."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 0
    if hasattr(os, "memfd_create") and nbytes <= min(MEMORY_SPILL, free // 4):
        fd = os.memfd_create("tdedup-spill")
        stack.callback(os.close, fd)
        return Path(f"/proc/self/fd/{fd}")
    path, f = open_temp(target.with_name(target.name + ".spill"))
    f.close()
    stack.callback(path.unlink, missing_ok=True)
    return path


def _depths(b: Bundle, choices: dict, order: list) -> dict:
    """Drop planned deltas whose chain through the bundle's own would be too deep."""
    depth = {h: d for h, d in b.manifest.with_bases(b.manifest.blobs).items()}
    kept: dict = {}
    for key in order:
        c = choices.get(key)
        if c is None:
            continue
        base_depth = depth.get(c.base[0], 0)
        if base_depth + 1 <= MAX_DELTA_DEPTH:
            kept[key] = c
            depth[key[0]] = base_depth + 1
    return kept


def _order(keys: list, choices: dict[tuple, DeltaChoice]) -> list:
    """New contents in first-occurrence order, a new base before its deltas."""
    order, placed, new = [], set(), set(keys)

    def place(key, depth=0):
        if key in placed:
            return
        c = choices.get(key)
        if c is not None and c.base in new and depth < 64:
            place(c.base, depth + 1)
        placed.add(key)
        order.append(key)

    for k in keys:
        place(k)
    return order


def add(bundle_path: str | os.PathLike, paths: Sequence[str | ModelArg], *,
        output: str | os.PathLike | None = None, level: int = DEFAULT_LEVEL,
        delta: str = "auto", workers: int = 2, progress: ProgressFn | None = None,
        renames: Mapping[str, str] | None = None) -> EditResult:
    """Add the models ``paths`` (``PATH`` or ``NAME=PATH``) to a bundle.

    The bundle's blobs are copied unchanged; new tensors are deduplicated against them and
    may be stored as deltas against them. ``renames``: new names of the bundle's models
    (old name -> new). Writes ``output`` (default: over ``bundle_path``, atomically: the
    old bundle stays valid until the rename)."""
    if delta not in ("auto", "off"):
        raise UsageError(f"--delta must be 'auto' or 'off', not {delta!r}")
    t0 = time.perf_counter()
    report = progress or (lambda phase, n, total: None)
    target = Path(output or bundle_path)
    args = [a if isinstance(a, ModelArg) else parse_model_arg(str(a)) for a in paths]
    if not args:
        raise UsageError("no models given")
    with Bundle(bundle_path) as b, ExitStack() as stack:
        own = _renamed(b.manifest.models, renames)
        taken = {m.name for m in own}
        names = assign_names(args)
        clash = [i for i, n in enumerate(names) if n in taken]
        if clash:
            i = clash[0]
            raise UsageError(f"its model would be named {names[i]!r}, as a model of "
                             f"{display_path(bundle_path)} is", path=args[i].path,
                             hint="give another name as NAME=PATH, or remove the old one "
                             "first")
        new_models = [open_model(a, n) for a, n in zip(args, names)]
        # New blobs follow the bundle's layout (serving: self-contained blobs stay raw).
        layout = layout_of(b.manifest)
        raw_only = layout == BundleLayout.SERVING.value
        b.check_padding()
        w = stack.enter_context(BundleWriter(target, alignment=b.manifest.alignment))
        # The old blobs are checked and kernel-copied beside the hashing and planning
        # (their checksums are what vouches for every base decoded below).
        copier = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        copy_done = copier.submit(_copy_blobs, w, b, list(b.manifest.blobs), report)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=max(1, workers)))
        # New files are read as pack reads them (by offset, identity checked before the
        # bundle is published); their sha256 runs beside the hashing.
        inputs: dict[Path, InputFile] = {}
        for m in new_models:
            for f in m.files:
                if f.abs_path not in inputs:
                    inputs[f.abs_path] = stack.enter_context(
                        InputFile(f.abs_path, expect_size=f.size))
        shas = {id(f): pool.submit(sha256_file, inputs[f.abs_path], f.size)
                for m in new_models for f in m.files}
        total = sum(m.tensor_bytes for m in new_models)
        new_scan = hash_models(new_models, lambda n: report("hashing", n, total))
        have = set(b.manifest.blobs)
        firsts = {k: h for k, h in new_scan.first_occurrences().items() if k[0] not in have}
        choices: dict = {}
        scanned = new_scan
        if delta == "auto" and firsts:
            wanted = {(h.record.dtype, h.record.length) for h in firsts.values()}
            old_models, old_hashed = _bundle_models(
                b, wanted, lambda n: _spill_file(stack, target, n), pool)
            scanned = ScannedModels(old_models + new_models, {**old_hashed, **new_scan.hashed})
            planned = plan_deltas(scanned, only=set(firsts)).choices
            choices = _depths(b, planned, list(firsts))
        copied = copy_done.result()
        views: dict[Path, memoryview] = {}

        def view_of(path: Path):
            if path not in views:
                views[path] = stack.enter_context(mapped(path))
            return views[path]

        def source(h: HashedTensor):
            """A tensor's bytes: the bundle's (and decoded bases) from their maps, a new
            file's read again and checked against the hash it was planned with."""
            path, off, length = scanned.locate(h)
            if path not in inputs:
                return view_of(path)[off:off + length]
            data = inputs[path].read(off, length)
            if hash_bytes(data) != h.digest:
                raise inputs[path].changed(f"tensor {h.record.name!r} no longer has the "
                                           "bytes it was hashed with")
            return data

        all_firsts = scanned.first_occurrences()

        def job(key):
            h = firsts[key]
            c = choices.get(key)
            if raw_only and c is None:
                return key, BlobEncoding.RAW, source(h), None
            base = source(all_firsts[c.base]) if c is not None else None
            enc, stored, used = choose_encoding(source(h), element_width(h.record.dtype), level,
                                                base=base, delta=c,
                                                rotate=h.record.dtype in ROTATED_DTYPES)
            if raw_only and not used:  # as pack --layout serving does
                enc, stored = BlobEncoding.RAW, source(h)
            return key, enc, stored, (c.base[0] if used else None)

        distinct = sum(k[1] for k in firsts)
        for result in _windowed(pool, job, _order(list(firsts), choices)):
            _write(w, result, report, distinct)
        entries = [_model_entry(m, new_scan, w, inputs, shas, None if raw_only else level)
                   for m in new_models]
        for src in inputs.values():
            src.check_unchanged()
        size = _finish(w, own + entries, level, layout)
        new_blobs = len(w.blobs) - copied
        all_names = [m.name for m in own] + names
    return EditResult(target, all_names, names, copied, new_blobs, size,
                      time.perf_counter() - t0, layout)


def merge(args: Sequence[ModelArg], output: str | os.PathLike, *, level: int = DEFAULT_LEVEL,
          delta: str = "auto", layout: str | BundleLayout | None = None, workers: int = 2,
          progress: ProgressFn | None = None) -> EditResult:
    """``pack`` of inputs among which are bundles: the first bundle is kept as it is (its
    blobs copied, its one model renamed when given as ``NAME=BUNDLE``), the other bundles'
    models are restored beside the output (sha256-checked) and added with the rest.

    ``layout`` (default: the first bundle's own) is honoured: when it differs, the first
    bundle is re-laid first, as ``convert`` does (deltas copied byte for byte), into a
    temporary file beside the output, and the new blobs follow it. Refuses a model name two
    inputs would give before anything is written (``inputs.check_model_names``)."""
    t0 = time.perf_counter()
    output = Path(output)
    first = next((a for a in args if is_bundle(a.path)), None)
    if first is None:
        raise UsageError("no bundle among the inputs to merge")
    check_model_names(args, into=first)
    with Bundle(first.path, mapped=False) as b:
        own, names = layout_of(b.manifest), list(b.model_names)
    renames = {old: new for old, new in zip(names, bundle_names(first)) if old != new}
    target = parse_layout(layout if layout is not None else own).value
    rest = [a for a in args if a is not first]
    with ExitStack() as stack:
        source = Path(first.path)
        if target != own and not rest and not renames:
            c = convert(source, output, target, force=True, level=level, workers=workers,
                        progress=progress)
            return EditResult(output, names, [], c.copied, c.decoded + c.encoded,
                              c.bundle_bytes, time.perf_counter() - t0, target)
        if target != own:
            source, f = open_temp(output.with_name(output.name + ".relaid"))
            f.close()
            stack.callback(source.unlink, missing_ok=True)
            convert(first.path, source, target, force=True, level=level, workers=workers,
                    progress=progress)
        staged = stack.enter_context(staged_bundles(rest, output.resolve().parent))
        if staged:
            r = add(source, staged, output=output, level=level, delta=delta, workers=workers,
                    progress=progress, renames=renames)
        else:
            r = remove(source, [], output=output, level=level, progress=progress,
                       renames=renames)
    r.seconds = time.perf_counter() - t0
    return r


def _write(w: BundleWriter, result, report, distinct: int) -> None:
    key, enc, stored, base = result
    w.add_blob(key[0], enc, stored, key[1], base=base)
    report("packing", key[1], distinct)


def _model_entry(m: ModelSource, scan: ScannedModels, w: BundleWriter,
                 inputs: dict[Path, InputFile], shas,
                 level: int | None) -> ModelEntry:
    """The manifest entry of a new model; its layout blobs are written if new (raw when
    ``level`` is None: the serving layout)."""
    digests = {(h.record.file, h.record.name): h.digest for h in scan.hashed[m.name]}
    files = []
    for f in m.files:
        layout = layout_bytes(f, inputs[f.abs_path]) if f.size else b""
        digest = hash_bytes(layout)
        if digest not in w:
            stored = zstd_compress(layout, level) if level is not None else layout
            if len(stored) < len(layout):
                w.add_blob(digest, BlobEncoding.ZSTD, stored, len(layout))
            else:
                w.add_blob(digest, BlobEncoding.RAW, layout, len(layout))
        tensors = [TensorEntry(t.name, t.dtype, list(t.shape), t.offset, t.length,
                               digests[(t.file, t.name)]) for t in f.tensors]
        info = {k: v for k, v in f.info.items() if isinstance(v, (str, int, float))}
        files.append(FileEntry(f.rel_path, f.size, shas[id(f)].result(), f.kind.value,
                               digest, tensors, info))
    return ModelEntry(m.name, m.layout.value, files, m.hub)

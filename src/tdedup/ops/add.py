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

import fcntl
import os
import stat
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .._fs import InputFile, mapped, open_temp, remove_stale_temps
from .._version import __version__
from ..analyzers.delta_planning import plan_deltas
from ..analyzers.scan import ScannedModels, hash_models
from ..analyzers.tensor_hashes import HashedTensor
from ..errors import IntegrityError, OutputError, UsageError, display_path
from ..format.bundle.constants import DEFAULT_LEVEL, BundleLayout
from ..format.bundle.hashing import hash_bytes
from ..format.bundle.manifest import FileEntry, Manifest, ModelEntry, TensorEntry
from ..format.bundle.reader import Bundle
from ..format.bundle.writer import BundleWriter
from ..format.checkpoints.records import ModelSource
from ..format.checkpoints.sources import (
    ModelArg,
    assign_names,
    open_model,
    parse_model_arg,
)
from . import ProgressFn, pack_derived
from .convert import convert, layout_of
from .inputs import bundle_names, check_model_names, is_bundle, staged_bundles
from .add_candidates import (
    bases_first,
    bundle_candidates,
    derivation_bases,
    keep_shallow,
    spill_file,
)
from .ordered import in_order
from .pack import encode_content, layout_bytes, parse_layout, sha256_file

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
    counts: dict[str, int] = {}  # of tensor blobs, as pack counts them (spec §6.1)
    for h in tensors:
        name = manifest.blobs[h].encoding.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return {"models": len(manifest.models),
            "logical_bytes": sum(m.file_bytes for m in manifest.models),
            "tensor_bytes": sum(m.tensor_bytes for m in manifest.models),
            "distinct_tensor_bytes": sum(tensors.values()),
            "stored_blob_bytes": sum(b.stored_length for b in manifest.blobs.values()),
            "encodings": counts}


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


@contextmanager
def _writer(b: Bundle, output: str | os.PathLike | None, force: bool
            ) -> Iterator[BundleWriter]:
    """The writer of an edit of ``b``. In place (no ``output``): the file a link names is
    the one replaced, its permissions are kept, and the edit holds an exclusive lock on
    the bundle and fails if another process replaced it meanwhile (two edits at once
    would each drop the other's change). To ``output``: replaced only with ``force``."""
    if output is not None:
        with BundleWriter(output, alignment=b.manifest.alignment, replace=force) as w:
            yield w
        return
    target = Path(os.path.realpath(b.path))
    with open(target, "rb") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError("another tdedup is changing this bundle", path=b.path,
                              hint="run the command again when it has finished") from None
        with BundleWriter(target, alignment=b.manifest.alignment, expect=b.identity,
                          mode=stat.S_IMODE(os.fstat(lock.fileno()).st_mode)) as w:
            yield w


def _finish(writer: BundleWriter, models: list[ModelEntry], level: int, layout: str) -> int:
    manifest = Manifest(models, {}, tool_version=__version__)
    manifest.blobs = writer.blobs
    manifest.summary = {**summary_of(manifest), "layout": layout}
    return writer.finish(manifest, level=level, validate=True)


def remove(bundle_path: str | os.PathLike, names: Sequence[str], *,
           output: str | os.PathLike | None = None, level: int = DEFAULT_LEVEL,
           progress: ProgressFn | None = None,
           renames: Mapping[str, str] | None = None, force: bool = True) -> EditResult:
    """Drop models ``names`` and the blobs no other model needs; nothing is re-encoded.
    ``renames``: new names of kept models (old name -> new).

    Writes ``output`` (replaced only with ``force``) or, by default, over ``bundle_path``
    atomically (see ``_writer``)."""
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
        with _writer(b, output, force) as w:
            copied = _copy_blobs(w, b, b.manifest.blobs_of(kept), report)
            kept = _renamed(kept, renames)
            size = _finish(w, kept, level, layout)
    return EditResult(target, [m.name for m in kept], list(names), copied, 0, size,
                      time.perf_counter() - t0, layout)


# -- add ---------------------------------------------------------------------------------

def add(bundle_path: str | os.PathLike, paths: Sequence[str | ModelArg], *,
        output: str | os.PathLike | None = None, level: int = DEFAULT_LEVEL,
        delta: str = "auto", workers: int = 2, progress: ProgressFn | None = None,
        renames: Mapping[str, str] | None = None, derive: str = "auto",
        force: bool = True) -> EditResult:
    """Add the models ``paths`` (``PATH`` or ``NAME=PATH``) to a bundle.

    The bundle's blobs are copied unchanged; new tensors are deduplicated against them and
    may be stored as deltas against them. ``renames``: new names of the bundle's models
    (old name -> new). Writes ``output`` (replaced only with ``force``) or, by default,
    over ``bundle_path`` atomically: the old bundle stays valid until the rename, and a
    concurrent edit of it makes this one fail (see ``_writer``)."""
    if delta not in ("auto", "off"):
        raise UsageError(f"--delta must be 'auto' or 'off', not {delta!r}")
    pack_derived.plan(ScannedModels([], {}), derive)  # refuses a bad --derive up front
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
        w = stack.enter_context(_writer(b, output, force))
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
        deltas: dict = {}
        derived: dict = {}
        scanned = new_scan
        if firsts and "auto" in (delta, derive):
            # The bundle's tensors that could be a base: of a new tensor's type and length
            # (deltas), of its canonical name and element count (derived).
            sized = ({(h.record.dtype, h.record.length) for h in firsts.values()}
                     if delta == "auto" else set())
            named = (derivation_bases(b, new_models, firsts.values()) if derive == "auto"
                     else set())
            old_models, old_hashed = bundle_candidates(
                b, lambda m, f, t: (t.dtype, t.length) in sized or (m.name, f.path, t.name)
                in named, lambda n: spill_file(stack, target, n), pool, workers)
            scanned = ScannedModels(old_models + new_models, {**old_hashed, **new_scan.hashed})
            # As pack: derived choices first, then the deltas they leave (delta_exclusions).
            derived = {k: c for k, c in pack_derived.plan(scanned, derive).items()
                       if k in firsts}
            if delta == "auto":
                no_delta = pack_derived.delta_exclusions(derived)
                deltas = {k: c for k, c in
                          plan_deltas(scanned, only=set(firsts)).choices.items()
                          if k not in no_delta and c.base not in no_delta.targets}
            deltas, derived = keep_shallow(b, bases_first(list(firsts), deltas, derived),
                                           deltas, derived)
        copied = copy_done.result()
        views: dict[Path, memoryview] = {}

        def view_of(path: Path):
            if path not in views:
                views[path] = stack.enter_context(mapped(path))
            return views[path]

        checked: set[str] = set()

        def source(h: HashedTensor):
            """A tensor's bytes: the bundle's (and decoded bases) from their maps, a new
            file's read again; each checked against the hash it was planned with (a
            bundle's content once)."""
            path, off, length = scanned.locate(h)
            if path not in inputs:
                data = view_of(path)[off:off + length]
                if h.digest not in checked:
                    if hash_bytes(data) != h.digest:
                        raise IntegrityError(f"tensor {h.record.name!r} does not have the "
                                             "bytes its hash names", path=bundle_path)
                    checked.add(h.digest)
                return data
            data = inputs[path].read(off, length)
            if hash_bytes(data) != h.digest:
                raise inputs[path].changed(f"tensor {h.record.name!r} no longer has the "
                                           "bytes it was hashed with")
            return data

        all_firsts = scanned.first_occurrences()

        def job(key):
            h = firsts[key]
            return key, *encode_content(source(h), h.record.dtype, level,
                                        lambda k: source(all_firsts[k]), delta=deltas.get(key),
                                        derived=derived.get(key), raw_only=raw_only)

        distinct = sum(k[1] for k in firsts)
        for result in in_order(pool, job, bases_first(list(firsts), deltas, derived),
                               workers=workers, size=lambda key: key[1]):
            _write(w, result, report, distinct)
        layouts = _layout_store(b, w, level, derive, raw_only)
        entries = [_model_entry(m, new_scan, inputs, shas, layouts) for m in new_models]
        for src in inputs.values():
            src.check_unchanged()
        size = _finish(w, own + entries, level, layout)
        new_blobs = len(w.blobs) - copied
        all_names = [m.name for m in own] + names
    return EditResult(target, all_names, names, copied, new_blobs, size,
                      time.perf_counter() - t0, layout)


def merge(paths: Sequence[str | ModelArg], output: str | os.PathLike, *,
          level: int = DEFAULT_LEVEL,
          delta: str = "auto", layout: str | BundleLayout | None = None, workers: int = 2,
          progress: ProgressFn | None = None, derive: str = "auto",
          force: bool = True) -> EditResult:
    """``pack`` of inputs among which are bundles: the first bundle is kept as it is (its
    blobs copied, its one model renamed when given as ``NAME=BUNDLE``), the other bundles'
    models are restored beside the output (sha256-checked) and added with the rest.

    ``layout`` (default: the first bundle's own) is honoured: when it differs, the first
    bundle is re-laid first, as ``convert`` does (deltas copied byte for byte), into a
    temporary file beside the output, and the new blobs follow it. Refuses a model name two
    inputs would give before anything is written (``inputs.check_model_names``)."""
    t0 = time.perf_counter()
    output = Path(output)
    args = [a if isinstance(a, ModelArg) else parse_model_arg(str(a)) for a in paths]
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
            c = convert(source, output, target, force=force, level=level, workers=workers,
                        progress=progress)
            return EditResult(output, names, [], c.copied, c.decoded + c.encoded,
                              c.bundle_bytes, time.perf_counter() - t0, target)
        if target != own:
            relaid = output.with_name(output.name + ".relaid")
            remove_stale_temps(relaid.parent, {relaid.name})  # a killed merge's copy
            source, f = open_temp(relaid)
            f.close()
            stack.callback(source.unlink, missing_ok=True)
            convert(first.path, source, target, force=True, level=level, workers=workers,
                    progress=progress)
        staged = stack.enter_context(staged_bundles(rest, output.resolve().parent))
        if staged:
            r = add(source, staged, output=output, level=level, delta=delta, workers=workers,
                    progress=progress, renames=renames, derive=derive, force=force)
        else:
            r = remove(source, [], output=output, level=level, progress=progress,
                       renames=renames, force=force)
    r.seconds = time.perf_counter() - t0
    return r


def _write(w: BundleWriter, result, report, distinct: int) -> None:
    key, enc, stored, base = result
    w.add_blob(key[0], enc, stored, key[1], base=base)
    report("packing", key[1], distinct)


def _layout_store(b: Bundle, w: BundleWriter, level: int, derive: str,
                  raw_only: bool) -> pack_derived.LayoutStore:
    """Where new files' non-tensor bytes go, as pack stores them: against the bundle's
    first plain layout of the same file kind when that is smaller (a GGUF file's metadata
    repeats the vocabulary every GGUF file of a ladder holds)."""
    layouts = pack_derived.LayoutStore(w, level, enabled=derive != "off", raw_only=raw_only)
    if derive != "off":
        firsts: dict[str, str] = {}
        for m in b.manifest.models:
            for f in m.files:
                if b.blob(f.layout).base is None and b.blob(f.layout).decoded_length:
                    firsts.setdefault(f.kind, f.layout)
        for kind, digest in firsts.items():
            layouts.seed(digest, bytes(b.read_blob(digest)), kind)
    return layouts


def _model_entry(m: ModelSource, scan: ScannedModels, inputs: dict[Path, InputFile], shas,
                 layouts: pack_derived.LayoutStore) -> ModelEntry:
    """The manifest entry of a new model; its layout blobs are written if new."""
    digests = {(h.record.file, h.record.name): h.digest for h in scan.hashed[m.name]}
    files = []
    for f in m.files:
        layout = layout_bytes(f, inputs[f.abs_path]) if f.size else b""
        digest = hash_bytes(layout)
        layouts.add(digest, layout, f.kind.value)
        tensors = [TensorEntry(t.name, t.dtype, list(t.shape), t.offset, t.length,
                               digests[(t.file, t.name)]) for t in f.tensors]
        info = {k: v for k, v in f.info.items() if isinstance(v, (str, int, float))}
        files.append(FileEntry(f.rel_path, f.size, shas[id(f)].result(), f.kind.value,
                               digest, tensors, info))
    return ModelEntry(m.name, m.layout.value, files, m.hub)

"""The tensors a bundle already holds, as candidate bases for what ``add`` adds.

A model added to a bundle may be a fine-tune of a bundled one (a delta against its
tensors) or another precision of one (a cast or a quantization: derived from them). The
planners only know models, so the bundle's tensors are handed to them as models of their
own, with each file's kind and format facts (a GGUF file's architecture and head counts:
what maps its tensor names onto safetensors ones). Only tensors that could serve are
handed over: those of the type and length of a new tensor (deltas), and those of the
canonical name and element count of a new tensor (derivation, across formats). Raw blobs
are read in place in the bundle; the others are decoded once into a spill file.

The planners know nothing of the chains already in the bundle: :func:`keep_shallow`
drops choices that would make one longer than ``MAX_DELTA_DEPTH`` through the bundle's
own, and :func:`bases_first` orders the new contents so that a base is written before what
is encoded against it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from .._fs import open_temp
from ..analyzers.derivation import canonical_names
from ..analyzers.scan import ScannedModels
from ..analyzers.tensor_hashes import ContentKey, HashedTensor
from ..format.bundle.constants import MAX_DELTA_DEPTH, BlobEncoding
from ..format.bundle.manifest import FileEntry, ModelEntry, TensorEntry
from ..format.bundle.reader import Bundle
from ..format.checkpoints.records import (
    FileKind,
    ModelLayout,
    ModelSource,
    SourceFile,
    TensorRecord,
)
from .ordered import in_order

#: Decoded candidates up to this size are spilled into memory (a memfd), larger ones into
#: a temporary file beside the output (never more than a quarter of the free memory).
MEMORY_SPILL = 2 << 30
#: Suffix of the file a bundle file's decoded tensors are listed under.
DECODED = "#decoded"

Want = Callable[[ModelEntry, FileEntry, TensorEntry], bool]


def candidate_name(name: str) -> str:
    """The name a bundle's model goes by among the planners' models. Never a model name
    (those hold no ``:``), so a new model may take a bundle model's name (a merge that
    renames it) without the planners reading one's tensors for the other's."""
    return f"bundle:{name}"


def _kind(f: FileEntry) -> FileKind:
    try:
        return FileKind(f.kind)
    except ValueError:
        return FileKind.OTHER


def bundle_sources(b: Bundle) -> list[ModelSource]:
    """The bundle's models as the planners see models: files with their kind, format
    facts and tensor records (offsets within the original files; no bytes to read)."""
    out = []
    for m in b.manifest.models:
        files = []
        for f in m.files:
            sf = SourceFile(f.path, b.path, f.size, _kind(f), info=dict(f.info))
            sf.tensors = [TensorRecord(candidate_name(m.name), f.path, t.name, t.dtype,
                                       tuple(t.shape), t.offset, t.length) for t in f.tensors]
            files.append(sf)
        out.append(ModelSource(candidate_name(m.name), b.path, ModelLayout.FOLDER, files))
    return out


def derivation_bases(b: Bundle, new_models: list[ModelSource],
                     new: Iterable[HashedTensor]) -> set[tuple[str, str, str]]:
    """(model, file, tensor) of the bundle's tensors that share a canonical name and an
    element count with a new content: the only ones the derivation planner could pick
    (``analyzers.derivation`` groups by exactly that)."""
    canon = canonical_names(ScannedModels(bundle_sources(b) + new_models, {}))
    groups = {(canon.get((h.record.model, h.record.file, h.record.name)),
               math.prod(h.record.shape)) for h in new}
    return {(m.name, f.path, t.name) for m in b.manifest.models for f in m.files
            for t in f.tensors
            if (canon.get((candidate_name(m.name), f.path, t.name)), math.prod(t.shape))
            in groups}


def bundle_candidates(b: Bundle, want: Want, make_spill: Callable[[int], Path],
                      pool: ThreadPoolExecutor, workers: int
                      ) -> tuple[list[ModelSource], dict[str, list[HashedTensor]]]:
    """The bundle's tensors that ``want`` picks, as models the planners read: raw blobs in
    place in the bundle, others decoded (on the pool) into a spill file that
    ``make_spill(nbytes)`` makes. Each file keeps its path, kind and format facts; its
    decoded tensors are listed under ``path#decoded``. Stored checksums are checked by the
    copy of the bundle's blobs, before anything encoded against them is written."""
    picked = [(m, f, t) for m in b.manifest.models for f in m.files for t in f.tensors
              if t.length and want(m, f, t)]
    placed: dict[str, tuple[Path, int]] = {}
    to_decode = []
    for _, _, t in picked:
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
        blobs = in_order(pool, b.read_blob, to_decode, workers=workers,
                         size=lambda d: b.blob(d).decoded_length)
        for digest, data in zip(to_decode, blobs):
            out.write(data)
            placed[digest] = (spill, pos)
            pos += memoryview(data).nbytes
    files: dict[tuple[str, str, bool], SourceFile] = {}
    hashed: dict[str, list[HashedTensor]] = {candidate_name(m.name): []
                                             for m in b.manifest.models}
    for m, f, t in picked:
        path, off = placed[t.hash]
        decoded = path != b.path
        sf = files.get((m.name, f.path, decoded))
        if sf is None:
            sf = files[(m.name, f.path, decoded)] = SourceFile(
                f.path + DECODED if decoded else f.path, spill if decoded else b.path,
                pos if decoded else b.size, _kind(f), info=dict(f.info))
        r = TensorRecord(candidate_name(m.name), sf.rel_path, t.name, t.dtype, tuple(t.shape),
                         off, t.length)
        sf.tensors.append(r)
        hashed[candidate_name(m.name)].append(HashedTensor(r, t.hash))
    models = [ModelSource(candidate_name(m.name), b.path, ModelLayout.FOLDER,
                          [sf for (name, _, _), sf in files.items() if name == m.name])
              for m in b.manifest.models]
    return models, hashed


def spill_file(stack: ExitStack, target: Path, nbytes: int) -> Path:
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


def bases_first(keys: list[ContentKey], *choices: Mapping) -> list[ContentKey]:
    """New contents in first-occurrence order, each new base (of any of ``choices``:
    deltas, derived) before what is encoded against it."""
    order: list[ContentKey] = []
    placed: set[ContentKey] = set()
    new = set(keys)

    def place(key: ContentKey, depth: int = 0) -> None:
        if key in placed:
            return
        for cs in choices:
            c = cs.get(key)
            if c is not None and c.base in new and depth < 64:
                place(c.base, depth + 1)
        placed.add(key)
        order.append(key)

    for k in keys:
        place(k)
    return order


def keep_shallow(b: Bundle, order: list[ContentKey], *choices: dict) -> tuple[dict, ...]:
    """``choices`` (deltas, derived) without those whose chain through the bundle's own
    blobs would be longer than ``MAX_DELTA_DEPTH``; ``order`` puts bases first. A content
    that keeps a choice of each kind counts the deeper of the two."""
    depth = dict(b.manifest.with_bases(b.manifest.blobs))
    kept: tuple[dict, ...] = tuple({} for _ in choices)
    for key in order:
        deepest = 0
        for cs, out in zip(choices, kept):
            c = cs.get(key)
            if c is None:
                continue
            d = depth.get(c.base[0], 0) + 1
            if d <= MAX_DELTA_DEPTH:
                out[key] = c
                deepest = max(deepest, d)
        if deepest:
            depth[key[0]] = deepest
    return kept

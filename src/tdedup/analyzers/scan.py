"""Index and hash a set of models: the first pass that analyze and pack share.

Hashing is planned as work units (:mod:`.work_units`): every weight file is stamped,
looked up in the incremental index when one is given (:mod:`.index`), and the rest is
hashed here or on a Dask cluster (:mod:`.distributed`). Digests are put back in file
order, so the result is the same wherever the bytes were hashed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, TdedupError
from ..format.checkpoints.records import ModelSource, SourceFile
from ..format.checkpoints.sources import ModelArg, open_models
from .screen import Screen, screen_files
from .tensor_hashes import ContentKey, HashedTensor
from .work_units import FileStamp, HashUnit, UnitDigests, UnitRunner, hash_here, plan_units

if TYPE_CHECKING:
    from .index import TensorIndex


@dataclass(slots=True)
class HashCounts:
    """Where a scan's digests came from (weight files, and their tensor bytes)."""

    hashed_files: int = 0
    hashed_bytes: int = 0
    indexed_files: int = 0  # taken from the index, not read
    indexed_bytes: int = 0
    screened_bytes: int = 0  # set apart by the screen (analyze): never read in full
    same_file_bytes: int = 0  # of a file given again (same real path): read once
    changed: list[str] = field(default_factory=list)  # moved while hashed: not recorded


@dataclass(slots=True)
class ScannedModels:
    """Models with every tensor hashed, in the order they were given."""

    models: list[ModelSource]
    hashed: dict[str, list[HashedTensor]]
    counts: HashCounts = field(default_factory=HashCounts)
    _by_file: dict[tuple[str, str], SourceFile] = field(default_factory=dict, repr=False,
                                                        compare=False)

    @property
    def tensor_bytes(self) -> int:
        return sum(m.tensor_bytes for m in self.models)

    def source_file(self, model: str, rel_path: str) -> SourceFile:
        """The file a tensor record (``record.model``, ``record.file``) came from (found
        through a map built on first use: the planners ask once per sampled tensor)."""
        if not self._by_file:
            for m in self.models:
                for f in m.files:
                    self._by_file.setdefault((m.name, f.rel_path), f)
        try:
            return self._by_file[model, rel_path]
        except KeyError:
            raise KeyError((model, rel_path)) from None

    def first_occurrences(self) -> dict[ContentKey, HashedTensor]:
        """Each distinct content key with its first occurrence, in model/file order."""
        out: dict[ContentKey, HashedTensor] = {}
        for m in self.models:
            for h in self.hashed[m.name]:
                out.setdefault(h.key, h)
        return out

    def locate(self, h: HashedTensor) -> tuple[Path, int, int]:
        """(absolute path, offset, length) of a hashed tensor's bytes."""
        f = self.source_file(h.record.model, h.record.file)
        return f.abs_path, h.record.offset, h.record.length


def index_models(paths: Sequence[str | ModelArg]) -> list[ModelSource]:
    """Read every model's headers (cheap); no tensor data is touched."""
    return open_models(list(paths))


def _check_unchanged(f: SourceFile, stamp: FileStamp, counts: HashCounts, *,
                     told: bool) -> None:
    """A screened file after the hash pass: shrunk below its tensors, one error (the
    screen left tensors of it unread, whose reads would have failed); otherwise, if the
    hash pass did not read it (``told``: it did, and ``hash_unit`` compared its stamps),
    changed since the screen is a warning that the report covers the bytes read."""
    now = FileStamp.of(os.path.realpath(f.abs_path))
    if now.size < max(t.offset + t.length for t in f.tensors):
        raise InputError(f"changed while tdedup was reading it (it shrank to {now.size} "
                         "bytes); try again once it is no longer being written", path=f.abs_path)
    if now != stamp and not told:
        counts.changed.append(str(f.abs_path))


def screen_models(models: list[ModelSource]) -> Screen:
    """Screen every tensor of ``models`` (:mod:`.screen`) before :func:`hash_models`."""
    return screen_files([f for m in models for f in m.weight_files])


def hash_models(models: list[ModelSource],
                progress: Callable[[int], None] | None = None, *,
                index: TensorIndex | None = None,
                runner: UnitRunner | None = None,
                screen: Screen | None = None) -> ScannedModels:
    """Hash every tensor of every model (the expensive, streaming pass).

    ``index``: reuse the digests of files it holds under their current stamp, and record
    every file hashed here that held still. ``runner``: where units run (a Dask cluster,
    :func:`.distributed.dask_runner`); this process by default. ``screen``
    (:func:`screen_models`, never with an index): hash only the tensors it left
    undecided; the others keep the screen's digests (placeholders for the ones it set
    apart: what ``analyze`` needs, not what ``pack`` needs).
    """
    if screen is not None and index is not None:
        raise ValueError("an index records true digests only: screen without one")
    files = [f for m in models for f in m.weight_files]
    digests: list[list[str] | None] = [None] * len(files)
    counts = HashCounts()
    todo: list[HashUnit] = []
    owner: list[int] = []  # file number of each unit
    # The tensors of each file to hash (all of them unless screened).
    wanted = (screen.undecided if screen is not None
              else [list(range(len(f.tensors))) for f in files])

    def complete(n: int, found: list[str]) -> list[str] | None:
        """File ``n``'s digests: ``found`` for its wanted tensors, the screen's for the
        rest (None if ``found`` does not fit: never a wrong report)."""
        if len(found) != len(wanted[n]):
            return None
        if screen is None:
            return found
        out = list(screen.digests[n])
        for i, d in zip(wanted[n], found):
            out[i] = d
        return out

    skipped = [0] * len(files)  # tensor bytes the screen decided, per file
    indexed: set[int] = set()  # files whose digests the index gave
    first_of: dict[tuple[str, tuple[tuple[int, int], ...]], int] = {}
    alias: dict[int, int] = {}  # file -> the first file with its real path and ranges
    for n, f in enumerate(files):
        ranges = [(f.tensors[i].offset, f.tensors[i].length) for i in wanted[n]]
        skipped[n] = f.tensor_bytes - sum(length for _, length in ranges)
        counts.screened_bytes += skipped[n]
        if progress and skipped[n]:
            progress(skipped[n])
        if not ranges:
            digests[n] = complete(n, [])
            continue
        path = os.path.realpath(f.abs_path)
        # One file given twice (hub cache revisions sharing a blob, a model under two
        # names) is read once.
        n0 = first_of.setdefault((path, tuple(ranges)), n)
        if n0 != n:
            alias[n] = n0
            counts.same_file_bytes += f.tensor_bytes - skipped[n]
            if progress:
                progress(f.tensor_bytes - skipped[n])
            continue
        # Screened: the stamp the screen saw, so that a change after it is told.
        stamp = (screen.stamps[n] if screen is not None else None) or FileStamp.of(path)
        known = index.lookup(path, stamp, ranges) if index is not None else None
        if known is not None:
            digests[n] = known
            indexed.add(n)
            counts.indexed_files += 1
            counts.indexed_bytes += f.tensor_bytes
            if progress:
                progress(f.tensor_bytes)
            continue
        units = plan_units(path, stamp, ranges)
        todo += units
        owner += [n] * len(units)

    parts: dict[int, dict[int, UnitDigests]] = {}
    expected = Counter(owner)
    for u, result in (runner or hash_here)(todo, progress):
        n = owner[u]
        parts.setdefault(n, {})[todo[u].first] = result
        if len(parts[n]) < expected[n]:
            continue
        done = [r for _, r in sorted(parts.pop(n).items())]
        found = [d for r in done for d in r.digests]
        digests[n] = complete(n, found)
        f = files[n]
        counts.hashed_files += 1
        counts.hashed_bytes += f.tensor_bytes - skipped[n]
        if any(r.changed for r in done):
            counts.changed.append(str(f.abs_path))
        elif index is not None and all(r.recordable for r in done):
            index.record(todo[u].path, todo[u].stamp,
                         [(t.offset, t.length) for t in f.tensors], found)

    for n, seen in enumerate(screen.stamps if screen is not None else ()):
        if seen is not None:  # the hash pass read it (or its twin) if any was undecided
            _check_unchanged(files[n], seen, counts, told=bool(wanted[n]))
    for n, n0 in alias.items():
        got0 = digests[n0]
        digests[n] = None if got0 is None else complete(n, [got0[i] for i in wanted[n0]])
        # Counted as its first occurrence was (its bytes as same_file_bytes).
        if n0 in indexed:
            counts.indexed_files += 1
        else:
            counts.hashed_files += 1

    hashed: dict[str, list[HashedTensor]] = {}
    n = 0
    for m in models:
        out = hashed.setdefault(m.name, [])
        for f in m.weight_files:
            got = digests[n]
            if got is None or len(got) != len(f.tensors):  # never a wrong report
                raise TdedupError("hashing ended without every tensor's digest",
                                  path=f.abs_path)
            out += [HashedTensor(t, d) for t, d in zip(f.tensors, got)]
            n += 1
    return ScannedModels(models, hashed, counts)

"""Hashing split into work units: a file, or a run of its tensors, with the stamp it had.

A *unit* names an absolute path, the :class:`FileStamp` the planner saw (size, mtime_ns,
inode) and the ``(offset, length)`` ranges of some of the file's tensors, in file order.
:func:`hash_unit` is the one function that reads tensor bytes for a scan, whether it runs
in this process or on a Dask worker (:mod:`.distributed`): the same bytes give the same
digests wherever they are hashed, so the report cannot depend on where the work ran.

A unit also says whether its file held still: stamped before and after hashing, and
compared with the planner's stamp. A file that moved while it was read is hashed all the
same (the report covers what was read, as a local run always did) but is never written to
the incremental index (:mod:`.index`), which must hold only digests that are true of the
stamp they are filed under.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from .._fs import InputFile, worker_threads
from ..errors import InputError
from ..format.bundle.hashing import hash_bytes, hash_chunks

# Large files are split so that several workers share them and a worker's resident
# mapping stays bounded (Dask's memory monitor counts mapped pages in a worker's RSS).
UNIT_BYTES = 256 << 20

#: Bytes read per step while hashing: the buffer stays in L2 from the read that fills it
#: to blake3's pass over it. Units run side by side, one thread each (:func:`hash_here`):
#: 2.4x faster than 16 MiB steps hashed on all cores one unit at a time, and faster than
#: blake3 over a map (bench/RESULTS.md, "## analyze").
HASH_STEP = 1 << 20

# A file modified within this window of its last stamp may change again without its
# mtime moving (coarse file-system clocks): like git's "racily clean" entries, its
# digests are used but not recorded.
RACY_WINDOW_NS = 2_000_000_000

#: Where units run: given the units and a progress callback (bytes done), yields
#: ``(unit number, digests)`` in any order. :func:`hash_here` runs them in this process,
#: :class:`.distributed.DaskRunner` on a Dask cluster.
UnitRunner = Callable[[Sequence["HashUnit"], Callable[[int], None] | None],
                      Iterator[tuple[int, "UnitDigests"]]]


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What identifies one version of a file without reading it: size, mtime, inode.

    The device number is left out on purpose: an NFS mount may have another one on every
    machine of a cluster, while size, mtime and inode come from the server.
    """

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class HashUnit:
    """Some tensors of one file: ``ranges[i]`` is tensor ``first + i`` of the file."""

    path: str  # absolute: workers open it as it is written here
    stamp: FileStamp  # as the planner saw it
    first: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True, slots=True)
class UnitDigests:
    """blake3 hex digests of a unit's ranges, and whether they may be recorded."""

    digests: tuple[str, ...]
    changed: bool  # the file's stamp moved between planning and the end of hashing
    racy: bool  # modified too recently for its stamp to be trusted

    @property
    def recordable(self) -> bool:
        return not (self.changed or self.racy)


def plan_units(path: str, stamp: FileStamp, ranges: list[tuple[int, int]],
               unit_bytes: int = UNIT_BYTES) -> list[HashUnit]:
    """Cut one file's tensors, in order, into units of at most ``unit_bytes`` each.

    A tensor is never split (its digest is of all its bytes at once), so a tensor larger
    than ``unit_bytes`` is a unit of its own.
    """
    units: list[HashUnit] = []
    start, size = 0, 0
    for i, (_, n) in enumerate(ranges):
        if i > start and size + n > unit_bytes:
            units.append(HashUnit(path, stamp, start, tuple(ranges[start:i])))
            start, size = i, 0
        size += n
    if start < len(ranges):
        units.append(HashUnit(path, stamp, start, tuple(ranges[start:])))
    return units


def hash_unit(unit: HashUnit, progress: Callable[[int], None] | None = None) -> UnitDigests:
    """Hash a unit's ranges, read in chunks into one reused buffer (reads, not a map: a
    file that shrinks meanwhile is one line naming it, not a SIGBUS)."""
    before = FileStamp.of(unit.path)
    with InputFile(unit.path) as src:
        digests = []
        for off, n in unit.ranges:
            digests.append(hash_chunks(src.chunks(off, n, HASH_STEP), max_threads=1)
                           if n else hash_bytes(b""))
            if progress:
                progress(n)
    after = FileStamp.of(unit.path)
    changed = not (unit.stamp == before == after)
    racy = time.time_ns() - after.mtime_ns < RACY_WINDOW_NS
    return UnitDigests(tuple(digests), changed, racy)


def hash_here(units: Iterable[HashUnit], progress: Callable[[int], None] | None = None,
              workers: int | None = None) -> Iterator[tuple[int, UnitDigests]]:
    """Run units in this process, on a thread per core (reads and blake3 release the
    GIL), largest first: ``(unit number, digests)`` as each unit finishes. The first
    error stops the rest."""
    todo = list(units)
    workers = min(len(todo), workers or worker_threads())
    if workers <= 1:
        for i, unit in enumerate(todo):
            yield i, hash_unit(unit, progress)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="tdedup-hash") as pool:
        futures = {pool.submit(hash_unit, todo[i], progress): i
                   for i in sorted(range(len(todo)), key=lambda i: -todo[i].nbytes)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

"""Content hashes of tensors: blake3 of each tensor's stored bytes, read through mmap.

A tensor's *content key* is ``(blake3 hex digest, byte length)``. Hashing maps each file
once and hands blake3 zero-copy slices of the map, so no second in-memory copy of a model
is ever made; large tensors are hashed with blake3's own threads.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import blake3

from ..errors import InputError
from ..format.checkpoints.records import ModelSource, SourceFile, TensorRecord

# Below this, blake3's thread pool costs more than it saves. Measured on the corpus
# (bench/analyze.py --profile): 1 MiB left MiniLM's 590 kB attention matrices on one core
# and cost ~15% of the hashing pass; 64 KiB and 0 were alike.
THREADED_MIN_BYTES = 1 << 16

ContentKey = tuple[str, int]


def hash_bytes(data) -> str:
    """blake3 hex digest of a bytes-like object (threaded when large)."""
    n = memoryview(data).nbytes
    if n >= THREADED_MIN_BYTES:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """A read-only memoryview of a whole file through mmap (empty files allowed)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                yield memoryview(b"")
                return
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(m, "madvise"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(m)
            try:
                yield view
            finally:
                # Slices may outlive the block (in an exception's frames, a pending job):
                # then the map closes when the last of them goes, and the error in flight
                # (disk full, say) is not replaced by a BufferError.
                try:
                    view.release()
                    m.close()
                except BufferError:
                    pass
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e


@dataclass(frozen=True, slots=True)
class HashedTensor:
    """A tensor record with its content hash."""

    record: TensorRecord
    digest: str

    @property
    def key(self) -> ContentKey:
        return (self.digest, self.record.length)


def hash_file(f: SourceFile, progress: Callable[[int], None] | None = None) -> list[HashedTensor]:
    """Hash every tensor of one weight file, in file order."""
    out: list[HashedTensor] = []
    if not f.tensors:
        return out
    with mapped(f.abs_path) as view:
        if len(view) < f.size:
            raise InputError(f"file shrank while reading ({len(view)} < {f.size} bytes)",
                             path=f.abs_path)
        for t in f.tensors:
            out.append(HashedTensor(t, hash_bytes(view[t.offset:t.end])))
            if progress:
                progress(t.length)
    return out


def hash_model(model: ModelSource,
               progress: Callable[[int], None] | None = None) -> list[HashedTensor]:
    """Hash every tensor of a model, file by file."""
    return [h for f in model.weight_files for h in hash_file(f, progress)]

"""Content hashes of tensors: blake3 of each tensor's stored bytes, read through mmap.

A tensor's *content key* is ``(blake3 hex digest, byte length)``. Hashing maps each file
once and hands blake3 zero-copy slices of the map, so no second in-memory copy of a model
is ever made; large tensors are hashed with blake3's own threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._fs import mapped
from ..errors import InputError
from ..format.bundle.hashing import hash_bytes
from ..format.checkpoints.records import ModelSource, SourceFile, TensorRecord

ContentKey = tuple[str, int]


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

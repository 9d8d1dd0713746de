"""Content hashes of tensors: blake3 of each tensor's stored bytes.

A tensor's *content key* is ``(blake3 hex digest, byte length)``. Each tensor is read in
chunks into one reused buffer (bounded memory) and hashed with blake3's own threads. Reads,
not a map: a file that shrinks while it is hashed (being rewritten) must give one line
naming it, and a mapped file that shrinks kills the process with SIGBUS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._fs import InputFile
from ..format.bundle.hashing import hash_chunks
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
    with InputFile(f.abs_path, expect_size=f.size) as src:
        for t in f.tensors:
            out.append(HashedTensor(t, hash_chunks(src.chunks(t.offset, t.length))))
            if progress:
                progress(t.length)
    return out


def hash_model(model: ModelSource,
               progress: Callable[[int], None] | None = None) -> list[HashedTensor]:
    """Hash every tensor of a model, file by file."""
    return [h for f in model.weight_files for h in hash_file(f, progress)]

"""Content hashes of tensors: blake3 of each tensor's stored bytes.

A tensor's *content key* is ``(blake3 hex digest, byte length)``. The bytes are read by
:func:`.work_units.hash_unit` (in this process or on a Dask worker) in chunks into one
reused buffer (bounded memory), hashed with blake3's own threads. Reads, not a map: a file
that shrinks while it is hashed (being rewritten) must give one line naming it, and a
mapped file that shrinks kills the process with SIGBUS.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..format.checkpoints.records import TensorRecord

ContentKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class HashedTensor:
    """A tensor record with its content hash."""

    record: TensorRecord
    digest: str

    @property
    def key(self) -> ContentKey:
        return (self.digest, self.record.length)

"""Content hashes of tensors: blake3 of each tensor's stored bytes.

A tensor's *content key* is ``(blake3 hex digest, byte length)``. The bytes are read by
:func:`.work_units.hash_unit` (in this process or on a Dask worker), which maps each file
and hands blake3 zero-copy slices of the map, so no second in-memory copy of a model is
ever made; large tensors are hashed with blake3's own threads.
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

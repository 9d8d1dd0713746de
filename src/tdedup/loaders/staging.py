"""CUDA staging: pinned host buffers and a side stream that carry blobs to one device.

A reused pair of pinned buffers feeds chunked ``non_blocking`` copies on a side stream, so
that reading and decoding the next chunk on the host overlaps the transfer of the last.
Byte planes cross as zstd wrote them and are joined (rotated back) on the device; deltas
are finished there by :mod:`.device_decode`, so only residuals cross the bus.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from ..errors import LoadError
from ..format.codecs.delta import DeltaHeader
from .deps import torch
from .stream import BlobReader, PlaneReader

#: Bytes per pinned staging buffer (two are used in turn).
STAGING_BYTES = 32 << 20


def combine(out, base, op: str, width: int) -> None:
    """Finish a delta blob in place: ``out`` holds its residual, ``base`` the base's bytes
    (uint8 tensors of one length, on one device). See ``stream.DELTA_OPS``."""
    from . import device_decode  # imports torch: only once a load runs

    try:
        device_decode.combine_(out, base, op, width)
    except ValueError as e:
        raise LoadError(f"cannot finish a delta residual: {e}") from None


def predict_add(out, base, head: DeltaHeader, width: int) -> None:
    """Finish a predicted delta (``stream.PREDICTED``) in place on ``out``'s device:
    ``out`` holds its residual, ``base`` the base's bytes; the prediction (weight decay,
    merged low rank) is made from ``base`` there, so only the residual crossed the bus."""
    from . import device_decode as dd

    if head.decay is not None:
        pred = dd.decay_predict(base, *head.decay)
    elif head.lowrank is not None:
        u, v = (torch.tensor(np.ascontiguousarray(f), device=out.device) for f in head.lowrank)
        pred = dd.lowrank_predict(base, u, v)
    else:
        pred = base
    if head.op == "xor":
        dd.xor_residual_(out, pred)
    else:
        dd.add_residual_(out, pred, width, zigzag=head.op == "zigzag-add")


class Stager:
    """Pinned host buffers, reused across loads, feeding one CUDA device on a side stream."""

    _cache: ClassVar[dict] = {}
    scratch: list | None = None  # two device buffers of planes to interleave, once needed

    def __init__(self, device) -> None:
        self.device = device
        self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)]
        self.events: list = [None, None]
        self.stream = torch.cuda.Stream(device)
        self.turn = 0
        self.lock = threading.Lock()  # one load at a time uses these buffers

    @classmethod
    def get(cls, device) -> Stager:
        key = (device.type, device.index)
        if key not in cls._cache:
            cls._cache[key] = cls(device)
        return cls._cache[key]

    def upload(self, reader: BlobReader, dest, pool: ThreadPoolExecutor | None = None
               ) -> None:
        """Decode the reader's bytes chunk by chunk into ``dest`` (a device uint8 tensor).
        A byte-plane reader's (a residual's too) planes are zstd's output, one per thread
        of ``pool``, plane-major in the pinned buffer, joined (rotated back) on the device
        from a reused scratch pair: the host runs zstd alone."""
        from . import device_decode as dd

        planar = isinstance(reader, PlaneReader)
        if planar and self.scratch is None:
            self.scratch = [torch.empty(STAGING_BYTES, dtype=torch.uint8, device=self.device)
                            for _ in range(2)]
        n = len(dest)
        pos = 0
        step = STAGING_BYTES // reader.unit * reader.unit
        if not step:
            raise LoadError(f"a {reader.unit}-byte row does not fit the staging buffer")
        while pos < n:
            k = min(step, n - pos)
            ev = self.events[self.turn]
            if ev is not None:
                ev.synchronize()  # that buffer's last copy is done: it can be refilled
            host = self.buffers[self.turn][:k]
            reader.read_planes(host.numpy(), pool) if planar else reader.readinto(host.numpy())
            with torch.cuda.stream(self.stream):  # the scratch is reused in stream order
                staged = self.scratch[self.turn][:k] if planar else dest[pos:pos + k]
                staged.copy_(host, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                if planar:
                    out = dd.join_planes(staged.view(reader.width, -1), out=dest[pos:pos + k])
                    if reader.rotation:
                        dd.unrotate_(out, reader.width, reader.rotation)
            self.events[self.turn] = ev
            self.turn ^= 1
            pos += k

    def combine(self, out, base, op: str, width: int) -> None:
        with torch.cuda.stream(self.stream):  # after the residual's and the base's copies
            combine(out, base, op, width)

    def predict_add(self, out, base, head: DeltaHeader, width: int) -> None:
        with torch.cuda.stream(self.stream):
            predict_add(out, base, head, width)

    def finish(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


__all__ = ["STAGING_BYTES", "Stager", "combine", "predict_add"]

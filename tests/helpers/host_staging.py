"""The CUDA staging logic on host buffers, without streams or a GPU: ``place_cuda`` runs
(chunked staging, planes joined after the upload, deltas finished there) where there is no
CUDA device. Imports torch: import this module only where torch is installed."""

from __future__ import annotations

import contextlib
import threading

import torch

from tdedup.loaders import staging as sg
from tdedup.loaders.stream import PlaneReader


class NoStream:
    """Stands in for a CUDA stream and event: nothing to wait for on the host."""

    def synchronize(self) -> None:
        pass

    def record(self, stream=None) -> None:
        pass


class HostStager(sg.Stager):
    """``Stager`` with host buffers; records what it uploaded plane-major, and on which
    pool its planes were decompressed."""

    def __init__(self, device) -> None:
        self.device = device
        self.buffers = [torch.empty(sg.STAGING_BYTES, dtype=torch.uint8) for _ in range(2)]
        self.events, self.stream, self.turn = [None, None], NoStream(), 0
        self.lock = threading.Lock()
        self.planar: list = []  # class names of the byte-plane readers uploaded plane-major
        self.pools: list = []  # the pool each one's planes were decompressed on

    def upload(self, reader, dest, pool=None) -> None:
        if isinstance(reader, PlaneReader):
            self.planar.append(type(reader).__name__)
            self.pools.append(pool)
        super().upload(reader, dest, pool)

    def finish(self) -> None:
        pass


def host_staging(monkeypatch, staging_bytes: int = 4096) -> HostStager:
    """Route every CUDA staging call of this test to one HostStager (returned), with
    ``staging_bytes`` per buffer so that blobs cross in many chunks."""
    monkeypatch.setattr(sg, "STAGING_BYTES", staging_bytes)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", NoStream)
    stager = HostStager(torch.device("cpu"))
    monkeypatch.setattr(sg.Stager, "get", classmethod(lambda cls, device: stager))
    return stager

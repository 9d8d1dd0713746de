"""The placement engine: each blob a load needs, decoded once into its own storage.

A *placed* blob is a flat uint8 tensor of its decoded bytes on the target device, in a
storage of its own, so that dropping the last tensor that views it gives its memory back
(the resident registry frees blobs one by one). Blobs already resident (``resident``,
keyed by hash) are neither read nor decoded again: deltas use them as their bases.

- **CPU**: raw blobs become tensors over a private (copy-on-write) map of the bundle, with
  no copy at all; others are decoded straight into fresh host memory. Every blob of one
  delta depth is decoded on a thread pool (zstd, numpy and BLAKE3 release the GIL), in
  chunks, so read, decode and checksum overlap and only a chunk of temporaries is held
  besides the decoded bytes.
- **CUDA**: a reused pair of pinned staging buffers feeds chunked ``non_blocking`` copies
  on a side stream, so that reading and decoding the next chunk overlaps the transfer of
  the last. Byte planes cross as zstd wrote them and are interleaved (rotated back) on the
  device; delta blobs are finished there with :mod:`.device_decode` (XOR, or integer
  addition, of the residual with the base, resident by then, or with the weight-decay or
  low-rank prediction made from it there), so only residuals cross the bus, no base
  comes back and the host runs zstd alone. Checksums are checked on the thread pool
  meanwhile.
- ``verify``: each blob's stored bytes are checked against their stored BLAKE3 checksum
  before any tensor is handed out (a raw blob's checksum is its hash).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import blake3
import numpy as np

from .._fs import check_allocation, worker_threads
from ..errors import IntegrityError, LoadError, TdedupError, UsageError
from ..format.bundle.constants import BlobEncoding
from ..format.bundle.manifest import BlobRecord
from ..format.bundle.reader import Bundle
from ..format.codecs import decode
from .deps import torch
from .staging import Stager
from .stream import (
    DELTA_OPS,
    PREDICTED,
    STREAMED,
    BlobReader,
    DeltaReader,
    MappedSource,
    open_reader,
)

#: Bytes decoded per step on the host (bounds the temporaries of predicted deltas).
HOST_CHUNK = 1 << 20
#: Stored bytes hashed per step while verifying.
VERIFY_STEP = 1 << 18
#: Host blobs at least this large get an anonymous map of their own (see host_buffer).
ANON_MAP_MIN = 1 << 20
_local = threading.local()


def _verify_buffer() -> memoryview:
    buf = getattr(_local, "verify", None)
    if buf is None:
        buf = _local.verify = memoryview(bytearray(VERIFY_STEP))
    return buf


def resolve_device(device: Any) -> Any:
    """``"auto"`` -> CUDA when available, else CPU; a torch device, checked usable."""
    if device is None or (isinstance(device, str) and device == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"not a torch device: {device!r}",
                         hint="use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError("CUDA is not available here",
                            hint="load on the CPU (device='cpu', or --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise UsageError(f"device {dev} is not supported (use 'cpu' or 'cuda[:N]')")
    return dev


_trim: list = []  # [malloc_trim or None], looked up once


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system: glibc's ``malloc_trim(0)``
    (every arena, free pages inside them too). Blobs under :data:`ANON_MAP_MIN`, and
    the decoders' temporaries, come from malloc, which keeps what is freed for later
    allocations: without this, a process that unloaded every model kept hundreds of
    MB it no longer used. False where there is no glibc (nothing to do, or nothing
    that can be done)."""
    if not _trim:
        fn = None
        try:
            import ctypes

            fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # pragma: no cover - no C library to ask
            fn = None
        _trim.append(fn)
    if _trim[0] is None:
        return False
    _trim[0](0)
    return True


def default_workers() -> int:
    """Decoding threads: every core, up to 8 (past that, reading the file limits)."""
    return worker_threads()


def blob_order(bundle: Bundle, digests: Sequence[str], resident: Mapping[str, Any] = {}
               ) -> tuple[list[BlobRecord], dict[str, int]]:
    """The blobs to place for ``digests``: those not ``resident``, with every base they
    need that is not resident either, each base before its deltas; and each one's delta
    depth (0: nothing to wait for). Largest first within a depth (the pool's longest
    jobs start first)."""
    depth: dict[str, int] = {}
    # Walked without recursion: a recursive closure is a reference cycle that kept the
    # bundle's manifest alive until the next garbage collection.
    for h in digests:
        chain: list[str] = []
        cur: str | None = h
        while cur is not None and cur not in resident and cur not in depth:
            chain.append(cur)
            cur = bundle.blob(cur).base
        d = depth[cur] if cur is not None and cur in depth else -1
        for c in reversed(chain):
            d += 1
            depth[c] = d
    recs = [bundle.blob(h) for h in depth]
    recs.sort(key=lambda r: (depth[r.hash], -r.decoded_length))
    return recs, depth


def host_buffer(nbytes: int) -> Any:
    """A uint8 tensor of ``nbytes`` of fresh host memory in a storage of its own, which
    goes back to the system when the last tensor viewing it is freed (large ones are an
    anonymous map: malloc would keep freed memory in the process).

    Pages are faulted in by the decoder's first writes, inside numpy calls that release
    the GIL. ``MAP_POPULATE`` maps them in one call but holds the GIL for it (Python's
    ``mmap`` does not release it): ~13 ms per load of the MiniLM family during which no
    other decoding thread could take a step; without it a two-thread load is ~10 %
    faster (bench/RESULTS.md, "## load"). Transparent huge pages (``MADV_HUGEPAGE``)
    halve the faults of repeated loads in one process but made a fresh process's load
    slower here (median 166 vs 140 ms): this VM's balloon reports free blocks of 2 MiB
    and more to its host (free page reporting), so a huge page is a block the host took
    back, and its first touch pays to get it again.
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if nbytes < ANON_MAP_MIN or not flags:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=torch.uint8)


class ArrayReader(BlobReader):
    """Decoded bytes already in memory (encodings left to the format's codecs)."""

    def __init__(self, data) -> None:
        self.data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        self.pos = 0

    def readinto(self, out: np.ndarray) -> None:
        out[:] = self.data[self.pos:self.pos + len(out)]
        self.pos += len(out)


class Placer:
    """Decodes each blob once into its own storage and keeps it as a uint8 tensor in
    :attr:`blobs`; bases are looked up there first, then in ``resident``."""

    def __init__(self, bundle: Bundle, device, depth: dict[str, int], *, verify: bool,
                 workers: int, resident: Mapping[str, Any] = {},
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.bundle, self.device, self.depth = bundle, device, depth
        self.verify, self.workers, self.resident = verify, max(1, workers), resident
        self.progress = progress  # (stored bytes done, total): called as blobs finish
        self.total = sum(bundle.blob(h).stored_length for h in depth)
        self.done = 0
        self._done_lock = threading.Lock()
        self.blobs: dict[str, Any] = {}  # hash -> uint8 tensor of its decoded bytes
        # hash -> byte range of the map that a raw blob's tensor views
        self.viewed: dict[str, tuple[int, int]] = {}
        with open(bundle.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != bundle.size:
                raise LoadError("the bundle changed while it was being opened",
                                path=bundle.path)
            # Private map: tensors over it can be written (copy on write), never the file.
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.fd = os.dup(f.fileno())  # for verification reads (closed with the placer)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        """Close the verification descriptor (placed tensors stay valid)."""
        fd: int | None = getattr(self, "fd", None)
        self.fd = -1
        if fd is not None and fd >= 0:
            os.close(fd)

    __del__ = close

    def base(self, digest: str | None) -> Any:
        """The placed or resident bytes of a delta's base."""
        assert digest is not None, "a delta names its base"
        found = self.blobs.get(digest)
        return self.resident[digest] if found is None else found

    def corrupt(self, rec: BlobRecord, problem: str, part: str | None = None
                ) -> IntegrityError:
        return self.bundle.corrupt(rec.hash, problem, part=part)

    def advance(self, rec: BlobRecord) -> None:
        if self.progress is not None:
            with self._done_lock:
                self.done += rec.stored_length
                done = self.done
            self.progress(done, self.total)

    def check_stored(self, rec: BlobRecord) -> None:
        """With ``verify``: the stored bytes against their stored BLAKE3 checksum.

        Read with ``pread`` into a per-thread buffer, not through the map, so that
        checking adds no page of the bundle to the process (the decoder then maps only
        what it reads); one thread per blob, as the pool keeps every core busy.
        """
        if not self.verify:
            return
        hasher = blake3.blake3()
        pos, end = rec.offset, rec.offset + rec.stored_length
        if rec.encoding is BlobEncoding.RAW and self.device.type == "cpu":
            # Its pages are the tensor's own on a CPU load: hashing them through the map
            # maps nothing extra and saves a copy of every byte.
            hasher.update(self.view[pos:end])
        else:
            buf = _verify_buffer()
            while pos < end:
                n = os.preadv(self.fd, [buf[:min(VERIFY_STEP, end - pos)]], pos)
                if n <= 0:
                    raise self.corrupt(rec, "the bundle ends inside the blob (truncated)")
                hasher.update(buf[:n])
                pos += n
        if hasher.hexdigest() != rec.checksum:
            raise self.corrupt(rec, "stored bytes fail their checksum (corrupted)")

    def reader(self, rec: BlobRecord, base_bytes: Callable | None = None, *,
               device_combine: bool = False) -> BlobReader:
        """A reader of ``rec``'s decoded bytes. Deltas are finished by the reader, from
        ``base_bytes(start, stop)`` (default: the placed base's bytes, on the host); with
        ``device_combine``, a delta reads as its residual (a ``DeltaReader`` whose
        ``residual`` is uploaded), for :meth:`finish_delta` on the device."""
        try:
            if rec.encoding in STREAMED or (device_combine and rec.encoding in DELTA_OPS):
                return open_reader(self.mm, self.view, rec, None)
            if device_combine and rec.encoding in PREDICTED:
                return DeltaReader(self.mm, self.view, rec, None, None)
            if rec.encoding in DELTA_OPS or rec.encoding in PREDICTED:
                if base_bytes is None:
                    base_bytes = self._host_bytes(self.base(rec.base))
                return DeltaReader(self.mm, self.view, rec, None, base_bytes)
        except IntegrityError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        # An encoding not streamed here: decoded whole on the host by the format's
        # codecs, from the placed base.
        base = None
        if rec.base is not None:  # a derived blob's base may have another length
            n = (self.bundle.blob(rec.base).decoded_length if rec.encoding.any_length_base
                 else rec.decoded_length)
            base = (base_bytes(0, n) if base_bytes is not None
                    else self.base(rec.base).cpu().numpy())
        source = MappedSource(self.mm, self.view, rec.offset, rec.stored_length)
        try:
            data = decode(rec.encoding, source.read(), rec.decoded_length, base=base,
                          what=None)
        except TdedupError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        finally:
            source.close()
        return ArrayReader(data)

    @staticmethod
    def _host_bytes(base: Any) -> Callable[[int, int], np.ndarray]:
        """``(start, stop) -> that range of a placed blob, as a host uint8 array``."""
        if base.device.type == "cpu":
            # One view, made once: slicing the tensor for every chunk held the GIL ~2 ms
            # per load of the MiniLM family.
            host = base.numpy()
            return lambda start, stop: host[start:stop]

        def fetch(start: int, stop: int) -> np.ndarray:
            return base[start:stop].cpu().numpy()

        return fetch

    def finish_delta(self, rec: BlobRecord, out, reader: BlobReader, stager: Stager) -> None:
        """Apply a residual uploaded as is to its base (or to the prediction made from
        it), on the device."""
        if rec.encoding in PREDICTED and isinstance(reader, DeltaReader):
            stager.predict_add(out, self.base(rec.base), reader.head, reader.width)
        elif rec.encoding in DELTA_OPS and not isinstance(reader, DeltaReader):
            stager.combine(out, self.base(rec.base), DELTA_OPS[rec.encoding], reader.width)

    # -- host ------------------------------------------------------------------------

    def place_host(self, recs: list[BlobRecord]) -> None:
        """CPU: raw blobs as zero-copy views of the map, the others decoded into fresh
        memory; one depth at a time (bases before deltas), each on the thread pool.

        Between depths, with no decoder running, the map's pages that no tensor views are
        dropped: reading a blob's headers faults in whole folios (~170 KB here), reaching
        into its neighbours, which would otherwise stay resident while the next depth's
        decoded bytes pile up. One pass per depth rather than one ``madvise`` per blob:
        each interrupts the other core to flush its TLB, and dropping around every blob
        cost the serving load of the MiniLM family ~3 % (bench/RESULTS.md, "## load")."""
        by_depth: dict[int, list[BlobRecord]] = {}
        for rec in recs:
            by_depth.setdefault(self.depth[rec.hash], []).append(rec)
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 and len(recs) > 1 else None
        try:
            for i, level in enumerate(sorted(by_depth)):
                if i:
                    self.drop_pages()
                group = by_depth[level]
                if pool is None:
                    for rec in group:
                        self.place_one_host(rec)
                else:
                    for fut in [pool.submit(self.place_one_host, rec) for rec in group]:
                        fut.result()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def place_one_host(self, rec: BlobRecord) -> None:
        self.check_stored(rec)
        if rec.encoding is BlobEncoding.RAW:
            self.blobs[rec.hash] = torch.frombuffer(self.mm, dtype=torch.uint8,
                                                    count=rec.decoded_length,
                                                    offset=rec.offset)
            self.viewed[rec.hash] = (rec.offset, rec.offset + rec.decoded_length)
            self.advance(rec)
            return
        # A crafted size must be one line before the allocation, not ENOMEM after it.
        check_allocation(rec.decoded_length, f"blob {rec.hash[:16]}", path=self.bundle.path,
                         cls=LoadError)
        out = host_buffer(rec.decoded_length)
        reader = self.reader(rec)
        array = out.numpy()
        step = max(reader.unit, HOST_CHUNK // reader.unit * reader.unit)
        try:
            for i in range(0, len(array), step):
                reader.readinto(array[i:i + step])
            reader.finish()
        except IntegrityError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        self.blobs[rec.hash] = out
        self.advance(rec)

    def drop_pages(self, keep: "set[str] | None" = None) -> None:
        """Drop from the process every page of the map that no tensor views (headers and
        tables read while decoding): the page cache keeps them, the resident set not.

        ``keep``: the raw blobs whose views outlive the load (None: every one placed so
        far). A raw blob placed only as a delta's base, or only to be dequantized, is
        not kept once the deltas are finished: its pages go too, and it is forgotten
        here (its tensor must not be read after this)."""
        if keep is not None:
            for h in [h for h in self.viewed if h not in keep]:
                del self.viewed[h]
                self.blobs.pop(h, None)
        if not (hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")):
            return
        page = mmap.PAGESIZE
        cursor = 0
        for start, end in sorted(self.viewed.values()) + [(len(self.mm), len(self.mm))]:
            stop = start // page * page
            if stop > cursor:
                self.mm.madvise(mmap.MADV_DONTNEED, cursor, stop - cursor)
            cursor = max(cursor, -(-end // page) * page)

    # -- CUDA ------------------------------------------------------------------------

    def place_cuda(self, recs: list[BlobRecord]) -> None:
        """Every blob into its own device storage, through the pinned staging buffers;
        stored checksums are checked on the thread pool meanwhile, all before return."""
        stager = Stager.get(self.device)
        checks: list[Future] = []
        pool = ThreadPoolExecutor(self.workers) if self.verify else None
        # A chunk's planes are decompressed side by side (zstd releases the GIL).
        planes = ThreadPoolExecutor(min(self.workers, 16)) if self.workers > 1 else None
        try:
            if pool is not None:
                checks = [pool.submit(self.check_stored, rec) for rec in recs]
            with stager.lock:
                self._upload_all(stager, recs, planes)
            for fut in checks:
                fut.result()
        finally:
            for p in (pool, planes):
                if p is not None:
                    p.shutdown(cancel_futures=True)

    def _device_bytes(self, stager: Stager, digest: str | None):
        """``(start, stop) -> host copy of that range of a device blob``, ordered after
        the blob's own upload on the staging stream."""
        if digest is None:
            return None

        def fetch(start: int, stop: int) -> np.ndarray:
            with torch.cuda.stream(stager.stream):
                return self.base(digest)[start:stop].to("cpu").numpy()

        return fetch

    def _upload_all(self, stager: Stager, recs: list[BlobRecord], planes=None) -> None:
        try:
            for rec in recs:  # already ordered: bases first
                dest = torch.empty(rec.decoded_length, dtype=torch.uint8, device=self.device)
                self.blobs[rec.hash] = dest
                reader = self.reader(rec, self._device_bytes(stager, rec.base),
                                     device_combine=True)
                try:
                    residual = (reader.residual if isinstance(reader, DeltaReader)
                                and rec.encoding in PREDICTED else reader)
                    stager.upload(residual, dest, planes)
                    reader.finish()
                except IntegrityError as e:
                    raise self.corrupt(rec, e.problem, e.part) from e
                self.finish_delta(rec, dest, reader, stager)
                self.advance(rec)
        finally:
            stager.finish()


__all__ = [
    "HOST_CHUNK",
    "ArrayReader",
    "Placer",
    "blob_order",
    "default_workers",
    "host_buffer",
    "resolve_device",
    "trim_heap",
]

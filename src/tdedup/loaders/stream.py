"""Decode a bundle blob chunk by chunk into buffers the caller provides.

The torch loader decodes every distinct blob *straight into its final storage* (a slice
of one host arena on CPU, a pinned staging chunk on its way to a GPU), so no decoded copy
of a blob is ever held twice. Compressed bytes are read through a private map of the
bundle and the pages behind the read position are dropped from the process as decoding
goes (``MADV_DONTNEED``), so that peak memory stays near the decoded bytes alone.

A :class:`BlobReader` yields a blob's decoded bytes in order: ``readinto(out)`` fills
``out`` (a uint8 numpy array) with the next ``len(out)`` bytes; ``finish()`` checks that
the stored stream ended exactly there. Byte-plane blobs need ``len(out)`` to be a
multiple of their width, which any multiple of 16 bytes is.
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Executor

import numpy as np
import zstandard

from ..errors import IntegrityError
from ..format.bundle.constants import MAX_PLANE_WIDTH, BlobEncoding
from ..format.bundle.manifest import BlobRecord
from ..format.codecs.byteplane import (
    ROTATION,
    byteplane_frames,
    check_rotation,
    interleave_into,
    rotation_prefix,
    unrotate_,
)
from ..format.codecs.delta import (
    add_residual_,
    combine_at_,
    gather_words,
    parse_delta_header,
    residual_width,
)
from ..format.codecs.zstd import check_frame_size

PAGE = mmap.PAGESIZE
#: Compressed bytes handed to zstd at a time.
READ_SIZE = 1 << 16
#: Consumed pages are dropped once this many have gathered: each ``madvise`` of a
#: threaded process interrupts every other core to flush its TLB, and dropping every
#: 64 KiB cost a two-thread load ~8 % of its time (bench/RESULTS.md, "## load").
RELEASE_BATCH = 1 << 21
#: Elements decoded per plane before they are interleaved into the output.
PLANE_CHUNK = 1 << 17

_local = threading.local()


def _scratch() -> np.ndarray:
    """Per-thread plane buffers, reused: fresh memory would cost a page fault per 4 KiB."""
    buf = getattr(_local, "scratch", None)
    if buf is None:
        buf = _local.scratch = np.empty((MAX_PLANE_WIDTH, PLANE_CHUNK), np.uint8)
    return buf


def _decompressors(n: int) -> list[zstandard.ZstdDecompressor]:
    """``n`` per-thread decompression contexts: one per concurrently open plane stream
    (two streams on one context corrupt each other)."""
    pool = _local.__dict__.setdefault("dctx", [])
    while len(pool) < n:
        pool.append(zstandard.ZstdDecompressor())
    return pool[:n]


class MappedSource:
    """File-like, zero-copy reads of ``[start, start + length)`` of a map.

    Pages wholly inside the range and behind the previous read are dropped from the
    process once zstd has consumed them (``release=True``): the page cache keeps them,
    the process's resident set does not.
    """

    def __init__(self, mm: mmap.mmap, view: memoryview, start: int, length: int, *,
                 release: bool = True) -> None:
        self.mm, self.view = mm, view
        self.start, self.pos, self.end = start, start, start + length
        self.release = release and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
        self.dropped = -(-start // PAGE) * PAGE  # first page we may drop
        self.last = start  # start of the previous read: zstd may still hold it

    def read(self, n: int = -1) -> memoryview:
        if n < 0:
            n = self.end - self.pos
        n = min(n, self.end - self.pos)
        self.drop_until(self.last)
        self.last = self.pos
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def drop_until(self, upto: int, batch: int = RELEASE_BATCH) -> None:
        """Drop the pages before ``upto`` once at least ``batch`` bytes of them gathered."""
        if not self.release:
            return
        stop = min(upto, self.end) // PAGE * PAGE
        if stop > self.dropped and stop - self.dropped >= batch:
            self.mm.madvise(mmap.MADV_DONTNEED, self.dropped, stop - self.dropped)
            self.dropped = stop

    def close(self) -> None:
        self.drop_until(self.end, batch=0)


class BlobReader:
    """Sequential decoded bytes of one blob (see the module docstring). Every
    ``readinto`` but the last must fill a multiple of ``unit`` bytes."""

    width = 1
    unit = 1

    def readinto(self, out: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Raise :class:`IntegrityError` if the stored stream does not end here."""


class RawReader(BlobReader):
    def __init__(self, source: MappedSource) -> None:
        self.source = source

    def readinto(self, out: np.ndarray) -> None:
        out[:] = np.frombuffer(self.source.read(len(out)), np.uint8)

    def finish(self) -> None:
        self.source.close()


class ZstdReader(BlobReader):
    """One zstd frame that must decode to exactly ``expected`` bytes."""

    def __init__(self, source: MappedSource, expected: int, what: str | None,
                 dctx: zstandard.ZstdDecompressor) -> None:
        head = source.view[source.start:min(source.end, source.start + 32)]
        declared = check_frame_size(head, expected, what)
        if declared != expected:
            raise IntegrityError(f"{what}: zstd frame declares {declared} bytes, expected "
                                 f"{expected}")
        self.source, self.what = source, what
        self.reader = dctx.stream_reader(source, read_size=READ_SIZE)  # type: ignore[arg-type]  # file-like

    def readinto(self, out) -> None:
        mv = memoryview(out).cast("B")
        got, n = 0, len(mv)
        try:
            while got < n:
                k = self.reader.readinto(mv[got:])
                if k == 0:
                    raise IntegrityError(f"{self.what}: zstd data ends early (corrupted)")
                got += k
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{self.what}: zstd data is corrupted ({e})") from None

    def finish(self, drop: bool = True) -> None:
        """Check the frame ends here; then drop its pages, unless the caller drops the
        span they lie in itself (``drop=False``)."""
        try:
            extra = self.reader.read(1)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{self.what}: zstd data is corrupted ({e})") from None
        if extra:
            raise IntegrityError(f"{self.what}: zstd frame holds more than its declared size")
        if drop:
            self.source.close()


class PlaneReader(BlobReader):
    """A byte-plane blob: ``width`` zstd frames, element ``i``'s byte ``j`` in plane ``j``
    (stored at ``[start, start + length)`` of the map, ``expected`` bytes decoded)."""

    def __init__(self, mm: mmap.mmap, view: memoryview, start: int, length: int,
                 expected: int, what: str | None, *, release: bool = True) -> None:
        self.width, frames = byteplane_frames(view[start:start + length], expected, what)
        self.unit = self.width
        self.span = MappedSource(mm, view, start, length, release=release)
        plane = expected // self.width
        self.planes = [
            ZstdReader(MappedSource(mm, view, start + f.start, f.stop - f.start,
                                    release=release), plane, f"{what} (plane {j})", dctx)
            for j, (f, dctx) in enumerate(zip(frames, _decompressors(self.width)))]

    #: Bits the joined elements are still to be rotated right by (``RotatedPlaneReader``).
    rotation = 0

    def read_planes(self, out: np.ndarray, pool: Executor | None = None) -> None:
        """Fill ``out`` (a multiple of ``width`` bytes) *plane-major*: the next
        ``len(out) // width`` bytes of plane ``j`` at ``out[j * n:(j + 1) * n]``, zstd's
        output written there directly, for a device to interleave (and rotate back).
        With ``pool``, each plane on a thread of its own (every plane has its own zstd
        context); all are done, or failed, on return."""
        n = len(out) // self.width
        jobs = [(plane, out[j * n:(j + 1) * n]) for j, plane in enumerate(self.planes)]
        if pool is None or len(jobs) < 2:
            for plane, part in jobs:
                plane.readinto(part)
            return
        futures = [pool.submit(plane.readinto, part) for plane, part in jobs]
        for err in [f.exception() for f in futures]:  # wait for every plane first
            if err is not None:
                raise err

    def read_chunk(self, k: int) -> list[np.ndarray]:
        """The next ``k`` (at most ``PLANE_CHUNK``) elements' bytes, plane by plane: views
        of this thread's scratch, valid until its next read."""
        scratch = _scratch()
        for j, plane in enumerate(self.planes):
            plane.readinto(scratch[j, :k])
        return [scratch[j, :k] for j in range(self.width)]

    def readinto(self, out: np.ndarray) -> None:
        w = self.width
        for i in range(0, len(out) // w, PLANE_CHUNK):
            k = min(PLANE_CHUNK, len(out) // w - i)
            interleave_into(out[i * w:(i + k) * w], self.read_chunk(k))

    def finish(self) -> None:
        # One drop over the whole blob rather than one per plane: each drop interrupts
        # the other cores to flush their TLBs (and holds the GIL).
        for plane in self.planes:
            plane.finish(drop=False)
        self.span.close()


class RotatedPlaneReader(PlaneReader):
    """``ROTATED_BYTEPLANE_ZSTD`` and ``ROTATEDN_BYTEPLANE_ZSTD``: a byte-plane blob whose
    elements are rotated back, chunk by chunk, as they are read (by one bit, or by the
    rotation a ``ROTATEDN`` blob starts with)."""

    def __init__(self, mm: mmap.mmap, view: memoryview, start: int, length: int,
                 expected: int, what: str, *, prefixed: bool = False,
                 release: bool = True) -> None:
        rotation = 1
        if prefixed:
            rotation = rotation_prefix(view[start:start + length], what)
            start, length = start + ROTATION.size, length - ROTATION.size
        super().__init__(mm, view, start, length, expected, what, release=release)
        check_rotation(self.width, rotation, what)
        self.rotation = rotation

    def readinto(self, out: np.ndarray) -> None:
        super().readinto(out)
        unrotate_(out, self.width, self.rotation)


#: A residual piece is applied sparsely when at most 1/SPARSE_FRACTION of it is non-zero.
SPARSE_FRACTION = 16


def _sparse_elements(planes: list[np.ndarray], most: int) -> np.ndarray | None:
    """Indices of the non-zero elements of a byte-plane residual piece, or None when there
    are more than ``most`` (the lowest plane is counted first: dense pieces cost one pass
    over it)."""
    if np.count_nonzero(planes[0]) > most:
        return None
    mask = _mask_scratch()[:len(planes[0])]
    np.copyto(mask, planes[0])
    for p in planes[1:]:
        np.bitwise_or(mask, p, out=mask)
    idx = np.flatnonzero(mask)
    return idx if len(idx) <= most else None


def _mask_scratch() -> np.ndarray:
    buf = getattr(_local, "mask", None)
    if buf is None:
        buf = _local.mask = np.empty(PLANE_CHUNK, np.uint8)
    return buf


class DeltaReader(BlobReader):
    """A delta blob finished on the host, chunk by chunk: its byte-plane residual is
    decoded into ``out``, then combined with the base's bytes for that range, with
    the delta codec's own kernels (XOR; addition on unsigned integers of the plane width,
    of the residual as stored or unzigzagged; for ``DECAY_SUB`` and ``LOWRANK_SUB``, to a
    prediction made from the base: AdamW's weight decay, a merged LoRA). No temporary
    larger than a chunk is made. ``base(start, stop)``: the base's bytes (uint8 array).
    """

    def __init__(self, mm: mmap.mmap, view: memoryview, rec: BlobRecord, what: str | None, base,
                 *, release: bool = True) -> None:
        n, enc = rec.decoded_length, rec.encoding
        if enc not in DELTA_OPS and enc not in PREDICTED:
            raise ValueError(f"{what}: encoding {enc.name} is not streamed")
        stored = view[rec.offset:rec.offset + rec.stored_length]
        self.head = parse_delta_header(enc, stored, n, what=what)
        self.base, self.pos = base, 0
        skip = self.head.residual_offset
        self.residual = PlaneReader(mm, view, rec.offset + skip, rec.stored_length - skip, n,
                                    what, release=release)
        self.width = self.residual.width
        if self.head.op != "xor":
            residual_width(stored[skip:], self.head.need_width, what)
        self.unit = self.head.unit or self.width

    def readinto(self, out: np.ndarray) -> None:
        w = self.width
        base = self.base(self.pos, self.pos + len(out))
        # Pieces of whole units (a low-rank prediction is made a row at a time).
        ue = max(1, self.unit // w)
        step = max(ue, PLANE_CHUNK // ue * ue)
        for i in range(0, len(out) // w, step):
            k = min(step, len(out) // w - i)
            self._combine(out[i * w:(i + k) * w], self.residual.read_chunk(k),
                          base[i * w:(i + k) * w], self.pos + i * w)
        self.pos += len(out)

    def _combine(self, out: np.ndarray, planes: list[np.ndarray], base, start: int) -> None:
        """``out`` <- the prediction combined with the residual whose planes these are.
        A residual that is mostly zero (a weight-decay delta: tokens a fine-tune never
        saw) is applied only where it is not: the element-wise passes over every element
        are skipped."""
        k = len(planes[0])
        idx = _sparse_elements(planes, k // SPARSE_FRACTION)
        if idx is not None:
            self.head.prediction_into(out, base, start)
            if len(idx):
                combine_at_(out, idx, gather_words(planes, idx), self.head.op)
            return
        interleave_into(out, planes)
        if self.head.op == "xor":
            np.bitwise_xor(out, base, out=out)
        elif self.head.decay is not None or self.head.lowrank is not None:
            self.head.add_prediction_(out, base, start)
        else:
            add_residual_(out, base, self.width, zigzag=self.head.op == "zigzag-add")

    def finish(self) -> None:
        self.residual.finish()


#: Encodings a :class:`BlobReader` decodes by itself, and the delta encodings whose
#: stored form is just a byte-plane residual (``PlaneReader`` reads it; a GPU can finish
#: it): ``xor`` (data = base ^ r), ``add`` (data = base + r on unsigned integers of the
#: plane width), ``zigzag-add`` (data = base + unzigzag(r)). :class:`DeltaReader` reads
#: those and the ``PREDICTED`` ones on the host; any other encoding is left to
#: :func:`tdedup.format.codecs.decode`.
STREAMED = frozenset({BlobEncoding.RAW, BlobEncoding.ZSTD, BlobEncoding.BYTEPLANE_ZSTD,
                      BlobEncoding.ROTATED_BYTEPLANE_ZSTD, BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD})
DELTA_OPS = {enc: op for name, op in (("XOR_BYTEPLANE_ZSTD", "xor"),
                                      ("SUB_BYTEPLANE_ZSTD", "add"),
                                      ("ZIGZAG_SUB_BYTEPLANE_ZSTD", "zigzag-add"))
             if (enc := BlobEncoding.__members__.get(name)) is not None}
PREDICTED = frozenset(enc for name in ("DECAY_SUB_BYTEPLANE_ZSTD", "LOWRANK_SUB_BYTEPLANE_ZSTD")
                      if (enc := BlobEncoding.__members__.get(name)) is not None)


def open_reader(mm: mmap.mmap, view: memoryview, rec: BlobRecord, what: str | None, *,
                release: bool = True) -> BlobReader:
    """A reader of ``rec``'s decoded bytes (for a delta blob: of its residual)."""
    if rec.encoding is BlobEncoding.RAW:
        return RawReader(MappedSource(mm, view, rec.offset, rec.stored_length,
                                      release=release))
    if rec.encoding is BlobEncoding.ZSTD:
        return ZstdReader(MappedSource(mm, view, rec.offset, rec.stored_length,
                                       release=release),
                          rec.decoded_length, what, _decompressors(1)[0])
    if rec.encoding in (BlobEncoding.ROTATED_BYTEPLANE_ZSTD,
                        BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD):
        return RotatedPlaneReader(
            mm, view, rec.offset, rec.stored_length, rec.decoded_length, what,
            prefixed=rec.encoding is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD, release=release)
    if rec.encoding is BlobEncoding.BYTEPLANE_ZSTD or rec.encoding in DELTA_OPS:
        return PlaneReader(mm, view, rec.offset, rec.stored_length, rec.decoded_length, what,
                           release=release)
    raise ValueError(f"{what}: encoding {rec.encoding.name} is not streamed")

"""zstd frames as blobs use them: one cached (de)compressor per thread and level, and
decoding that never trusts a frame.

Every frame must declare its content size, and a frame that declares (or produces) more
than the blob's declared size is refused with :class:`DecompressionBombError` before any
output memory is allocated.
"""

from __future__ import annotations

import threading
from typing import IO, cast

import zstandard

from ...errors import BundleFormatError, DecompressionBombError, IntegrityError
from ..bundle.constants import DEFAULT_LEVEL

# zstandard's (de)compressor objects are not thread-safe: one per thread and level.
_local = threading.local()


# Up to this level, byte planes get the fast settings below instead of the level's own.
PLANE_FAST_MAX_LEVEL = 3


def compressor(level: int, *, planes: bool = False) -> zstandard.ZstdCompressor:
    """A cached compressor. With ``planes`` and a low level: zstd's fast strategy with
    min_match 7 and tiny tables. The byte planes of trained weights are near-random bytes
    with few long matches; there these settings beat levels 1-3 both in size (exponent
    plane 0.342 vs 0.370 of level 1 on a MiniLM fine-tune) and in speed (1.09 vs 0.70 GB/s
    encode, 1.37 vs 1.15 GB/s decode).

    Higher levels are the user asking for effort. On planes zstd's own levels 4-22 are
    *larger* than the fast settings (their match finding splits the literal runs that
    carry all of a plane's entropy: +1.8 % on MiniLM F32 at level 5), so there a higher
    level keeps the tiny tables and takes the ``btultra2`` strategy instead, the only one
    for which zstd searches the Huffman table's optimal depth and Huffman-codes literals
    that gain under 1.6 % (:func:`compress_plane`).

    Plane frames use a 128 KiB window (``window_log=17``): matches are rare and short, so
    sizes are the same within bytes (MiniLM family: 132,311,425 vs 132,315,556 bytes
    serving, 115,549,460 vs 115,549,431 compact), while a streaming decoder buffers its
    window for each plane it reads: 1.5 MB per plane with 1 MiB windows, four planes per
    decoding thread, more than L2. Loads of bundles written so: -6 % (serving) to -10 %
    (compact) wall and CPU, A/B on the same code (bench/RESULTS.md, "## load")."""
    cache = _local.__dict__.setdefault("c", {})
    plane_mode = None
    if planes:
        plane_mode = "fast" if level <= PLANE_FAST_MAX_LEVEL else "entropy"
    key = (level if plane_mode is None else 0, plane_mode)
    if key not in cache:
        if plane_mode is not None:
            strategy = (zstandard.STRATEGY_FAST if plane_mode == "fast"
                        else zstandard.STRATEGY_BTULTRA2)
            params = zstandard.ZstdCompressionParameters(
                strategy=strategy, min_match=7, window_log=17, hash_log=6, chain_log=6,
                search_log=1, target_length=0 if plane_mode == "fast" else 7,
                write_content_size=True)
            cache[key] = zstandard.ZstdCompressor(compression_params=params)
        else:
            cache[key] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[key]


#: Above this fraction of its size after the fast settings a plane is near-random and the
#: entropy effort of a high level gains nothing on it (it is not tried).
PLANE_EFFORT_MAX_RATIO = 0.999


def compress_plane(plane, level: int) -> bytes:
    """One byte plane as a zstd frame. Up to :data:`PLANE_FAST_MAX_LEVEL`: the fast
    settings. Above: the fast frame, or the ``btultra2`` one when the plane is not
    near-random and that is smaller (never larger than the fast frame; ~0.1 % smaller on
    trained F32 weights at ~50 MB/s of the planes it is tried on, bench/RESULTS.md)."""
    fast = compressor(PLANE_FAST_MAX_LEVEL, planes=True).compress(plane)
    if level <= PLANE_FAST_MAX_LEVEL or len(fast) >= PLANE_EFFORT_MAX_RATIO * len(plane):
        return fast
    effort = compressor(level, planes=True).compress(plane)
    return effort if len(effort) < len(fast) else fast


def decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "d"):
        _local.d = zstandard.ZstdDecompressor()
    return _local.d


def zstd_compress(data, level: int = DEFAULT_LEVEL) -> bytes:
    return compressor(level).compress(data)


def check_frame_size(frame, expected: int, what: str | None = None) -> int:
    """The content size a zstd frame declares; refuses frames that declare none or more
    than ``expected`` (checked before any memory is allocated for the output)."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"not a zstd frame ({e})", part=what) from None
    if declared == -1:
        raise BundleFormatError("zstd frame does not declare its content size", part=what)
    if declared > expected:
        raise DecompressionBombError(
            f"zstd frame declares {declared} bytes, more than the {expected} declared "
            "for it", part=what)
    return declared


def zstd_decompress(frame, expected: int, what: str | None = None) -> bytes:
    """Decompress one frame that must decode to exactly ``expected`` bytes."""
    check_frame_size(frame, expected, what)
    try:
        out = decompressor().decompress(frame, max_output_size=expected,
                                         allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd data is corrupted ({e})", part=what) from None
    if len(out) != expected:
        raise IntegrityError(f"decoded to {len(out)} bytes, expected {expected}", part=what)
    return out


# -- streaming (verify: a blob need not be held whole) --------------------------------

_BLOCK_RLE = 1
_BLOCK_RESERVED = 3


def zstd_frame_length(read, size: int, what: str | None = None) -> int:
    """The length of the one zstd frame at the start of ``read`` (a ``(offset, n) ->
    bytes`` callable over ``size`` bytes), walking block headers only. A streaming decoder
    stops at the frame's end; comparing this with ``size`` refuses trailing bytes exactly
    as :func:`zstd_decompress` (``allow_extra_data=False``) does."""
    head = bytes(read(0, min(size, 18)))
    try:
        pos = zstandard.frame_header_size(head)
        checksum = zstandard.get_frame_parameters(head).has_checksum
    except zstandard.ZstdError as e:
        raise IntegrityError(f"not a zstd frame ({e})", part=what) from None
    while True:
        if pos + 3 > size:
            raise IntegrityError("zstd frame is truncated", part=what)
        b = bytes(read(pos, 3))
        word = b[0] | b[1] << 8 | b[2] << 16
        last, kind, n = word & 1, (word >> 1) & 3, word >> 3
        if kind == _BLOCK_RESERVED:
            raise IntegrityError("zstd data is corrupted (reserved block type)", part=what)
        pos += 3 + (1 if kind == _BLOCK_RLE else n)
        if last:
            break
    return pos + (4 if checksum else 0)


class _RangeReader:
    """A file-like view of ``read`` for zstandard's streaming reader."""

    def __init__(self, read, size: int) -> None:
        self._read, self._size, self._pos = read, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
        data = bytes(self._read(self._pos, n)) if n else b""
        self._pos += len(data)
        return data


def zstd_iter_decompress(read, size: int, expected: int, what: str | None = None,
                         chunk: int = 1 << 20):
    """Decode one frame of ``size`` stored bytes to exactly ``expected`` bytes, yielding
    at most ``chunk`` bytes at a time (memory bounded by ``chunk``, not ``expected``);
    refuses what :func:`zstd_decompress` refuses."""
    check_frame_size(bytes(read(0, min(size, 18))), expected, what)
    if zstd_frame_length(read, size, what) != size:
        raise IntegrityError("zstd data is corrupted (bytes after the frame)", part=what)
    total = 0
    try:
        source = cast(IO[bytes], _RangeReader(read, size))  # read() is all it calls
        for out in decompressor().read_to_iter(source, read_size=1 << 17, write_size=chunk):
            total += len(out)
            if total > expected:
                raise DecompressionBombError(f"decodes to more than {expected} bytes",
                                             part=what)
            yield out
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd data is corrupted ({e})", part=what) from None
    if total != expected:
        raise IntegrityError(f"decoded to {total} bytes, expected {expected}", part=what)

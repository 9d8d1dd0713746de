"""Blob encodings: turn decoded bytes into stored bytes and back. See spec/FORMAT.md.

Decoders never trust the stored bytes: every zstd frame must declare its content size,
and a frame that declares (or produces) more than the blob's declared size is refused
with :class:`DecompressionBombError` before the memory is allocated.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard

from ..errors import BundleFormatError, DecompressionBombError, IntegrityError
from .bundle_constants import MAX_PLANE_WIDTH, BlobEncoding

DEFAULT_LEVEL = 1  # on float planes level 1 beats 3 in size and is 2x faster (bench/RESULTS.md)
_PLANE_COUNT = struct.Struct("<I")
_PLANE_LEN = struct.Struct("<Q")

# zstandard's (de)compressor objects are not thread-safe: one per thread and level.
_local = threading.local()


# Up to this level, byte planes get the fast settings below instead of the level's own.
PLANE_FAST_MAX_LEVEL = 3


def _compressor(level: int, *, planes: bool = False) -> zstandard.ZstdCompressor:
    """A cached compressor. With ``planes`` and a low level: zstd's fast strategy with
    min_match 7 and tiny tables. The byte planes of trained weights are near-random bytes
    with few long matches; there these settings beat levels 1-3 both in size (exponent
    plane 0.342 vs 0.370 of level 1 on a MiniLM fine-tune) and in speed (1.09 vs 0.70 GB/s
    encode, 1.37 vs 1.15 GB/s decode). Higher levels are the user asking for effort."""
    cache = _local.__dict__.setdefault("c", {})
    key = (level, planes and level <= PLANE_FAST_MAX_LEVEL)
    if key not in cache:
        if key[1]:
            params = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_FAST, min_match=7, window_log=20, hash_log=6,
                chain_log=6, search_log=1, write_content_size=True)
            cache[key] = zstandard.ZstdCompressor(compression_params=params)
        else:
            cache[key] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[key]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "d"):
        _local.d = zstandard.ZstdDecompressor()
    return _local.d


def zstd_compress(data, level: int = DEFAULT_LEVEL) -> bytes:
    return _compressor(level).compress(data)


def check_frame_size(frame, expected: int, what: str = "blob") -> int:
    """The content size a zstd frame declares; refuses frames that declare none or more
    than ``expected`` (checked before any memory is allocated for the output)."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what}: not a zstd frame ({e})") from None
    if declared == -1:
        raise BundleFormatError(f"{what}: zstd frame does not declare its content size")
    if declared > expected:
        raise DecompressionBombError(
            f"{what}: zstd frame declares {declared} bytes, more than the {expected} declared "
            "for it")
    return declared


def zstd_decompress(frame, expected: int, what: str = "blob") -> bytes:
    """Decompress one frame that must decode to exactly ``expected`` bytes."""
    check_frame_size(frame, expected, what)
    try:
        out = _decompressor().decompress(frame, max_output_size=expected,
                                         allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what}: zstd data is corrupted ({e})") from None
    if len(out) != expected:
        raise IntegrityError(f"{what}: decoded to {len(out)} bytes, expected {expected}")
    return out


# -- byte planes --------------------------------------------------------------------------

def split_planes(data, width: int) -> list[np.ndarray]:
    """Element ``i``'s byte ``j`` goes to plane ``j`` (so an F32's exponent byte is plane 3)."""
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    return [np.ascontiguousarray(a[:, j]) for j in range(width)]


def join_planes(planes: list, n: int, width: int) -> np.ndarray:
    out = np.empty((n // width, width), dtype=np.uint8)
    for j, p in enumerate(planes):
        out[:, j] = np.frombuffer(p, dtype=np.uint8)
    return out.reshape(-1)


def byteplane_compress(data, width: int, level: int = DEFAULT_LEVEL) -> bytes:
    """Stored form: u32 width, width x u64 frame lengths, then one zstd frame per plane."""
    comp = _compressor(level, planes=True)
    frames = [comp.compress(p) for p in split_planes(data, width)]
    head = _PLANE_COUNT.pack(width) + b"".join(_PLANE_LEN.pack(len(f)) for f in frames)
    return head + b"".join(frames)


def byteplane_frames(stored, expected: int, what: str = "blob") -> tuple[int, list[slice]]:
    """The width of a byte-plane blob and where each plane's frame lies in ``stored``
    (only the table at its start is read)."""
    mv = memoryview(stored)
    if len(mv) < _PLANE_COUNT.size:
        raise IntegrityError(f"{what}: byte-plane blob too short")
    (width,) = _PLANE_COUNT.unpack_from(mv, 0)
    if not 1 <= width <= MAX_PLANE_WIDTH or expected % width:
        raise IntegrityError(f"{what}: bad byte-plane width {width} for {expected} bytes")
    pos = _PLANE_COUNT.size + width * _PLANE_LEN.size
    if len(mv) < pos:
        raise IntegrityError(f"{what}: byte-plane table truncated")
    lengths = [_PLANE_LEN.unpack_from(mv, _PLANE_COUNT.size + j * _PLANE_LEN.size)[0]
               for j in range(width)]
    if pos + sum(lengths) != len(mv):
        raise IntegrityError(f"{what}: byte-plane frames do not add up to the stored length")
    frames = []
    for n in lengths:
        frames.append(slice(pos, pos + n))
        pos += n
    return width, frames


def byteplane_decompress(stored, expected: int, what: str = "blob") -> np.ndarray:
    mv = memoryview(stored)
    width, frames = byteplane_frames(mv, expected, what)
    planes = [zstd_decompress(mv[f], expected // width, f"{what} (plane {j})")
              for j, f in enumerate(frames)]
    return join_planes(planes, expected, width)


# -- dispatch -----------------------------------------------------------------------------

def encode(encoding: BlobEncoding, data, *, width: int = 1, level: int = DEFAULT_LEVEL,
           base=None, shape: tuple[int, ...] | None = None):
    """Encode ``data`` (bytes-like). Delta encodings need ``base`` of the same length;
    ``shape`` (the tensor's) lets the low-rank delta see a matrix."""
    if encoding is BlobEncoding.RAW:
        return data
    if encoding is BlobEncoding.ZSTD:
        return zstd_compress(data, level)
    if encoding is BlobEncoding.BYTEPLANE_ZSTD:
        return byteplane_compress(data, width, level)
    if encoding.is_delta:
        from . import delta_codecs
        return delta_codecs.encode_delta(encoding, data, base, width=width, level=level,
                                         shape=shape)
    raise BundleFormatError(f"unknown blob encoding {int(encoding)}")


def decode(encoding: BlobEncoding, stored, expected: int, *, base=None, what: str = "blob"):
    """Decode stored bytes to exactly ``expected`` bytes (bytes-like; may be a numpy array)."""
    if encoding is BlobEncoding.RAW:
        if len(stored) != expected:
            raise IntegrityError(f"{what}: raw blob of {len(stored)} bytes, expected {expected}")
        return stored
    if encoding is BlobEncoding.ZSTD:
        return zstd_decompress(stored, expected, what)
    if encoding is BlobEncoding.BYTEPLANE_ZSTD:
        return byteplane_decompress(stored, expected, what)
    if encoding.is_delta:
        if base is None or len(base) != expected:
            raise BundleFormatError(f"{what}: delta base missing or of the wrong size")
        from . import delta_codecs
        return delta_codecs.decode_delta(encoding, stored, expected, base, what=what)
    raise BundleFormatError(f"{what}: unknown blob encoding {int(encoding)}")

"""Blob encodings: turn decoded bytes into stored bytes and back (spec/FORMAT.md §4).

This package is the dispatch; each encoding family has its module: :mod:`.zstd`,
:mod:`.byteplane`, :mod:`.delta` (with :mod:`.delta_fit` for the encoder's searches),
:mod:`.derived` (a transform of the base plus a residual, and zstd against a reference;
the transforms in :mod:`.transforms` and :mod:`.kquants`).

Decoders never trust the stored bytes: every zstd frame must declare its content size,
and a frame that declares (or produces) more than the blob's declared size is refused
with :class:`DecompressionBombError` before the memory is allocated.
"""

from __future__ import annotations

from ...errors import BundleFormatError, IntegrityError
from ..bundle.constants import BlobEncoding
from .byteplane import (
    byteplane_compress,
    byteplane_decompress,
    rotated_compress,
    rotated_decompress,
    rotatedn_compress,
    rotatedn_decompress,
)
from .delta import decode_delta
from .delta_encode import encode_delta
from .derived import decode_derived, decode_ref, encode_derived, encode_ref
from .zstd import DEFAULT_LEVEL, zstd_compress, zstd_decompress

__all__ = ["DEFAULT_LEVEL", "encode", "decode"]


def encode(encoding: BlobEncoding, data, *, width: int = 1, level: int = DEFAULT_LEVEL,
           base=None, shape: tuple[int, ...] | None = None, derive=None, rotation: int = 1):
    """Encode ``data`` (bytes-like). ``rotation``: the bits ``ROTATEDN_BYTEPLANE_ZSTD``
    rotates each element by (``byteplane.best_rotation`` picks one). Delta encodings
    need ``base`` of the same length;
    ``shape`` (the tensor's) lets the low-rank delta see a matrix. The derived encoding
    needs ``derive = (chain, base dtype, base shape)``; it and ``ZSTD_REF`` take a base of
    any length."""
    if encoding is BlobEncoding.RAW:
        return data
    if encoding is BlobEncoding.ZSTD:
        return zstd_compress(data, level)
    if encoding is BlobEncoding.BYTEPLANE_ZSTD:
        return byteplane_compress(data, width, level)
    if encoding is BlobEncoding.ROTATED_BYTEPLANE_ZSTD:
        return rotated_compress(data, width, level)
    if encoding is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD:
        return rotatedn_compress(data, width, level, rotation)
    if encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD:
        chain, base_dtype, base_shape = derive
        return encode_derived(data, base, chain, base_dtype, tuple(base_shape), level)
    if encoding is BlobEncoding.ZSTD_REF:
        return encode_ref(data, base, level)
    if encoding.is_delta:
        return encode_delta(encoding, data, base, width=width, level=level, shape=shape)
    raise BundleFormatError(f"unknown blob encoding {int(encoding)}")


def decode(encoding: BlobEncoding, stored, expected: int, *, base=None,
           what: str | None = None):
    """Decode stored bytes to exactly ``expected`` bytes (bytes-like; may be a numpy array).

    Errors carry ``what`` as their ``part``; the caller adds the path and the blob."""
    if encoding is BlobEncoding.RAW:
        if len(stored) != expected:
            raise IntegrityError(f"raw blob of {len(stored)} bytes, expected {expected}",
                                 part=what)
        return stored
    if encoding is BlobEncoding.ZSTD:
        return zstd_decompress(stored, expected, what)
    if encoding is BlobEncoding.BYTEPLANE_ZSTD:
        return byteplane_decompress(stored, expected, what)
    if encoding is BlobEncoding.ROTATED_BYTEPLANE_ZSTD:
        return rotated_decompress(stored, expected, what)
    if encoding is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD:
        return rotatedn_decompress(stored, expected, what)
    if encoding in (BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, BlobEncoding.ZSTD_REF):
        if base is None:
            raise BundleFormatError("base of a derived blob missing", part=what)
        if encoding is BlobEncoding.ZSTD_REF:
            return decode_ref(stored, expected, base, what)
        return decode_derived(stored, expected, base, what)
    if encoding.is_delta:
        if base is None or len(base) != expected:
            raise BundleFormatError("delta base missing or of the wrong size", part=what)
        return decode_delta(encoding, stored, expected, base, what=what)
    raise BundleFormatError(f"unknown blob encoding {int(encoding)}", part=what)

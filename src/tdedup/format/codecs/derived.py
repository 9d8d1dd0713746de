"""Derived and referenced encodings: a blob predicted from its base (spec/FORMAT.md §13).

- ``DERIVED_XOR_BYTEPLANE_ZSTD`` (24): a tensor that is a deterministic function of its base
  (a cast, a ggml quantization, a dequantization, a layout change, or a chain of two) is
  stored as the recipe plus the XOR residual of its bytes against the recipe's prediction.
  Where the transform reproduces the tensor (llama.cpp's converter and ``llama-quantize``
  outputs), the residual is all zeros and the blob is a few hundred bytes. Layout:

  ``<BBH`` chain length (1..MAX_CHAIN), base rank (0..MAX_RANK), zero; ``<I`` the base's
  ggml type; rank x ``<Q`` the base's logical shape (row-major); chain length x ``<Iq``
  (transform kind, parameter); then a byte-plane blob (``byteplane``) of
  ``data XOR prediction`` with the prediction's element width.

- ``ZSTD_REF`` (25): one zstd frame compressed with the base's decoded bytes as a raw-content
  dictionary (a reference prefix). Used for a file's layout bytes against another file's:
  the GGUF metadata repeated across a precision ladder (a vocabulary is megabytes) costs
  almost nothing the second time.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import zstandard

from ...errors import BundleFormatError, IntegrityError, TransformMismatch
from ..checkpoints.dtypes import element_width
from .byteplane import byteplane_compress, byteplane_decompress
from .transforms import Transform, TypedTensor, apply_chain, type_name, type_number
from .zstd import DEFAULT_LEVEL, check_frame_size

#: Longest chain of transforms a derived blob may name (dequantize then quantize).
MAX_CHAIN = 2
#: Highest rank of a base tensor.
MAX_RANK = 8
#: A base shape's element count stays below this (the format's largest blob, 2^48).
MAX_ELEMENTS = 1 << 48
HEAD = struct.Struct("<BBHI")
DIM = struct.Struct("<Q")
STEP = struct.Struct("<Iq")


def derived_header(chain: tuple[Transform, ...], base_dtype: str,
                   base_shape: tuple[int, ...]) -> bytes:
    if not 1 <= len(chain) <= MAX_CHAIN or len(base_shape) > MAX_RANK:
        raise TransformMismatch(f"a chain of {len(chain)} on a rank-{len(base_shape)} base")
    parts = [HEAD.pack(len(chain), len(base_shape), 0, type_number(base_dtype))]
    parts += [DIM.pack(d) for d in base_shape]
    parts += [STEP.pack(int(t.kind), int(t.param)) for t in chain]
    return b"".join(parts)


def predict(chain, base, base_dtype: str, base_shape) -> TypedTensor:
    """The chain applied to the base's bytes (TransformMismatch if it does not apply)."""
    return apply_chain(chain, TypedTensor.of(np.frombuffer(base, np.uint8), base_dtype,
                                             base_shape))


def encode_derived(data, base, chain: tuple[Transform, ...], base_dtype: str,
                   base_shape: tuple[int, ...], level: int = DEFAULT_LEVEL) -> bytes:
    """Stored bytes of ``data`` as ``chain(base)`` plus its XOR residual."""
    pred = predict(chain, base, base_dtype, base_shape)
    actual = np.frombuffer(data, np.uint8)
    if pred.data.size != actual.size:
        raise TransformMismatch(f"prediction has {pred.data.size} bytes, the tensor "
                                f"{actual.size}")
    residual = np.bitwise_xor(actual, pred.data)
    width = element_width(pred.etype)
    return byteplane_compress(residual, width, level,
                              prefix=derived_header(chain, base_dtype, base_shape))


def parse_derived(stored, what: str | None = None
                  ) -> tuple[tuple[Transform, ...], str, tuple[int, ...], int]:
    """(chain, base dtype, base shape, offset of the residual) of a derived blob."""
    mv = memoryview(stored)
    if len(mv) < HEAD.size:
        raise BundleFormatError("derived blob shorter than its header", part=what)
    n, rank, zero, base_type = HEAD.unpack_from(mv, 0)
    if not 1 <= n <= MAX_CHAIN or rank > MAX_RANK or zero:
        raise BundleFormatError(f"derived blob header: chain {n}, rank {rank}", part=what)
    end = HEAD.size + rank * DIM.size + n * STEP.size
    if len(mv) < end:
        raise BundleFormatError("derived blob shorter than its header", part=what)
    shape = tuple(DIM.unpack_from(mv, HEAD.size + i * DIM.size)[0] for i in range(rank))
    if math.prod(shape) >= MAX_ELEMENTS:
        raise BundleFormatError(f"derived blob: base shape {list(shape)} is implausible",
                                part=what)
    at = HEAD.size + rank * DIM.size
    try:
        dtype = type_name(base_type)
        chain = tuple(Transform.from_json(list(STEP.unpack_from(mv, at + i * STEP.size)))
                      for i in range(n))
    except TransformMismatch as e:
        raise BundleFormatError(f"derived blob: {e.problem}", part=what) from None
    return chain, dtype, shape, end


def decode_derived(stored, expected: int, base, what: str | None = None) -> np.ndarray:
    """Rebuild a derived blob's ``expected`` bytes from its base (bit-exact)."""
    chain, dtype, shape, end = parse_derived(stored, what)
    try:
        pred = predict(chain, base, dtype, shape)
    except TransformMismatch as e:
        raise BundleFormatError(f"derived blob: {e.problem}", part=what) from None
    except (ValueError, OverflowError, MemoryError) as e:  # a shape numpy cannot take
        raise BundleFormatError(f"derived blob: its transform cannot apply ({e})",
                                part=what) from None
    if pred.data.size != expected:
        raise IntegrityError(f"derived prediction has {pred.data.size} bytes, expected "
                             f"{expected}", part=what)
    residual = byteplane_decompress(memoryview(stored)[end:], expected, what)
    return np.bitwise_xor(np.frombuffer(residual, np.uint8), pred.data)


# -- zstd against a reference -----------------------------------------------------------

def _window_log(n: int) -> int:
    return max(20, min(30, int(n).bit_length() + 1))


def encode_ref(data, base, level: int = DEFAULT_LEVEL) -> bytes:
    """One zstd frame of ``data`` with ``base`` as a raw-content dictionary (prefix)."""
    ref = zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        max(level, 3), window_log=_window_log(len(base) + len(data)), write_content_size=True,
        enable_ldm=True)
    return zstandard.ZstdCompressor(dict_data=ref, compression_params=params).compress(data)


def decode_ref(stored, expected: int, base, what: str | None = None) -> bytes:
    check_frame_size(stored, expected, what)
    ref = zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    try:
        out = zstandard.ZstdDecompressor(dict_data=ref, max_window_size=1 << 31).decompress(
            stored, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd data is corrupted ({e})", part=what) from None
    if len(out) != expected:
        raise IntegrityError(f"decoded to {len(out)} bytes, expected {expected}", part=what)
    return out

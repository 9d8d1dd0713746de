"""Every fact about the dtypes tensors arrive in, in one place.

A tensor's dtype is a string: a safetensors dtype name (``"F32"``, ``"BF16"``) or, for
GGUF, a ggml type name (``"F16"``, ``"Q4_1"``). This module answers, for either: how many
bits an element takes, how many bytes a tensor of a shape takes, the element width the
byte-plane codecs split by, which numpy and torch dtype it reads as, and a quantized
type's block geometry. Quantized blocks mix scales and packed integers, so they have no
meaningful element width: they are plain bytes (width 1).

gguf-py is imported only when a ggml type is asked about (it is slow to import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Bits per element of every safetensors dtype (sub-byte float types included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}

#: safetensors dtype -> torch dtype name (looked up with getattr: older torch lacks some).
SAFETENSORS_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}

#: ggml types that are plain arrays of one element type (torch dtype name); every other
#: ggml type is blocks.
GGML_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
}

#: Float dtypes numpy computes with natively (BF16 has no numpy dtype).
NUMPY_FLOATS: dict[str, type] = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


@dataclass(frozen=True, slots=True)
class GgmlBlocks:
    """A ggml type's block geometry: ``block`` elements stored in ``type_size`` bytes."""

    name: str
    type_id: int
    block: int
    type_size: int

    def nbytes(self, n_elements: int) -> int:
        """Stored bytes of ``n_elements`` elements (whole blocks)."""
        return n_elements // self.block * self.type_size


@lru_cache(maxsize=None)
def ggml_blocks(dtype: str | int) -> GgmlBlocks | None:
    """The block geometry of a ggml type given by name or number, or None if unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = (GGMLQuantizationType(dtype) if isinstance(dtype, int)
                 else GGMLQuantizationType.__members__[dtype])
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        return None
    return GgmlBlocks(qtype.name, int(qtype), block, type_size)


def dtype_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Stored byte length of a safetensors tensor of ``dtype`` and ``shape`` (sub-byte
    dtypes packed)."""
    return (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8


def element_width(dtype: str) -> int:
    """Bytes per element for plane splitting: 4 for F32, 2 for F16/BF16, 1 for blocks."""
    bits = DTYPE_BITS.get(dtype)
    if bits is not None:
        return bits // 8 if bits % 8 == 0 else 1
    blocks = ggml_blocks(dtype)
    if blocks is not None and blocks.block == 1 and blocks.type_size in (1, 2, 4, 8):
        return blocks.type_size
    return 1


def is_quantized(dtype: str, kind: str) -> bool:
    """Whether a tensor of ``dtype`` in a file of ``kind`` (``"gguf"`` or not) is ggml
    blocks rather than an array of typed elements."""
    return kind == "gguf" and dtype not in GGML_TORCH_NAMES


def torch_dtype_name(dtype: str, kind: str) -> str | None:
    """The torch dtype name a tensor loads as, or None for raw bytes (quantized blocks,
    sub-byte floats)."""
    table = GGML_TORCH_NAMES if kind == "gguf" else SAFETENSORS_TORCH_NAMES
    return table.get(dtype)

"""Element widths of the dtypes tensors arrive in, for byte-plane encodings.

Safetensors dtypes are keyed by their names (``"F32"``); GGUF tensors by their ggml type
names (``"Q4_1"``). Quantized blocks mix scales and packed integers, so they have no
meaningful element width: they are treated as plain bytes (width 1).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .safetensors import DTYPE_BITS


def element_width(dtype: str) -> int:
    """Bytes per element for plane splitting: 4 for F32, 2 for F16/BF16, 1 for blocks."""
    bits = DTYPE_BITS.get(dtype)
    if bits is not None:
        return bits // 8 if bits % 8 == 0 else 1
    qtype = GGMLQuantizationType.__members__.get(dtype)
    if qtype is not None:
        block, type_size = GGML_QUANT_SIZES[qtype]
        if block == 1 and type_size in (1, 2, 4, 8):
            return type_size
    return 1

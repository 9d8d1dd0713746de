"""Deterministic tensor transforms: the "recipe" half of a derived tensor.

A model published in many precisions is one tensor set pushed through casts, ggml
quantizers, dequantizers and the converter's layout changes. A derived blob stores the
transform that predicts its bytes from a base tensor, plus the XOR residual against the
prediction. For that to be safe every transform here is a pure function of its input bytes,
defined exactly (spec/FORMAT.md §4.8) and independent of library versions where they could
differ: a decoder must predict the very bytes the encoder predicted.

Element types are named as ggml names them (``"F32"``, ``"F16"``, ``"BF16"``, ``"Q4_0"``...)
and numbered on disk by ``ggml_type``. Shapes are logical and row-major (numpy order: the last
axis is contiguous, quantization blocks run along it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ...errors import TransformMismatch
from . import kquants

#: float element types a cast reaches, with their numpy storage type
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
#: quantizers reproduced bit for bit: gguf-py's for the simple ones, our ports for K-quants
SIMPLE_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
QUANT_TYPES = SIMPLE_QUANTS + tuple(kquants.QUANTIZERS)
#: Elements quantized at a time (bounds the quantizers' temporaries).
QUANT_CHUNK = 1 << 18


class TransformKind(IntEnum):
    """The transform registry (on-disk numbers; never reuse one).

    ``param`` is the one integer parameter each kind takes:

    - CAST (1): to float type ``param`` (ggml_type 0 F32, 1 F16, 30 BF16) from F32/F16/BF16;
    - QUANTIZE (2): to ggml quantized type ``param``, from a float type (widened exactly to
      F32 first), with llama.cpp's reference quantizer;
    - DEQUANTIZE (3): any type gguf-py dequantizes, to float type ``param``;
    - TRANSPOSE (4): 2-D transpose of a float tensor; ``param`` is 0;
    - PERMUTE_QK (5): llama.cpp's converter Q/K head permutation with ``param`` heads;
    - UNPERMUTE_QK (6): its inverse, with ``param`` heads.
    """

    CAST = 1
    QUANTIZE = 2
    DEQUANTIZE = 3
    TRANSPOSE = 4
    PERMUTE_QK = 5
    UNPERMUTE_QK = 6


@dataclass(frozen=True)
class Transform:
    """One registry entry applied with its parameter."""

    kind: TransformKind
    param: int = 0

    def to_json(self) -> list[int]:
        return [int(self.kind), int(self.param)]

    @classmethod
    def from_json(cls, value: object) -> Transform:
        """Parse ``[kind, param]``; an unknown kind raises TransformMismatch (refuse the blob)."""
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise TransformMismatch(f"malformed transform {value!r}")
        try:
            kind = TransformKind(value[0])
        except ValueError:
            raise TransformMismatch(f"unknown transform {value[0]}") from None
        return cls(kind, value[1])

    def describe(self) -> str:
        """Short human text: ``Q4_0 quantization``, ``cast to F16``."""
        name = _type_name_or_none(self.param)
        return {
            TransformKind.CAST: f"cast to {name}",
            TransformKind.QUANTIZE: f"{name} quantization",
            TransformKind.DEQUANTIZE: f"dequantization to {name}",
            TransformKind.TRANSPOSE: "transpose",
            TransformKind.PERMUTE_QK: f"Q/K permutation ({self.param} heads)",
            TransformKind.UNPERMUTE_QK: f"Q/K unpermutation ({self.param} heads)",
        }[self.kind]


@dataclass(frozen=True)
class TypedTensor:
    """A tensor's stored bytes with their ggml element type and logical shape."""

    data: np.ndarray  # 1-D uint8, the bytes as stored
    etype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview | np.ndarray, etype: str,
           shape: tuple[int, ...] | list[int]) -> TypedTensor:
        raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        t = cls(raw.reshape(-1).view(np.uint8), etype, tuple(int(s) for s in shape))
        if t.data.size != nbytes(etype, t.shape):
            raise TransformMismatch(f"{etype}{list(t.shape)} needs {nbytes(etype, t.shape)} "
                                    f"bytes, got {t.data.size}")
        return t

    def tobytes(self) -> bytes:
        return self.data.tobytes()


def type_number(etype: str) -> int:
    """The ggml_type number of an element type name (``"BF16"`` -> 30)."""
    try:
        return int(GGMLQuantizationType[etype])
    except KeyError:
        raise TransformMismatch(f"no ggml type {etype!r}") from None


def type_name(number: int) -> str:
    name = _type_name_or_none(number)
    if name is None:
        raise TransformMismatch(f"no ggml type number {number}")
    return name


def _type_name_or_none(number: int) -> str | None:
    try:
        return GGMLQuantizationType(number).name
    except ValueError:
        return None


def nbytes(etype: str, shape: tuple[int, ...]) -> int:
    """Stored size of a tensor; the last axis must hold whole blocks."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[etype]]
    except KeyError:
        raise TransformMismatch(f"no ggml type {etype!r}") from None
    n = math.prod(shape)
    last = shape[-1] if shape else 1
    if last % block:
        raise TransformMismatch(f"{etype} blocks of {block} do not divide a row of {last}")
    return n // block * size


# -- float conversions --------------------------------------------------------------

def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, overflow to infinity (numpy's ``astype``, which gguf-py's
    converter uses). A NaN keeps its sign and the top 10 bits of its payload, or payload 1
    when those are zero; no quiet bit is forced. That is numpy's scalar rule, which its
    casts follow on x86; a hardware conversion (F16C, Arm) would quiet a signalling NaN,
    so NaN lanes are set here from their bits rather than left to the platform."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        out = x.astype(np.float16)
    nan = np.isnan(x)
    if nan.any():
        bits = x[nan].view(np.uint32)
        payload = (bits >> 13) & 0x3FF
        out.view(np.uint16)[nan] = (((bits >> 16) & 0x8000) | 0x7C00
                                    | np.where(payload == 0, 1, payload)).astype(np.uint16)
    return out


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even on the top 16 bits; a NaN keeps its sign and top payload bits
    with the quiet bit set (ggml's ``ggml_compute_fp32_to_bf16``, which llama.cpp's converter
    uses through gguf-py). torch agrees on every non-NaN value; its own NaN bits differ between
    its scalar (0x7FC0) and vectorized (0xFFFF) paths, so torch is no definition for them.

    Returns the uint16 bit patterns."""
    bits = np.asarray(x, np.float32).reshape(-1).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    bits = np.where(nan, (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), bits)
    wide = bits.astype(np.uint64)
    return ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16).astype(np.uint16)


def to_f32(t: TypedTensor) -> np.ndarray:
    """Exact widening of a float tensor to float32 (flat)."""
    if t.etype == "F32":
        return t.data.view(np.float32)
    if t.etype == "F16":
        h = t.data.view(np.uint16)
        out = h.view(np.float16).astype(np.float32)
        nan = (h & 0x7FFF) > 0x7C00
        if nan.any():  # the payload as it is, never quieted (see f32_to_f16)
            hb = h[nan].astype(np.uint32)
            out.view(np.uint32)[nan] = ((hb & 0x8000) << 16) | 0x7F800000 | ((hb & 0x3FF) << 13)
        return out
    if t.etype == "BF16":
        return (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise TransformMismatch(f"{t.etype} is not a float type")


def from_f32(x: np.ndarray, etype: str) -> np.ndarray:
    """float32 values to the bytes of float type ``etype`` (flat uint8)."""
    if etype == "F32":
        out = np.asarray(x, np.float32)
    elif etype == "F16":
        out = f32_to_f16(x)
    elif etype == "BF16":
        out = f32_to_bf16(np.asarray(x, np.float32))
    else:
        raise TransformMismatch(f"{etype} is not a float type")
    return np.ascontiguousarray(out).reshape(-1).view(np.uint8)


# -- quantization --------------------------------------------------------------------

def quantize(x: np.ndarray, etype: str, row: int) -> np.ndarray:
    """float32 values (rows of ``row`` elements) to ggml ``etype`` blocks, as llama.cpp's
    ``quantize_row_*_ref``.

    For the simple quantizers gguf-py's numpy code is used; it matches llama.cpp bit for bit
    on finite blocks but not on blocks holding NaN or infinity, so those blocks are defined to
    predict zero bytes (their residual carries them) and no decoder depends on how a library
    version treats them."""
    x = np.asarray(x, np.float32).reshape(-1)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[etype]]
    if row % block or x.size % block:
        raise TransformMismatch(f"{etype} blocks of {block} do not divide a row of {row}")
    if etype not in kquants.QUANTIZERS and etype not in SIMPLE_QUANTS:
        raise TransformMismatch(f"no reference quantizer for {etype}")
    # Blocks are independent: quantize in chunks so temporaries stay a few MB.
    step = QUANT_CHUNK // block * block
    return np.concatenate([_quantize_chunk(np.ascontiguousarray(x[i:i + step]), etype,
                                           block, size)
                           for i in range(0, x.size, step)] or [np.zeros(0, np.uint8)])


def _quantize_chunk(x: np.ndarray, etype: str, block: int, size: int) -> np.ndarray:
    if etype in kquants.QUANTIZERS:
        return np.frombuffer(kquants.QUANTIZERS[etype](x), np.uint8)
    blocks = x.reshape(-1, block)
    if etype == "Q8_0":
        fast = _q8_0(blocks)
        if fast is not None:
            return fast
    finite = np.isfinite(blocks).all(axis=1)
    out = np.zeros((blocks.shape[0], size), np.uint8)
    if finite.any():
        with np.errstate(all="ignore"):
            # One row: gguf-py groups 16 rows per call (see dequantize).
            out[finite] = gq.quantize(blocks[finite].reshape(1, -1),
                                      GGMLQuantizationType[etype]).reshape(-1, size)
    if etype in _NEG_ZERO_SCALE:
        # ggml's ``d = max / -8`` (-16 for Q5_0) keeps its initial ``max = 0.0f`` on a block
        # of zeros, so d is -0.0 (F16 0x8000); gguf-py takes max from the block (-0.0 or
        # 0.0) and may store +0.0. Only the sign of the zero scale differs.
        zeros = finite & ~np.any(blocks, axis=1)
        out[zeros, 0:2] = (0x00, 0x80)
    return out.reshape(-1)


def _q8_0(blocks: np.ndarray) -> np.ndarray | None:
    """Q8_0 as ``quantize_row_q8_0_ref``, bit for bit, ~8x faster than gguf-py's numpy code
    (which rounds with six full-size passes and dominated pack, unpack and verify of a
    family holding a Q8_0 GGUF). None when a block is not finite or its scale's reciprocal
    overflows: those take gguf-py's path and the rules above.

    ``roundf`` (half away from zero) of a float32 ``v`` with ``|v| <= 127``: ``v + 0.5`` with
    v's sign is exact in float64 and the cast to int8 truncates toward zero."""
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.zeros_like(d)
    with np.errstate(all="ignore"):
        np.divide(np.float32(1), d, out=inv, where=d != 0)
    # amax is NaN or inf when the block holds one; inv overflows on a subnormal scale.
    if not (np.isfinite(d).all() and np.isfinite(inv).all()):
        return None
    v = blocks * inv
    out = np.empty((blocks.shape[0], 34), np.uint8)
    with np.errstate(over="ignore"):  # a scale over 65504 is F16 inf, as in ggml
        out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = (v.astype(np.float64) + np.copysign(0.5, v, dtype=np.float64)
                  ).astype(np.int8).view(np.uint8)
    return out.reshape(-1)


#: Simple quantizers whose scale is ``max / -k``: -0.0 on an all-zero block (see above).
_NEG_ZERO_SCALE = frozenset({"Q4_0", "Q5_0"})


def dequantize(t: TypedTensor) -> np.ndarray:
    """Any type gguf-py dequantizes, to float32 values (flat)."""
    if t.etype in FLOAT_TYPES:
        return to_f32(t)
    qtype = GGMLQuantizationType[t.etype]
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = t.data.reshape(-1, size)
    step = max(1, QUANT_CHUNK // GGML_QUANT_SIZES[qtype][0])
    try:
        with np.errstate(all="ignore"):
            # One row per call: gguf-py works over groups of 16 rows, and a block per row
            # made that a Python call (and an array_split) per 16 blocks.
            parts = [gq.dequantize(blocks[i:i + step].reshape(1, -1), qtype).reshape(-1)
                     for i in range(0, len(blocks), step)]
    except NotImplementedError:
        raise TransformMismatch(f"gguf-py cannot dequantize {t.etype}") from None
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else \
        np.zeros(0, np.float32)


# -- layout --------------------------------------------------------------------------

def qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows: within each head, interleave halves."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise TransformMismatch(f"{rows} rows do not split into {n_head} heads of pairs")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def qk_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`qk_permute`."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise TransformMismatch(f"{rows} rows do not split into {n_head} heads of pairs")
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _elements(t: TypedTensor) -> np.ndarray:
    """A float tensor's elements in its storage dtype, shaped."""
    if t.etype not in FLOAT_TYPES:
        raise TransformMismatch(f"a layout transform needs a float tensor, not {t.etype}")
    return t.data.view(FLOAT_TYPES[t.etype]).reshape(t.shape)


# -- applying ------------------------------------------------------------------------

def apply(tr: Transform, t: TypedTensor) -> TypedTensor:
    """Apply one transform; TransformMismatch when it does not apply to this input."""
    kind, p = tr.kind, tr.param
    row = t.shape[-1] if t.shape else 1
    if kind is TransformKind.CAST:
        dst = type_name(p)
        if t.etype not in FLOAT_TYPES or dst not in FLOAT_TYPES or dst == t.etype:
            raise TransformMismatch(f"no cast from {t.etype} to {dst}")
        return TypedTensor(from_f32(to_f32(t), dst), dst, t.shape)
    if kind is TransformKind.QUANTIZE:
        dst = type_name(p)
        if t.etype not in FLOAT_TYPES:
            raise TransformMismatch(f"quantize needs a float source, not {t.etype}")
        return TypedTensor.of(quantize(to_f32(t), dst, row), dst, t.shape)
    if kind is TransformKind.DEQUANTIZE:
        dst = type_name(p)
        if dst not in FLOAT_TYPES or t.etype in FLOAT_TYPES:
            raise TransformMismatch(f"no dequantization from {t.etype} to {dst}")
        return TypedTensor(from_f32(dequantize(t), dst), dst, t.shape)
    if kind is TransformKind.TRANSPOSE:
        if len(t.shape) != 2:
            raise TransformMismatch(f"transpose needs a 2-D tensor, not {list(t.shape)}")
        w = np.ascontiguousarray(_elements(t).T)
        return TypedTensor(w.reshape(-1).view(np.uint8), t.etype, w.shape)
    if kind in (TransformKind.PERMUTE_QK, TransformKind.UNPERMUTE_QK):
        if not t.shape:
            raise TransformMismatch("a scalar has no heads")
        f = qk_permute if kind is TransformKind.PERMUTE_QK else qk_unpermute
        w = np.ascontiguousarray(f(_elements(t), p))
        return TypedTensor(w.reshape(-1).view(np.uint8), t.etype, t.shape)
    raise TransformMismatch(f"unknown transform {kind!r}")  # pragma: no cover - enum is closed


def apply_chain(chain: tuple[Transform, ...] | list[Transform], t: TypedTensor) -> TypedTensor:
    """Apply transforms left to right (a derived blob holds one or two)."""
    for tr in chain:
        t = apply(tr, t)
    return t


def xor_residual(actual: bytes | np.ndarray, predicted: bytes | np.ndarray) -> np.ndarray:
    """``actual XOR predicted`` (equal lengths): all zeros where the transform reproduces."""
    a = np.frombuffer(actual, np.uint8) if not isinstance(actual, np.ndarray) else actual
    b = np.frombuffer(predicted, np.uint8) if not isinstance(predicted, np.ndarray) else predicted
    if a.size != b.size:
        raise TransformMismatch(f"prediction has {b.size} bytes, the tensor {a.size}")
    return np.bitwise_xor(a.view(np.uint8), b.view(np.uint8))

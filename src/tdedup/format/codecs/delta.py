"""Delta encodings: a blob stored as the difference to another blob (its *base*).

Every delta blob ends in a byte-plane blob (the layout of :func:`.byteplane.byteplane_compress`:
u32 width, width x u64 frame lengths, one zstd frame per plane) holding a *residual*:

- ``XOR_BYTEPLANE_ZSTD`` (16): ``data XOR base``; nothing before it.
- ``SUB_BYTEPLANE_ZSTD`` (17): ``data - base``, the wrap-around difference of the elements
  read as unsigned little-endian integers of ``width`` bytes (1, 2, 4 or 8). For floats it
  is the distance in ulps when the sign agrees.
- ``ZIGZAG_SUB_BYTEPLANE_ZSTD`` (18): the same difference zigzagged (``(d << 1) ^ (d >> (8w-1))``
  with an arithmetic shift), so that a small negative difference has small high bytes instead
  of 0xFF ones: a fine-tune's drift lands in the low planes and leaves the high ones zero
  (6% smaller than 17 on the MiniLM fine-tunes). The residual of 19 and 20 is zigzagged too.
- ``DECAY_SUB_BYTEPLANE_ZSTD`` (19): ``zigzag(data - P)`` where ``P`` is the base (F32)
  multiplied ``k`` times by the float32 ``c``, rounding after each step, as decoupled weight
  decay (AdamW) does to rows that get no gradient. Header: ``<II`` (bits of ``c``, ``k``).
  ``k = 1`` is a plain rescale; ``k = 0`` no prediction at all.
- ``LOWRANK_SUB_BYTEPLANE_ZSTD`` (20): ``zigzag(data - P)`` where ``P`` is the F32 base plus a
  rank-``r`` product ``U @ V`` (a merged LoRA): ``P = float32(base + sum_k U[:, k] V[k, :])``,
  summed in float64 in that order with element-wise operations (never BLAS) so that every
  machine computes the same bits. Header: ``<IIII`` (rows, cols, rank, length of the factor
  blob), then the factors (``U`` rows x rank, then ``V`` rank x cols, F32) as a width-4
  byte-plane blob, then the residual.

Predictions only touch elements whose base is a float32 with a biased exponent in
``[PREDICT_EXP_MIN, PREDICT_EXP_MAX]`` (and, for low rank, whose prediction stays in
``[2**-100, 2**100]``); every other element is predicted as the base itself. So no step
ever meets a subnormal, an infinity or a NaN, and a process that flushes subnormals to zero
decodes the same bits. Decoders check every header field before allocating anything and
raise only :class:`IntegrityError` / :class:`DecompressionBombError` /
:class:`BundleFormatError`.

The residual planes are compressed with zstd's ``fast`` strategy, ``min_match=7`` and a
64-entry hash table at levels below 10: on fine-tune residuals (random low planes, skewed
high planes) matches are rare and mostly harmful, and these settings land within 3% of
each plane's order-0 entropy (Huffman-coded literals), 1.4% below level 1 and 10% below
level 3 on the skewed plane, and faster than both.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass

import numpy as np

from ...errors import BundleFormatError, IntegrityError
from ..bundle.constants import BlobEncoding
from .byteplane import PLANE_COUNT, byteplane_compress, byteplane_decompress, interleave_into

#: The widths a SUB residual may have (unsigned integer views).
SUB_WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Most multiplication steps a decay prediction may ask for (decode runs them all).
MAX_DECAY_STEPS = 256
#: The whole decay factor ``c**k`` stays within 2**+-16, so predictions stay normal.
MAX_DECAY_LOG2 = 16.0
#: Highest rank of a low-rank prediction (decode costs 2 x rank passes over the tensor).
MAX_RANK = 256
#: Base exponents (biased, F32) that predictions touch: far from subnormals and infinity.
PREDICT_EXP_MIN, PREDICT_EXP_MAX = 32, 223
#: Low-rank predictions outside [2**-100, 2**100] fall back to the base element.
_LOWRANK_MIN, _LOWRANK_MAX = 2.0 ** -100, 2.0 ** 100
#: Elements per chunk of the element-wise passes (fits in L2 with its temporaries).
CHUNK = 1 << 16
#: Elements per chunk of a decay prediction: its ``k`` multiplies each cost a trip through
#: the GIL, so fewer, larger calls (the chunk still fits in L2) decode faster beside
#: other threads.
DECAY_CHUNK = 1 << 17
#: Elements per block of the low-rank prediction (float64 temporaries: 4x the bytes; as
#: large as L2 allows, for the same reason).
LOWRANK_BLOCK = 1 << 16

#: Headers of the predicted encodings (19: bits of ``c``, ``k``; 20: rows, cols, rank,
#: length of the factor blob).
DECAY_HEAD = struct.Struct("<II")
LOWRANK_HEAD = struct.Struct("<IIII")


def planes_compress(data, width: int, level: int = 3, *, prefix: bytes = b"") -> bytes:
    """A byte-plane blob of a residual (decodable by :func:`byteplane_decompress`), after
    ``prefix``."""
    return byteplane_compress(data, width, level, prefix=prefix)


# -- element-wise kernels ---------------------------------------------------------------

def uview(data, width: int) -> np.ndarray:
    return np.frombuffer(data, dtype=SUB_WIDTHS[width])


def sub_residual(data, base, width: int, zigzag: bool = True) -> np.ndarray:
    """``data - base`` element-wise on unsigned ``width``-byte integers, zigzagged unless
    told otherwise (a new array)."""
    t, b = uview(data, width), uview(base, width)
    out = np.empty_like(t)
    if not zigzag:
        return np.subtract(t, b, out=out)
    sign = np.empty(min(CHUNK, len(t)), dtype=t.dtype)
    shift = t.dtype.type(8 * width - 1)
    for i in range(0, len(t), CHUNK):
        o = out[i:i + CHUNK]
        s = sign[:len(o)]
        np.subtract(t[i:i + CHUNK], b[i:i + CHUNK], out=o)
        np.right_shift(o, shift, out=s)
        np.negative(s, out=s)
        np.left_shift(o, t.dtype.type(1), out=o)
        np.bitwise_xor(o, s, out=o)
    return out


def add_residual_(residual: np.ndarray, base, width: int, zigzag: bool = True) -> np.ndarray:
    """In place: ``residual <- base + unzigzag(residual)``; returns ``residual``."""
    z, b = residual.view(SUB_WIDTHS[width]), uview(base, width)
    if not zigzag:
        np.add(z, b, out=z)
        return residual
    one = z.dtype.type(1)
    sign = np.empty(min(CHUNK, len(z)), dtype=z.dtype)
    for i in range(0, len(z), CHUNK):
        o = z[i:i + CHUNK]
        s = sign[:len(o)]
        np.bitwise_and(o, one, out=s)
        np.negative(s, out=s)
        np.right_shift(o, one, out=o)
        np.bitwise_xor(o, s, out=o)
        np.add(o, b[i:i + CHUNK], out=o)
    return residual


def gather_words(planes: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Elements ``idx`` of a byte-plane residual (``planes[j][i]``: element ``i``'s byte
    ``j``), as unsigned integers of the planes' count in bytes (joined as
    :func:`~.byteplane.interleave_into` joins a whole blob)."""
    words = np.empty(len(idx), SUB_WIDTHS[len(planes)])
    interleave_into(words.view(np.uint8), [p[idx] for p in planes])
    return words


def combine_at_(out: np.ndarray, idx: np.ndarray, words: np.ndarray, op: str) -> None:
    """In place, at elements ``idx`` of ``out`` (uint8, ``words``' width per element),
    which holds the prediction: apply the residual ``words`` by ``op`` (``xor``, ``add``,
    ``zigzag-add``). Where the residual is zero the prediction is already the data, so a
    sparse residual is applied where it is not zero only (bench/RESULTS.md, "## load")."""
    o = out.view(words.dtype)
    if op == "xor":
        o[idx] ^= words
        return
    if op == "zigzag-add":
        one = words.dtype.type(1)
        words = (words >> one) ^ (-(words & one))
    o[idx] += words


def predictable(bits: np.ndarray) -> np.ndarray:
    """Mask of F32 bit patterns whose exponent lies in the predicted range."""
    return ~unpredictable_into(bits, np.empty_like(bits), np.empty(bits.shape, bool))


#: The exponent field of an F32, where its predicted range starts, and the range's span.
_EXP_FIELD = np.uint32(0x7F800000)
_EXP_LOW = np.uint32(PREDICT_EXP_MIN << 23)
_EXP_SPAN = np.uint32((PREDICT_EXP_MAX - PREDICT_EXP_MIN) << 23)


def unpredictable_into(bits: np.ndarray, scratch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool) <- whether each F32 bit pattern's exponent lies *outside* the
    predicted range, computed in ``scratch`` (uint32, the shape of ``bits``); returns
    ``mask``. Decoders call it once per chunk with buffers of their own: the three 512 KB
    temporaries of ``(bits >> 23) & 0xFF ...`` were freed at the top of the heap and
    faulted in again for every chunk, 10x the cost of the arithmetic."""
    np.bitwise_and(bits, _EXP_FIELD, out=scratch)
    np.subtract(scratch, _EXP_LOW, out=scratch)  # wraps below the range
    return np.greater(scratch, _EXP_SPAN, out=mask)


def aligned_empty(n: int, dtype) -> np.ndarray:
    """An uninitialized array of ``n`` elements starting on a 64-byte boundary: numpy's
    large arrays start 16 bytes into a line, and AVX-512 passes over such a buffer ran
    1.4x slower (the decay prediction's multiplies, bench/RESULTS.md "## load")."""
    dt = np.dtype(dtype)
    raw = np.empty(n * dt.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n * dt.itemsize].view(dt)


def decay_chunks(base, c: float, k: int):
    """Yield ``(start, bits)``: the prediction of the F32 base, ``DECAY_CHUNK`` elements at a time:
    each element multiplied ``k`` times by float32 ``c``, rounding each step.

    ``bits`` is one buffer reused for every chunk (it stays in L2 for the ``k`` passes and
    nothing is allocated per chunk): consume each before taking the next."""
    bits = np.frombuffer(base, dtype=np.uint32)
    buf = aligned_empty(min(DECAY_CHUNK, len(bits)), np.uint32)
    for i in range(0, len(bits), DECAY_CHUNK):
        b = bits[i:i + DECAY_CHUNK]
        yield i, decay_into(buf[:len(b)], b, c, k)


def decay_into(out: np.ndarray, bits: np.ndarray, c: float, k: int) -> np.ndarray:
    """``out`` (uint32) <- the decay prediction of ``bits`` (F32 bit patterns, as many),
    computed in ``out`` itself ``DECAY_CHUNK`` elements at a time; returns ``out``."""
    cf = np.float32(c)
    scratch, mask = _decay_scratch()
    with np.errstate(all="ignore"):
        for i in range(0, len(bits), DECAY_CHUNK):
            b = bits[i:i + DECAY_CHUNK]
            o = out[i:i + len(b)]
            np.copyto(o, b)
            x = o.view(np.float32)
            for _ in range(k):
                np.multiply(x, cf, out=x)
            keep = unpredictable_into(b, scratch[:len(b)], mask[:len(b)])
            if keep.any():
                np.copyto(o, b, where=keep)
    return out


_local = threading.local()


def _decay_scratch() -> tuple[np.ndarray, np.ndarray]:
    """This thread's buffers for :func:`unpredictable_into` over a decay chunk."""
    bufs = getattr(_local, "decay", None)
    if bufs is None:
        bufs = _local.decay = (np.empty(DECAY_CHUNK, np.uint32), np.empty(DECAY_CHUNK, bool))
    return bufs


def lowrank_chunks(base, u: np.ndarray, v: np.ndarray):
    """Yield ``(start, bits)``: ``float32(base + sum_k u[:, k] * v[k, :])`` (F32 bit
    patterns, row-major), a block of rows at a time; deterministic (no BLAS)."""
    rows, rank = u.shape
    cols = v.shape[1]
    bits = np.frombuffer(base, dtype=np.uint32).reshape(rows, cols)
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    step = max(1, LOWRANK_BLOCK // max(cols, 1))
    tmp = np.empty((step, cols), dtype=np.float64)
    with np.errstate(all="ignore"):
        for r0 in range(0, rows, step):
            b = bits[r0:r0 + step]
            out = np.array(b)
            if rank:
                acc = b.view(np.float32).astype(np.float64)
                t = tmp[:len(acc)]
                for k in range(rank):
                    np.multiply(u64[r0:r0 + step, k, None], v64[None, k, :], out=t)
                    np.add(acc, t, out=acc)
                mag = np.abs(acc)
                ok = predictable(b) & (mag >= _LOWRANK_MIN) & (mag <= _LOWRANK_MAX)
                np.copyto(out, acc.astype(np.float32).view(np.uint32), where=ok)
            yield r0 * cols, out.reshape(-1)


def _gather(chunks, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint32)
    for start, part in chunks:
        out[start:start + len(part)] = part
    return out


def decay_predict(base, c: float, k: int) -> np.ndarray:
    """The whole decay prediction (F32 bit patterns) of ``base``."""
    return _gather(decay_chunks(base, c, k), memoryview(base).nbytes // 4)


def lowrank_predict(base, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The whole low-rank prediction (F32 bit patterns) of ``base``."""
    return _gather(lowrank_chunks(base, u, v), u.shape[0] * v.shape[1])


def chunked_residual(data, chunks, n: int) -> np.ndarray:
    """``zigzag(data - prediction)`` (uint32) from a prediction's chunks."""
    t = np.frombuffer(data, dtype=np.uint32)
    out = np.empty(n, dtype=np.uint32)
    for start, part in chunks:
        stop = start + len(part)
        out[start:stop] = sub_residual(t[start:stop], part, 4)
    return out


def decay_ok(c: float, k: int) -> bool:
    """Whether a decay header ``(c, k)`` is within the limits a decoder accepts."""
    if k == 0:
        return True
    return (math.isfinite(c) and c > 0 and 1 <= k <= MAX_DECAY_STEPS
            and abs(k * math.log2(c)) <= MAX_DECAY_LOG2)



@dataclass(frozen=True)
class DeltaHeader:
    """What a delta blob's stored bytes say before its residual (spec §4.4), checked.

    ``op`` is how the residual combines with the prediction: ``xor`` (data = P ^ r),
    ``add`` (data = P + r on unsigned integers of the residual's width) or ``zigzag-add``
    (data = P + unzigzag(r)). The prediction ``P`` is the base itself, unless ``decay``
    ``(c, k)`` or ``lowrank`` ``(U, V)`` say otherwise; then the residual must have
    ``need_width`` 4 and :meth:`predict_chunks` makes ``P`` for a slice of the base.
    ``residual_offset``: where the residual's byte-plane blob starts in the stored bytes.
    """

    encoding: BlobEncoding
    op: str
    residual_offset: int
    need_width: int = 0
    decay: tuple[float, int] | None = None
    lowrank: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def unit(self) -> int:
        """Bytes a prediction must be made in whole multiples of (a row, for low rank)."""
        return self.lowrank[1].shape[1] * 4 if self.lowrank is not None else 0

    def predict_chunks(self, base, start: int = 0):
        """The prediction (decay or low rank) for the base's bytes from byte ``start`` on,
        as :func:`decay_chunks` / :func:`lowrank_chunks` yield it: ``(element, bits)``
        relative to ``start``, in buffers that may be reused."""
        if self.decay is not None:
            return decay_chunks(base, *self.decay)
        if self.lowrank is None:
            raise ValueError("not a predicted delta")
        u, v = self.lowrank
        row = v.shape[1] * 4
        return lowrank_chunks(base, u[start // row:(start + memoryview(base).nbytes) // row], v)

    def prediction_into(self, out: np.ndarray, base, start: int = 0) -> np.ndarray:
        """``out`` (uint8) <- the prediction for the base's bytes from byte ``start`` on:
        the base itself, or its decay or low-rank prediction; returns ``out``."""
        if self.decay is None and self.lowrank is None:
            np.copyto(out, np.frombuffer(base, np.uint8))
            return out
        o = out.view(np.uint32)
        if self.decay is not None:  # computed in place: no buffer of its own
            decay_into(o, np.frombuffer(base, np.uint32), *self.decay)
            return out
        for s, part in self.predict_chunks(base, start):
            o[s:s + len(part)] = part
        return out

    def add_prediction_(self, residual: np.ndarray, base, start: int = 0) -> np.ndarray:
        """In place: ``residual <- prediction + unzigzag(residual)`` (F32 elements), one
        prediction chunk at a time, so no prediction is ever held whole."""
        z = residual.view(np.uint32)
        for s, part in self.predict_chunks(base, start):
            add_residual_(z[s:s + len(part)], part, 4)
        return residual


_OPS = {BlobEncoding.XOR_BYTEPLANE_ZSTD: "xor", BlobEncoding.SUB_BYTEPLANE_ZSTD: "add"}


def parse_delta_header(encoding: BlobEncoding, stored, expected: int, *,
                       what: str | None = None) -> DeltaHeader:
    """Read and check the header of a delta blob of ``expected`` decoded bytes (every
    field is checked before anything is allocated; the low-rank factors are decoded)."""
    try:
        encoding = BlobEncoding(encoding)
    except ValueError:
        raise BundleFormatError(f"unknown blob encoding {encoding}", part=what) from None
    if not encoding.is_delta:
        raise BundleFormatError(f"not a delta encoding: {int(encoding)}", part=what)
    mv = memoryview(stored).cast("B")
    op = _OPS.get(encoding, "zigzag-add")
    if encoding is BlobEncoding.DECAY_SUB_BYTEPLANE_ZSTD:
        if len(mv) < DECAY_HEAD.size:
            raise IntegrityError("decay delta header truncated", part=what)
        c_bits, k = DECAY_HEAD.unpack_from(mv, 0)
        c = float(np.array(c_bits, dtype=np.uint32).view(np.float32))
        if not decay_ok(c, k) or (k and expected % 4):
            raise IntegrityError(f"bad decay prediction (c={c!r}, k={k})", part=what)
        if not k:
            return DeltaHeader(encoding, op, DECAY_HEAD.size)
        return DeltaHeader(encoding, op, DECAY_HEAD.size, 4, decay=(c, k))
    if encoding is BlobEncoding.LOWRANK_SUB_BYTEPLANE_ZSTD:
        if len(mv) < LOWRANK_HEAD.size:
            raise IntegrityError("low-rank delta header truncated", part=what)
        rows, cols, rank, flen = LOWRANK_HEAD.unpack_from(mv, 0)
        pos = LOWRANK_HEAD.size
        if not rank:
            if flen:
                raise IntegrityError("rank-0 low-rank delta with factors", part=what)
            return DeltaHeader(encoding, op, pos)
        if (rows * cols * 4 != expected or rank > min(MAX_RANK, rows, cols)
                or pos + flen > len(mv)):
            raise IntegrityError(f"bad low-rank header ({rows}x{cols}, rank {rank})", part=what)
        fac = byteplane_decompress(mv[pos:pos + flen], (rows + cols) * rank * 4,
                                   f"{what}, factors" if what else "factors").view(np.float32)
        bits = fac.view(np.uint32)
        if ((bits & 0x7F800000) == 0x7F800000).any() or (
                ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)).any():
            # spec §4.4: no intermediate value is subnormal, infinite or NaN, so the
            # prediction does not depend on flush-to-zero or denormals-are-zero modes.
            raise IntegrityError("low-rank factors hold a NaN, an infinity or a subnormal "
                                 "value", part=what)
        u = fac[:rows * rank].reshape(rows, rank)
        v = fac[rows * rank:].reshape(rank, cols)
        return DeltaHeader(encoding, op, pos + flen, 4, lowrank=(u, v))
    return DeltaHeader(encoding, op, 0)


def decode_delta(encoding: BlobEncoding, stored, expected: int, base, *,
                 what: str | None = None) -> np.ndarray:
    """Decoded bytes (a uint8 array of ``expected`` bytes) of a delta blob."""
    head = parse_delta_header(encoding, stored, expected, what=what)
    if base is None or memoryview(base).nbytes != expected:
        raise BundleFormatError("delta base missing or of the wrong size", part=what)
    residual = memoryview(stored).cast("B")[head.residual_offset:]
    if head.op == "xor":
        out = byteplane_decompress(residual, expected, what)
        xw = 8 if expected % 8 == 0 else 1
        np.bitwise_xor(out.view(SUB_WIDTHS[xw]), uview(base, xw), out=out.view(SUB_WIDTHS[xw]))
        return out
    width = residual_width(residual, head.need_width, what)
    out = byteplane_decompress(residual, expected, what)
    if head.decay is None and head.lowrank is None:
        return add_residual_(out, base, width, head.op == "zigzag-add")
    return head.add_prediction_(out, base)


def residual_width(residual, need_width: int = 0, what: str | None = None) -> int:
    """The element width of a residual byte-plane blob, checked against what the
    encoding allows (a SUB width; exactly ``need_width`` when given)."""
    if len(residual) < PLANE_COUNT.size:
        raise IntegrityError("residual blob too short", part=what)
    (width,) = PLANE_COUNT.unpack_from(residual, 0)
    if width not in SUB_WIDTHS or (need_width and width != need_width):
        raise IntegrityError(f"residual width {width} not allowed here", part=what)
    return width

"""Delta encodings: a blob stored as the difference to another blob (its *base*).

Every delta blob ends in a byte-plane blob (the layout of :func:`codecs.byteplane_compress`:
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

import numpy as np

from ..errors import BundleFormatError, IntegrityError
from .bundle_constants import BlobEncoding
from .codecs import _PLANE_COUNT, byteplane_compress, byteplane_decompress

#: The widths a SUB residual may have (unsigned integer views).
SUB_WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Most multiplication steps a decay prediction may ask for (decode runs them all).
MAX_DECAY_STEPS = 256
#: Multiplication steps (on 256 sampled elements) the search for ``(c, k)`` may spend.
DECAY_SEARCH_STEPS = 1 << 14
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
#: Elements per block of the low-rank prediction (float64 temporaries: 4x the bytes).
LOWRANK_BLOCK = 1 << 14

_DECAY_HEAD = struct.Struct("<II")
_LOWRANK_HEAD = struct.Struct("<IIII")

def planes_compress(data, width: int, level: int = 3) -> bytes:
    """A byte-plane blob of a residual (decodable by :func:`codecs.byteplane_decompress`)."""
    return byteplane_compress(data, width, level)


# -- element-wise kernels ---------------------------------------------------------------

def _uview(data, width: int) -> np.ndarray:
    return np.frombuffer(data, dtype=SUB_WIDTHS[width])


def sub_residual(data, base, width: int, zigzag: bool = True) -> np.ndarray:
    """``data - base`` element-wise on unsigned ``width``-byte integers, zigzagged unless
    told otherwise (a new array)."""
    t, b = _uview(data, width), _uview(base, width)
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
    z, b = residual.view(SUB_WIDTHS[width]), _uview(base, width)
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


def _predictable(bits: np.ndarray) -> np.ndarray:
    """Mask of F32 bit patterns whose exponent lies in the predicted range."""
    e = (bits >> np.uint32(23)) & np.uint32(0xFF)
    return (e - np.uint32(PREDICT_EXP_MIN)) <= np.uint32(PREDICT_EXP_MAX - PREDICT_EXP_MIN)


def decay_chunks(base, c: float, k: int):
    """Yield ``(start, bits)``: the prediction of the F32 base, ``CHUNK`` elements at a time:
    each element multiplied ``k`` times by float32 ``c``, rounding each step."""
    bits = np.frombuffer(base, dtype=np.uint32)
    cf = np.float32(c)
    with np.errstate(all="ignore"):
        for i in range(0, len(bits), CHUNK):
            b = bits[i:i + CHUNK]
            out = np.array(b)
            x = out.view(np.float32)
            for _ in range(k):
                np.multiply(x, cf, out=x)
            np.copyto(out, b, where=~_predictable(b))
            yield i, out


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
                ok = _predictable(b) & (mag >= _LOWRANK_MIN) & (mag <= _LOWRANK_MAX)
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


def _chunked_residual(data, chunks, n: int) -> np.ndarray:
    """``zigzag(data - prediction)`` (uint32) from a prediction's chunks."""
    t = np.frombuffer(data, dtype=np.uint32)
    out = np.empty(n, dtype=np.uint32)
    for start, part in chunks:
        stop = start + len(part)
        out[start:stop] = sub_residual(t[start:stop], part, 4)
    return out


# -- fitting predictions ----------------------------------------------------------------

def _f32_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.uint32))


def _decay_ok(c: float, k: int) -> bool:
    if k == 0:
        return True
    return (math.isfinite(c) and c > 0 and 1 <= k <= MAX_DECAY_STEPS
            and abs(k * math.log2(c)) <= MAX_DECAY_LOG2)


def fit_decay(t_bits: np.ndarray, b_bits: np.ndarray) -> tuple[float, int, int]:
    """Find ``(c, k)`` such that ``k`` rounded multiplications by ``c`` turn as many of the
    sampled base elements as possible into the target's; returns ``(c, k, matches)``.

    Decoupled weight decay multiplies every weight by ``c = 1 - lr * wd`` once per step;
    rows without gradient (unseen tokens) are then exactly ``k`` such steps from the base.
    ``k = 1`` also covers a plain rescale. ``(1.0, 0, 0)`` when nothing fits. Cheap: the
    search only runs when a quarter of the sample is a near-exact rescale of the base.
    """
    mask = _predictable(b_bits)
    bf = b_bits[mask].view(np.float32)
    tf = t_bits[mask].view(np.float32)
    if len(bf) < 16:
        return 1.0, 0, 0
    with np.errstate(all="ignore"):
        ratio = tf.astype(np.float64) / bf.astype(np.float64)
    finite = np.isfinite(ratio) & (ratio > 0)
    if np.count_nonzero(finite) < 16:
        return 1.0, 0, 0
    s = float(np.median(ratio[finite]))
    if s == 1.0 or not math.isfinite(s) or s <= 0 or abs(math.log2(s)) > MAX_DECAY_LOG2:
        return 1.0, 0, 0
    close = finite & (np.abs(ratio / s - 1.0) < 2.0 ** -16)
    if np.count_nonzero(close) < len(bf) // 4:
        return 1.0, 0, 0
    # Search on a few of the close elements, then count on the whole sample.
    probe = np.flatnonzero(close)[:256]
    pb, pt = bf[probe], tf[probe].view(np.uint32)
    best = (-1, float(np.float32(s)), 1)

    def score(c: float, k_lo: int, k_hi: int) -> None:
        nonlocal best
        x = pb.copy()
        cf = np.float32(c)
        with np.errstate(all="ignore"):
            for k in range(1, k_hi + 1):
                np.multiply(x, cf, out=x)
                if k >= k_lo and _decay_ok(float(cf), k):
                    m = int(np.count_nonzero(x.view(np.uint32) == pt))
                    if m > best[0]:
                        best = (m, float(cf), k)

    score(float(np.float32(s)), 1, 1)
    ln_s = math.log(s)
    if abs(ln_s) < 2.0 ** -8:
        # c is a float32 next to 1: 1 - j * 2**-24 below 1, 1 + j * 2**-23 above it, and
        # k = ln(s) / ln(c). Try the j whose k lies in [2, MAX_DECAY_STEPS], smallest first.
        ulp = 2.0 ** -24 if s < 1 else 2.0 ** -23
        sign = -1.0 if s < 1 else 1.0
        j0 = max(1, math.floor(abs(ln_s) / ulp / MAX_DECAY_STEPS))
        budget = DECAY_SEARCH_STEPS
        for j in range(j0, j0 + 1024):
            c = 1.0 + sign * j * ulp
            k0 = round(ln_s / math.log(c))
            if k0 < 2 or best[0] == len(pb) or budget < k0:
                break
            budget -= k0 + 1
            score(c, max(2, k0 - 1), min(MAX_DECAY_STEPS, k0 + 1))
    _, c, k = best
    pred = decay_predict(bf.view(np.uint32), c, k)
    matches = int(np.count_nonzero(pred == tf.view(np.uint32)))
    return (c, k, matches) if matches else (1.0, 0, 0)


def fit_lowrank(data, base, rows: int, cols: int, max_rank: int = 64,
                tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``r`` factors ``(U, V)`` (F32) of ``data - base`` when that difference has a
    clear gap in its singular values (``sigma_r < tol * sigma_0``, ``r <= max_rank``);
    empty factors (rank 0) otherwise.

    The row space comes from a probe of ``2 * max_rank + 16`` rows (:func:`probe_rank`);
    then ``U = D V^T`` and one least-squares step ``V = (U^T U)^-1 U^T D`` over all rows,
    by blocks of rows (no float64 copy of the whole tensor): two BLAS passes of rank
    ``r``, O(rows * cols * r).
    """
    empty = (np.zeros((rows, 0), np.float32), np.zeros((0, cols), np.float32))
    max_rank = min(max_rank, MAX_RANK, rows // 4, cols // 4)
    if max_rank < 1:
        return empty
    t_bits = np.frombuffer(data, dtype=np.uint32).reshape(rows, cols)
    b_bits = np.frombuffer(base, dtype=np.uint32).reshape(rows, cols)
    probe = np.unique(np.linspace(0, rows - 1, min(rows, 2 * max_rank + 16)).astype(int))
    r, v, _ = probe_rank(_diff64(t_bits[probe], b_bits[probe]), max_rank, tol)
    if r == 0:
        return empty
    step = max(1, (1 << 20) // cols)
    u = np.empty((rows, r))
    utd = np.zeros((r, cols))
    for r0 in range(0, rows, step):
        d = _diff64(t_bits[r0:r0 + step], b_bits[r0:r0 + step])
        u[r0:r0 + step] = _matmul(d, v.T)
        utd += _matmul(u[r0:r0 + step].T, d)
    try:
        v = np.linalg.solve(_matmul(u.T, u), utd)
    except np.linalg.LinAlgError:
        pass  # keep the probe's basis
    return u.astype(np.float32), v.astype(np.float32)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``; small products through einsum's own loops (waking BLAS threads on a busy
    machine costs milliseconds per call), large ones through BLAS."""
    if a.shape[0] * a.shape[1] * b.shape[1] < 1 << 24:
        return np.einsum("ij,jk->ik", a, b)
    return a @ b


def _diff64(t_bits: np.ndarray, b_bits: np.ndarray) -> np.ndarray:
    """``t - b`` in float64, zero where either side is outside the predicted range."""
    ok = _predictable(t_bits) & _predictable(b_bits)
    with np.errstate(invalid="ignore", over="ignore"):
        d = t_bits.view(np.float32).astype(np.float64) - b_bits.view(np.float32)
    d[~ok] = 0.0
    return d


def probe_rank(d: np.ndarray, max_rank: int,
               tol: float = 1e-4) -> tuple[int, np.ndarray, float]:
    """Rank of a probe ``d`` (a few rows of a delta) by Cholesky with pivoting of its row
    Gram matrix: ``(r, v, tail)`` where ``r`` is the first step at which every row's
    residual norm is below ``tol`` times the largest row norm (0 if none within
    ``max_rank`` steps), ``v`` (r x cols) an orthonormal basis of the pivot rows, and
    ``tail`` the largest remaining squared residual norm relative to the largest one.

    Only small element-wise numpy passes: on a busy machine a single small BLAS/LAPACK
    call costs milliseconds in thread wake-ups, more than this whole function.
    """
    rows = np.asarray(d, dtype=np.float64)
    cols = rows.shape[1] if rows.ndim == 2 else 0
    empty = np.zeros((0, cols))
    gram = np.einsum("ik,jk->ij", rows, rows)
    diag = gram.diagonal().copy()
    top = float(diag.max()) if diag.size else 0.0
    if not top > 0 or not math.isfinite(top):
        return 0, empty, 0.0
    factor = np.zeros((len(rows), min(max_rank, len(rows)) + 1))
    pivots: list[int] = []
    for step in range(factor.shape[1]):
        i = int(np.argmax(diag))
        if diag[i] < tol * tol * top:
            return step, _orthonormal(rows[pivots]), float(max(diag[i], 0.0) / top)
        col = (gram[:, i] - np.einsum("ij,j->i", factor[:, :step], factor[i, :step])) \
            / math.sqrt(diag[i])
        factor[:, step] = col
        diag -= col * col
        diag[i] = 0.0
        pivots.append(i)
    return 0, empty, float(max(diag.max(), 0.0) / top)


def _orthonormal(rows: np.ndarray) -> np.ndarray:
    """Gram-Schmidt (twice, Kahan) of a few rows: an orthonormal basis of their span."""
    out = []
    for row in rows:
        q = row.astype(np.float64, copy=True)
        for _ in range(2):
            for b in out:
                q -= np.dot(b, q) * b
        out.append(q / np.linalg.norm(q))
    return np.array(out).reshape(len(out), rows.shape[1])


# -- encode / decode --------------------------------------------------------------------

def encode_delta(encoding: BlobEncoding, data, base, *, width: int = 1, level: int = 3,
                 shape: tuple[int, ...] | None = None) -> bytes:
    """Stored bytes of ``data`` as a delta against ``base`` (same length).

    ``width`` is the element width (dtype itemsize, 1 for quantized blocks). ``shape`` is
    only used by the low-rank encoding (a 2-D F32 tensor); without it, that encoding
    stores a rank-0 prediction (the same residual as SUB). Encodings that need F32
    elements fall back to no prediction when ``width != 4``.
    """
    encoding = BlobEncoding(encoding)
    n = memoryview(data).nbytes
    if base is None or memoryview(base).nbytes != n:
        raise BundleFormatError("delta base missing or of the wrong size")
    if encoding is BlobEncoding.XOR_BYTEPLANE_ZSTD:
        w = width if width >= 1 and n % width == 0 else 1
        xw = 8 if n % 8 == 0 else w if w in SUB_WIDTHS else 1
        x = np.bitwise_xor(_uview(data, xw), _uview(base, xw))
        return planes_compress(x, w, level)
    w = width if width in SUB_WIDTHS and n % width == 0 else 1
    if encoding in (BlobEncoding.SUB_BYTEPLANE_ZSTD, BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD):
        zigzag = encoding is BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD
        return planes_compress(sub_residual(data, base, w, zigzag), w, level)
    f32 = w == 4
    if encoding is BlobEncoding.DECAY_SUB_BYTEPLANE_ZSTD:
        c, k = 1.0, 0
        if f32:
            t_bits, b_bits = _uview(data, 4), _uview(base, 4)
            idx = sample_index(len(t_bits))
            c, k, _ = fit_decay(t_bits[idx], b_bits[idx])
        res = (_chunked_residual(data, decay_chunks(base, c, k), n // 4) if k
               else sub_residual(data, base, w))
        return _DECAY_HEAD.pack(_f32_bits(c), k) + planes_compress(res, w, level)
    if encoding is BlobEncoding.LOWRANK_SUB_BYTEPLANE_ZSTD:
        rows, cols = _matrix(shape, n) if f32 else (0, 0)
        if rows:
            u, v = fit_lowrank(data, base, rows, cols)
        else:
            u, v = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        rank = u.shape[1]
        factors = b""
        res = sub_residual(data, base, w)
        if rank:
            factors = planes_compress(np.concatenate([u.reshape(-1), v.reshape(-1)]), 4, level)
            res = _chunked_residual(data, lowrank_chunks(base, u, v), n // 4)
        head = _LOWRANK_HEAD.pack(rows, cols, rank, len(factors))
        return head + factors + planes_compress(res, w, level)
    raise BundleFormatError(f"not a delta encoding: {int(encoding)}")


def _matrix(shape, n: int) -> tuple[int, int]:
    """(rows, cols) of a 2-D F32 tensor of ``n`` bytes, else (0, 0)."""
    if shape is None or len(shape) != 2:
        return 0, 0
    rows, cols = int(shape[0]), int(shape[1])
    if rows * cols * 4 != n or rows < 4 or cols < 4:
        return 0, 0
    return rows, cols


def sample_index(n: int, runs: int = 32, run: int = 128) -> np.ndarray:
    """Indices of ``runs`` evenly spaced runs of ``run`` consecutive elements (all if few)."""
    if n <= runs * run:
        return np.arange(n)
    starts = np.linspace(0, n - run, runs).astype(np.int64)
    return (starts[:, None] + np.arange(run)[None, :]).reshape(-1)


def decode_delta(encoding: BlobEncoding, stored, expected: int, base, *,
                 what: str = "blob") -> np.ndarray:
    """Decoded bytes (a uint8 array of ``expected`` bytes) of a delta blob."""
    try:
        encoding = BlobEncoding(encoding)
    except ValueError:
        raise BundleFormatError(f"{what}: unknown blob encoding {encoding}") from None
    if base is None or memoryview(base).nbytes != expected:
        raise BundleFormatError(f"{what}: delta base missing or of the wrong size")
    mv = memoryview(stored).cast("B")
    if encoding is BlobEncoding.XOR_BYTEPLANE_ZSTD:
        out = byteplane_decompress(mv, expected, what)
        xw = 8 if expected % 8 == 0 else 1
        np.bitwise_xor(out.view(SUB_WIDTHS[xw]), _uview(base, xw), out=out.view(SUB_WIDTHS[xw]))
        return out
    if encoding is BlobEncoding.SUB_BYTEPLANE_ZSTD:
        return _residual_add(mv, expected, base, what, zigzag=False)
    if encoding is BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD:
        return _residual_add(mv, expected, base, what)
    if encoding is BlobEncoding.DECAY_SUB_BYTEPLANE_ZSTD:
        if len(mv) < _DECAY_HEAD.size:
            raise IntegrityError(f"{what}: decay delta header truncated")
        c_bits, k = _DECAY_HEAD.unpack_from(mv, 0)
        c = float(np.array(c_bits, dtype=np.uint32).view(np.float32))
        if not _decay_ok(c, k) or (k and expected % 4):
            raise IntegrityError(f"{what}: bad decay prediction (c={c!r}, k={k})")
        if not k:
            return _residual_add(mv[_DECAY_HEAD.size:], expected, base, what)
        return _residual_add(mv[_DECAY_HEAD.size:], expected, None, what, need_width=4,
                             chunks=decay_chunks(base, c, k))
    if encoding is BlobEncoding.LOWRANK_SUB_BYTEPLANE_ZSTD:
        if len(mv) < _LOWRANK_HEAD.size:
            raise IntegrityError(f"{what}: low-rank delta header truncated")
        rows, cols, rank, flen = _LOWRANK_HEAD.unpack_from(mv, 0)
        pos = _LOWRANK_HEAD.size
        if rank:
            if (rows * cols * 4 != expected or rank > min(MAX_RANK, rows, cols)
                    or pos + flen > len(mv)):
                raise IntegrityError(f"{what}: bad low-rank header ({rows}x{cols}, rank {rank})")
            fac = byteplane_decompress(mv[pos:pos + flen], (rows + cols) * rank * 4,
                                       f"{what} (factors)").view(np.float32)
            u = fac[:rows * rank].reshape(rows, rank)
            v = fac[rows * rank:].reshape(rank, cols)
            return _residual_add(mv[pos + flen:], expected, None, what, need_width=4,
                                 chunks=lowrank_chunks(base, u, v))
        if flen:
            raise IntegrityError(f"{what}: rank-0 low-rank delta with factors")
        return _residual_add(mv[pos:], expected, base, what)
    raise BundleFormatError(f"{what}: not a delta encoding: {int(encoding)}")


def _residual_add(stored, expected: int, pred, what: str, need_width: int = 0,
                  zigzag: bool = True, chunks=None) -> np.ndarray:
    """Decode a residual byte-plane blob and add it (unzigzagged) to the prediction:
    ``pred`` (bytes-like), or the ``(start, bits)`` F32 ``chunks`` of one."""
    if len(stored) < _PLANE_COUNT.size:
        raise IntegrityError(f"{what}: residual blob too short")
    (width,) = _PLANE_COUNT.unpack_from(stored, 0)
    if width not in SUB_WIDTHS or (need_width and width != need_width):
        raise IntegrityError(f"{what}: residual width {width} not allowed here")
    out = byteplane_decompress(stored, expected, what)
    if chunks is None:
        return add_residual_(out, pred, width, zigzag)
    z = out.view(np.uint32)
    for start, part in chunks:
        add_residual_(z[start:start + len(part)], part, 4)
    return out

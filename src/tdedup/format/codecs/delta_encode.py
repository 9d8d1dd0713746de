"""The delta encoder: the searches that choose a delta's prediction, and the encoding.

:mod:`.delta` defines the stored form and decodes it; this module does the work only an
encoder does: fit AdamW's weight decay ``(c, k)`` (:func:`fit_decay`), find a merged
LoRA's low-rank factors (:func:`fit_lowrank`, :func:`probe_rank`), then encode the
residual against the prediction (:func:`encode_delta`). The planner uses the same fits
on samples to score candidates.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import BundleFormatError
from ..bundle.constants import BlobEncoding
from .delta import (
    DECAY_HEAD,
    LOWRANK_HEAD,
    MAX_DECAY_LOG2,
    MAX_DECAY_STEPS,
    MAX_RANK,
    SUB_WIDTHS,
    chunked_residual,
    decay_chunks,
    decay_ok,
    decay_predict,
    lowrank_chunks,
    planes_compress,
    predictable,
    sub_residual,
    uview,
)

#: Multiplication steps (on 256 sampled elements) the search for ``(c, k)`` may spend.
DECAY_SEARCH_STEPS = 1 << 14


def f32_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.uint32))


def fit_decay(t_bits: np.ndarray, b_bits: np.ndarray) -> tuple[float, int, int]:
    """Find ``(c, k)`` such that ``k`` rounded multiplications by ``c`` turn as many of the
    sampled base elements as possible into the target's; returns ``(c, k, matches)``.

    Decoupled weight decay multiplies every weight by ``c = 1 - lr * wd`` once per step;
    rows without gradient (unseen tokens) are then exactly ``k`` such steps from the base.
    ``k = 1`` also covers a plain rescale. ``(1.0, 0, 0)`` when nothing fits. Cheap: the
    search only runs when a quarter of the sample is a near-exact rescale of the base.
    """
    mask = predictable(b_bits)
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
                if k >= k_lo and decay_ok(float(cf), k):
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
    r, v, _ = probe_rank(diff64(t_bits[probe], b_bits[probe]), max_rank, tol)
    if r == 0:
        return empty
    step = max(1, (1 << 20) // cols)
    u = np.empty((rows, r))
    utd = np.zeros((r, cols))
    for r0 in range(0, rows, step):
        d = diff64(t_bits[r0:r0 + step], b_bits[r0:r0 + step])
        u[r0:r0 + step] = _matmul(d, v.T)
        utd += _matmul(u[r0:r0 + step].T, d)
    try:
        v = np.linalg.solve(_matmul(u.T, u), utd)
    except np.linalg.LinAlgError:
        pass  # keep the probe's basis
    return normal_factors(u.astype(np.float32)), normal_factors(v.astype(np.float32))


def normal_factors(x: np.ndarray) -> np.ndarray:
    """``x`` with every NaN, infinity and subnormal set to zero: a reader refuses such
    factors (spec §4.4), and a zero only leaves more to the residual."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x) | (np.abs(x) < np.finfo(np.float32).tiny)
    x[bad] = 0.0
    return x


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``; small products through einsum's own loops (waking BLAS threads on a busy
    machine costs milliseconds per call), large ones through BLAS."""
    if a.shape[0] * a.shape[1] * b.shape[1] < 1 << 24:
        return np.einsum("ij,jk->ik", a, b)
    return a @ b


def diff64(t_bits: np.ndarray, b_bits: np.ndarray) -> np.ndarray:
    """``t - b`` in float64, zero where either side is outside the predicted range."""
    ok = predictable(t_bits) & predictable(b_bits)
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
    out: list[np.ndarray] = []
    for row in rows:
        q = row.astype(np.float64, copy=True)
        for _ in range(2):
            for b in out:
                q -= np.dot(b, q) * b
        out.append(q / np.linalg.norm(q))
    return np.array(out).reshape(len(out), rows.shape[1])


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
        x = np.bitwise_xor(uview(data, xw), uview(base, xw))
        return planes_compress(x, w, level)
    w = width if width in SUB_WIDTHS and n % width == 0 else 1
    if encoding in (BlobEncoding.SUB_BYTEPLANE_ZSTD, BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD):
        zigzag = encoding is BlobEncoding.ZIGZAG_SUB_BYTEPLANE_ZSTD
        return planes_compress(sub_residual(data, base, w, zigzag), w, level)
    f32 = w == 4
    if encoding is BlobEncoding.DECAY_SUB_BYTEPLANE_ZSTD:
        c, k = 1.0, 0
        if f32:
            t_bits, b_bits = uview(data, 4), uview(base, 4)
            idx = sample_index(len(t_bits))
            c, k, _ = fit_decay(t_bits[idx], b_bits[idx])
        res = (chunked_residual(data, decay_chunks(base, c, k), n // 4) if k
               else sub_residual(data, base, w))
        return planes_compress(res, w, level, prefix=DECAY_HEAD.pack(f32_bits(c), k))
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
            res = chunked_residual(data, lowrank_chunks(base, u, v), n // 4)
        head = LOWRANK_HEAD.pack(rows, cols, rank, len(factors))
        return planes_compress(res, w, level, prefix=head + factors)
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



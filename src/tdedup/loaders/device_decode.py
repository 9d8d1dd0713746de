"""The decoding steps after zstd, as torch operations on whatever device the tensors live.

A loader that places blobs on a GPU only needs to move the *compressed* planes across the
bus when everything after zstd runs on the device: interleaving byte planes, applying a
delta's residual (XOR, wrapping integer addition, unzigzag) and computing the predictions
of the weight-decay and low-rank deltas. This module holds those steps; the same code runs
on CPU tensors, so CI checks it bit for bit against the numpy decoders of
:mod:`tdedup.format.codecs.byteplane` and :mod:`tdedup.format.codecs.delta`
(spec/FORMAT.md §4.3, §4.4 are the reference).

Conventions: blobs are 1-D ``torch.uint8`` tensors of bytes (what the loader keeps); a
function ending in ``_`` works in place and returns its first argument. Wrapping integer
arithmetic uses *signed* views: two's complement addition, XOR and masks give the same bits
as the unsigned arithmetic of the spec, and every torch backend implements signed integers
of 1, 2, 4 and 8 bytes (unsigned ones beyond ``uint8`` are partial). Element-wise passes
run ``chunk`` elements at a time so their temporaries stay bounded.

Bit-exactness of the predictions: the decay multiplies in binary32 by a binary32 ``c``
(a 0-d float32 tensor, so no backend widens it); the low-rank sum multiplies and adds in
binary64 as separate operations (never ``addcmul``/``addmm``, which may fuse or reorder),
and the product of two binary32 values is exact in binary64 anyway. Only elements whose
base exponent is in the spec's range keep their prediction, so subnormal, infinite and
NaN inputs never reach an arithmetic result that is kept (flush-to-zero cannot matter).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

#: Signed integer dtypes by element width in bytes (wrapping arithmetic views).
SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Element widths a SUB residual may have (spec §4.4).
SUB_WIDTHS = frozenset(SIGNED)
#: Elements per step of the element-wise passes (bounds their temporaries).
CHUNK = 1 << 22
#: Biased F32 exponents a prediction touches (spec §4.4; ``codecs.delta.PREDICT_EXP_*``).
PREDICT_EXP_MIN, PREDICT_EXP_MAX = 32, 223
#: A low-rank prediction outside ``[2**-100, 2**100]`` falls back to the base element.
LOWRANK_MIN, LOWRANK_MAX = 2.0 ** -100, 2.0 ** 100
#: float64 elements per block of the low-rank prediction (rows are never split).
LOWRANK_BLOCK = 1 << 22


def _bytes(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    return t


def _view(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (uint8) as signed integers of ``width`` bytes."""
    if width not in SIGNED:
        raise ValueError(f"element width {width} is not one of {sorted(SIGNED)}")
    if len(t) % width:
        raise ValueError(f"{len(t)} bytes are not a whole number of {width}-byte elements")
    if not len(t):  # an empty tensor may have any stride, which view() refuses
        return t.new_empty(0, dtype=SIGNED[width])
    return t.view(SIGNED[width])


# -- byte planes ------------------------------------------------------------------------

def join_planes(planes: torch.Tensor | Sequence[torch.Tensor], *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Interleave byte planes into elements: plane ``j``'s byte ``i`` becomes byte
    ``i * w + j`` of the result (spec §4.3), as ``codecs.byteplane.join_planes`` does.

    ``planes``: a ``(w, n)`` uint8 tensor or ``w`` uint8 tensors of ``n`` bytes each (any
    ``w`` from 1 to 16). ``out``: where to write the ``n * w`` bytes (a uint8 tensor on the
    planes' device, e.g. the blob's final storage); a new tensor when omitted.
    """
    if isinstance(planes, torch.Tensor):
        if planes.dim() != 2:
            raise ValueError("planes: expected a (width, n) tensor")
        stacked = planes
        width, n = planes.shape
        device = planes.device
    else:
        width = len(planes)
        if not width:
            raise ValueError("planes: at least one plane is needed")
        n = len(planes[0])
        if any(len(p) != n for p in planes):
            raise ValueError("planes: every plane must have the same length")
        stacked = None
        device = planes[0].device
    if out is None:
        out = torch.empty(n * width, dtype=torch.uint8, device=device)
    _bytes(out, "out")
    if len(out) != n * width:
        raise ValueError(f"out: {len(out)} bytes, expected {n * width}")
    rows = out.view(n, width)
    if stacked is not None:
        rows.copy_(stacked.t())
    else:
        for j, p in enumerate(planes):
            rows[:, j].copy_(p)
    return out


#: Element widths a rotated byte-plane blob may have (``codecs.byteplane.ROTATED_TYPES``).
ROTATED_WIDTHS = frozenset({2, 4})


def unrotate_(t: torch.Tensor, width: int, rotation: int = 1, *,
              chunk: int = CHUNK) -> torch.Tensor:
    """In place: rotate each ``width``-byte element of the uint8 tensor ``t`` right by
    ``rotation`` bits (``ROTATED_BYTEPLANE_ZSTD``, ``ROTATEDN_BYTEPLANE_ZSTD``, spec
    §4.3.1-4.3.2), as ``codecs.byteplane.unrotate_`` does: one bit at a time, each on
    signed views with the low bit moved to the sign bit by a mask, never by a shift that
    overflows, and the shift right made logical by a mask (writers rotate by 1-4 bits)."""
    if width not in ROTATED_WIDTHS:
        raise ValueError(f"rotated element width {width} is not one of {sorted(ROTATED_WIDTHS)}")
    bits = 8 * width
    if not 1 <= rotation < bits:
        raise ValueError(f"rotation {rotation} is not in 1..{bits - 1}")
    v = _view(_bytes(t, "t"), width)
    top, sign = (1 << (bits - 1)) - 1, -(1 << (bits - 1))
    for i in range(0, len(v), chunk):
        part = v[i:i + chunk]
        for _ in range(rotation):
            low = part.bitwise_and(1).neg_().bitwise_and_(sign)
            part.bitwise_right_shift_(1).bitwise_and_(top).bitwise_or_(low)
    return t


# -- residuals --------------------------------------------------------------------------

def xor_residual_(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """In place: ``out <- out XOR base`` byte by byte (encoding 16); ``out`` holds the
    residual, ``base`` the base's decoded bytes (same length, same device)."""
    _bytes(out, "out")
    _bytes(base, "base")
    if len(out) != len(base):
        raise ValueError(f"residual of {len(out)} bytes, base of {len(base)}")
    w = 8 if len(out) % 8 == 0 and _aligned(out, 8) and _aligned(base, 8) else 1
    _view(out, w).bitwise_xor_(_view(base, w))
    return out


def _aligned(t: torch.Tensor, width: int) -> bool:
    return t.storage_offset() % width == 0


def unzigzag_(z: torch.Tensor, width: int, *, chunk: int = CHUNK) -> torch.Tensor:
    """In place: ``z <- (z >>> 1) XOR (0 - (z AND 1))`` on ``width``-byte elements of the
    uint8 tensor ``z`` (the inverse of the zigzag of spec §4.4)."""
    v = _view(_bytes(z, "z"), width)
    top = (1 << (8 * width - 1)) - 1  # logical shift right = arithmetic shift, then mask
    for i in range(0, len(v), chunk):
        part = v[i:i + chunk]
        sign = part.bitwise_and(1).neg_()
        part.bitwise_right_shift_(1).bitwise_and_(top).bitwise_xor_(sign)
    return z


def add_residual_(out: torch.Tensor, pred: torch.Tensor, width: int, *, zigzag: bool = True,
                  chunk: int = CHUNK) -> torch.Tensor:
    """In place: ``out <- pred + unzigzag(out)`` (``zigzag=False``: ``pred + out``) on
    ``width``-byte integers, wrapping (encodings 17-20). ``out`` holds the residual;
    ``pred`` the base's bytes, or a prediction's (:func:`decay_predict`,
    :func:`lowrank_predict`); both uint8, same length and device. The counterpart of
    ``codecs.delta.add_residual_``."""
    _bytes(pred, "pred")
    if len(out) != len(pred):
        raise ValueError(f"residual of {len(out)} bytes, prediction of {len(pred)}")
    o, p = _view(_bytes(out, "out"), width), _view(pred, width)
    top = (1 << (8 * width - 1)) - 1
    for i in range(0, len(o), chunk):
        part = o[i:i + chunk]
        if zigzag:
            sign = part.bitwise_and(1).neg_()
            part.bitwise_right_shift_(1).bitwise_and_(top).bitwise_xor_(sign)
        part.add_(p[i:i + chunk])
    return out


# -- predictions ------------------------------------------------------------------------

def predictable(bits: torch.Tensor) -> torch.Tensor:
    """Mask of int32 F32 bit patterns whose biased exponent is in
    ``[PREDICT_EXP_MIN, PREDICT_EXP_MAX]`` (the elements a prediction may change)."""
    e = bits.bitwise_right_shift(23).bitwise_and_(0xFF)
    return (e >= PREDICT_EXP_MIN) & (e <= PREDICT_EXP_MAX)


def f32_from_bits(c_bits: int) -> float:
    """The binary32 value with bit pattern ``c_bits`` (a decay header's ``c``)."""
    return struct.unpack("<f", struct.pack("<I", c_bits & 0xFFFFFFFF))[0]


def decay_predict(base: torch.Tensor, c: float, k: int, *,
                  chunk: int = CHUNK) -> torch.Tensor:
    """The decay prediction of encoding 19 (a new uint8 tensor): every F32 element of
    ``base`` (uint8 bytes) multiplied ``k`` times by the binary32 ``c``, rounding after
    each step, where its exponent is predictable; the base element elsewhere. Matches
    ``codecs.delta.decay_predict`` bit for bit. The caller checks ``c``, ``k`` (with
    ``codecs.delta.decay_ok``) before trusting them."""
    bits = _view(_bytes(base, "base"), 4)
    out = base.clone()
    if k == 0 or not len(bits):
        return out
    obits = out.view(torch.int32)
    cf = torch.tensor(c, dtype=torch.float32, device=base.device)
    for i in range(0, len(bits), chunk):
        b = bits[i:i + chunk]
        x = b.view(torch.float32).clone()
        for _ in range(k):
            x.mul_(cf)
        obits[i:i + chunk] = torch.where(predictable(b), x.view(torch.int32), b)
    return out


def lowrank_predict(base: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                    block: int = LOWRANK_BLOCK) -> torch.Tensor:
    """The low-rank prediction of encoding 20 (a new uint8 tensor): for the row-major
    ``rows x cols`` F32 matrix in ``base`` (uint8 bytes), ``a = float64(base)`` then
    ``a = a + float64(u[:, t]) * float64(v[t, :])`` for ``t = 0 .. rank - 1`` in order,
    kept (rounded to binary32) where the base is predictable and ``2**-100 <= |a| <=
    2**100``; the base element elsewhere. ``u``: ``(rows, rank)``, ``v``: ``(rank, cols)``,
    float32 tensors on ``base``'s device. Matches ``codecs.delta.lowrank_predict``."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(f"factors of shapes {tuple(u.shape)} and {tuple(v.shape)} do not "
                         "multiply")
    rows, rank = u.shape
    cols = v.shape[1]
    bits = _view(_bytes(base, "base"), 4)
    if len(bits) != rows * cols:
        raise ValueError(f"base of {len(bits)} elements is not {rows} x {cols}")
    out = base.clone()
    if rank == 0 or not len(bits):
        return out
    obits = out.view(torch.int32).view(rows, cols)
    bits = bits.view(rows, cols)
    u64 = u.to(torch.float64)
    v64 = v.to(torch.float64)
    step = max(1, block // max(cols, 1))
    for r0 in range(0, rows, step):
        b = bits[r0:r0 + step]
        acc = b.view(torch.float32).to(torch.float64)
        ub = u64[r0:r0 + step]
        for t in range(rank):
            acc.add_(torch.mul(ub[:, t, None], v64[None, t, :]))  # two roundings, no FMA
        mag = acc.abs()
        ok = predictable(b) & (mag >= LOWRANK_MIN) & (mag <= LOWRANK_MAX)
        obits[r0:r0 + step] = torch.where(ok, acc.to(torch.float32).view(torch.int32), b)
    return out


def combine_(out: torch.Tensor, base: torch.Tensor, op: str, width: int) -> torch.Tensor:
    """Finish a residual in place by the name ``blob_stream.DELTA_OPS`` gives its
    encoding: ``"xor"``, ``"add"`` or ``"zigzag-add"`` (``base``: the base's bytes, or a
    prediction's for the ``PREDICTED`` encodings, which are ``"zigzag-add"`` with width 4).
    """
    if op == "xor":
        return xor_residual_(out, base)
    if op in ("add", "zigzag-add"):
        return add_residual_(out, base, width, zigzag=op == "zigzag-add")
    raise ValueError(f"unknown delta operation {op!r}")

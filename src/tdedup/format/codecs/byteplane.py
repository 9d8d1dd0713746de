"""Byte-plane blobs: element ``i``'s byte ``j`` goes to plane ``j``, one zstd frame each.

Trained float weights have near-random low bytes and skewed high ones (sign and
exponent); split by byte position, each plane compresses to about its own entropy.
Stored form (spec §4.3): u32 width, width x u64 frame lengths, then the frames.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

from ...errors import IntegrityError
from ..bundle.constants import MAX_PLANE_WIDTH
from .zstd import DEFAULT_LEVEL, compress_plane, zstd_decompress

#: The stored form's table: the width, then one frame length per plane.
PLANE_COUNT = struct.Struct("<I")
PLANE_LEN = struct.Struct("<Q")


def _plane_part(what: str | None, j: int) -> str:
    return f"{what}, plane {j}" if what else f"plane {j}"


def split_planes(data, width: int) -> list[np.ndarray]:
    """Element ``i``'s byte ``j`` goes to plane ``j`` (so an F32's exponent byte is plane 3)."""
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    return [np.ascontiguousarray(a[:, j]) for j in range(width)]


def join_planes(planes: list, n: int, width: int) -> np.ndarray:
    """The ``n`` bytes whose planes these are (a fresh uint8 array)."""
    out = np.empty(n, dtype=np.uint8)
    return interleave_into(out, [np.frombuffer(p, dtype=np.uint8) for p in planes])


#: Unsigned integers an element of each width is assembled in (see interleave_into).
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Elements assembled at a time: the word array stays in L2 across the shifts.
INTERLEAVE_CHUNK = 1 << 16


def interleave_into(out: np.ndarray, planes: list[np.ndarray]) -> np.ndarray:
    """``out`` (uint8, ``len(planes)`` bytes per element) <- element ``i``'s byte ``j``
    from ``planes[j][i]``: the inverse of :func:`split_planes`; returns ``out``.

    On a little-endian host an element is assembled as an integer, top plane first,
    shifted up a byte per plane: 1.5x (4 bytes) to 3.5x (2 bytes) faster than numpy's
    strided byte stores (measured on 128K elements), which remain the general case."""
    width = len(planes)
    word = _WORDS.get(width)
    if word is None or sys.byteorder != "little":
        rows = out.reshape(-1, width)
        for j, p in enumerate(planes):
            rows[:, j] = p
        return out
    words = out.view(word)
    for i in range(0, len(words), INTERLEAVE_CHUNK):
        w = words[i:i + INTERLEAVE_CHUNK]
        np.copyto(w, planes[-1][i:i + INTERLEAVE_CHUNK])
        for p in planes[-2::-1]:
            np.left_shift(w, 8, out=w)
            np.bitwise_or(w, p[i:i + INTERLEAVE_CHUNK], out=w)
    return out


def byteplane_compress(data, width: int, level: int = DEFAULT_LEVEL, *,
                       prefix: bytes = b"") -> bytes:
    """Stored form: u32 width, width x u64 frame lengths, then one zstd frame per plane;
    after ``prefix`` (an encoding's own header). Joined once: each copy of a blob's
    stored bytes holds the GIL, which the other encoding threads wait on."""
    frames = [compress_plane(p, level) for p in split_planes(data, width)]
    return b"".join([prefix, PLANE_COUNT.pack(width), *(PLANE_LEN.pack(len(f)) for f in frames),
                     *frames])


#: Element widths the rotated encodings accept, and their unsigned integer types.
ROTATED_TYPES = {2: np.uint16, 4: np.uint32}
#: Elements rotated per step (encoding, and back when decoding): the scratch stays in L2.
ROTATE_CHUNK = 1 << 15
#: ``ROTATEDN_BYTEPLANE_ZSTD``'s prefix: the rotation, before the byte-plane stored form.
ROTATION = struct.Struct("<I")


def rotate_left(data, width: int, rotation: int) -> np.ndarray:
    """Each ``width``-byte element of ``data`` rotated left by ``rotation`` bits (a fresh
    uint8 array): a copy rotated right by the rest of the element, in place and in
    cache-sized pieces. Three full-size temporaries, as ``(a << r) | (a >> s)`` made,
    cost page faults that serialize the encoding threads (36 % slower alone, 1.2x on two
    threads against 1.6x)."""
    out = np.frombuffer(data, dtype=np.uint8).copy()
    unrotate_(out, width, 8 * width - rotation)
    return out


def rotated_compress(data, width: int, level: int = DEFAULT_LEVEL, rotation: int = 1, *,
                     prefix: bytes = b"") -> bytes:
    """The byte-plane stored form of each element rotated left by ``rotation`` bits: by one
    it is ``ROTATED_BYTEPLANE_ZSTD`` (spec §4.3.1), by any other amount the body of
    ``ROTATEDN_BYTEPLANE_ZSTD`` (§4.3.2, after its rotation prefix).

    By one bit the sign leaves the top byte, so an F32's or BF16's 8 exponent bits fill it
    (~0.3 % (F32) to ~1 % (BF16) of a dense model). By more, the top plane also takes the
    mantissa's leading bits, whose skew a raw low plane wasted, and the exponent's top
    bits, constant in trained weights, go to the lowest plane, which then compresses:
    by three, MiniLM BF16 is 0.6 % and F32 0.3 % smaller than by one (bench/RESULTS.md).
    Which rotation wins depends on the tensor (F16 keeps one), see ``best_rotation``."""
    return byteplane_compress(rotate_left(data, width, rotation), width, level, prefix=prefix)


def rotatedn_compress(data, width: int, level: int, rotation: int) -> bytes:
    """``ROTATEDN_BYTEPLANE_ZSTD``: the rotation, then :func:`rotated_compress`'s form."""
    return rotated_compress(data, width, level, rotation, prefix=ROTATION.pack(rotation))


def rotated_decompress(stored, expected: int, what: str | None = None,
                       rotation: int = 1) -> np.ndarray:
    """Decode the byte-plane stored form of elements rotated left by ``rotation`` bits (a
    fresh uint8 array, rotated back in place)."""
    mv = memoryview(stored)
    width, _ = byteplane_frames(mv, expected, what)
    check_rotation(width, rotation, what)
    out = byteplane_decompress(mv, expected, what)
    unrotate_(out, width, rotation)
    return out


def rotatedn_decompress(stored, expected: int, what: str | None = None) -> np.ndarray:
    """Decode a ``ROTATEDN_BYTEPLANE_ZSTD`` blob (a fresh uint8 array)."""
    mv = memoryview(stored)
    return rotated_decompress(mv[ROTATION.size:], expected, what, rotation_prefix(mv, what))


def rotation_prefix(stored, what: str | None = None) -> int:
    """The rotation a ``ROTATEDN_BYTEPLANE_ZSTD`` blob starts with (its range is checked
    against the width by ``check_rotation``)."""
    if len(stored) < ROTATION.size:
        raise IntegrityError("rotated byte-plane blob too short", part=what)
    return ROTATION.unpack_from(stored, 0)[0]


def check_rotation(width: int, rotation: int, what: str | None = None) -> None:
    if width not in ROTATED_TYPES:
        raise IntegrityError(f"bad rotated byte-plane width {width}", part=what)
    if not 1 <= rotation < 8 * width:
        raise IntegrityError(f"bad rotation {rotation} for {width}-byte elements", part=what)


def unrotate_(out: np.ndarray, width: int, rotation: int = 1) -> None:
    """Rotate each ``width``-byte element of the uint8 array ``out`` right by ``rotation``
    bits, in place (the inverse of the writer's rotation; a streaming reader calls it per
    chunk)."""
    a = out.view(ROTATED_TYPES[width])
    left, right = a.dtype.type(8 * width - rotation), a.dtype.type(rotation)
    low = np.empty(min(len(a), ROTATE_CHUNK), dtype=a.dtype)
    for i in range(0, len(a), ROTATE_CHUNK):  # in cache-sized pieces, in place
        part = a[i:i + ROTATE_CHUNK]
        t = low[:len(part)]
        np.left_shift(part, left, out=t)
        part >>= right
        part |= t


#: Rotations ``best_rotation`` tries (plain planes never beat all four on F32, BF16 or
#: F16; ``choose_encoding`` still tries them in full on small blobs).
ROTATIONS = (1, 2, 3, 4)
#: Sampled bytes per candidate rotation: 16 runs of 8 KiB spread over the tensor (on
#: MiniLM within 0.01 % of 32 runs, at half the cost: ~0.2 ms per candidate).
SAMPLE_RUNS, SAMPLE_RUN_BYTES = 16, 8 << 10


def best_rotation(data, width: int) -> int:
    """The rotation whose byte planes compress smallest at the fast settings,
    on evenly spread runs of elements (all of a small tensor). The candidates differ by
    up to 1.5 % on trained weights, and no one rotation wins for every dtype: three for
    MiniLM BF16 and F32, one for F16 (its exponent has 5 bits)."""
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    run = max(1, SAMPLE_RUN_BYTES // width)
    if len(a) > SAMPLE_RUNS * run:
        step = len(a) // SAMPLE_RUNS
        a = np.concatenate([a[i * step:i * step + run] for i in range(SAMPLE_RUNS)])
    sample = a.reshape(-1)
    sizes = {r: sum(len(compress_plane(p, 1)) for p in split_planes(
        rotate_left(sample, width, r), width)) for r in ROTATIONS}
    return min(sizes, key=sizes.__getitem__)


def byteplane_frames(stored, expected: int, what: str | None = None) -> tuple[int, list[slice]]:
    """The width of a byte-plane blob and where each plane's frame lies in ``stored``
    (only the table at its start is read)."""
    mv = memoryview(stored)
    if len(mv) < PLANE_COUNT.size:
        raise IntegrityError("byte-plane blob too short", part=what)
    (width,) = PLANE_COUNT.unpack_from(mv, 0)
    if not 1 <= width <= MAX_PLANE_WIDTH or expected % width:
        raise IntegrityError(f"bad byte-plane width {width} for {expected} bytes", part=what)
    pos = PLANE_COUNT.size + width * PLANE_LEN.size
    if len(mv) < pos:
        raise IntegrityError("byte-plane table truncated", part=what)
    lengths = [PLANE_LEN.unpack_from(mv, PLANE_COUNT.size + j * PLANE_LEN.size)[0]
               for j in range(width)]
    if pos + sum(lengths) != len(mv):
        raise IntegrityError("byte-plane frames do not add up to the stored length", part=what)
    frames = []
    for n in lengths:
        frames.append(slice(pos, pos + n))
        pos += n
    return width, frames


def byteplane_decompress(stored, expected: int, what: str | None = None) -> np.ndarray:
    mv = memoryview(stored)
    width, frames = byteplane_frames(mv, expected, what)
    planes = [zstd_decompress(mv[f], expected // width, _plane_part(what, j))
              for j, f in enumerate(frames)]
    return join_planes(planes, expected, width)



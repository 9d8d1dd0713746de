"""The loader's streaming delta reader gives the codec's bytes, whatever the residual's
density: empty, sparse (applied only where non-zero) or dense (element-wise passes), and
whatever piece and host-chunk sizes split it.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdedup.format.bundle.constants import BlobEncoding as E
from tdedup.format.bundle.manifest import BlobRecord
from tdedup.format.codecs import delta_encode
from tdedup.format.codecs.delta import decode_delta
from tdedup.loaders import stream

DELTAS = [e for e in E if e.is_delta and not e.any_length_base]


def read_streamed(stored: bytes, enc: E, base: bytes, step: int) -> bytes:
    """Decode ``stored`` with the loader's DeltaReader, ``step`` bytes per read."""
    mm = mmap.mmap(-1, max(1, len(stored)))
    mm[:len(stored)] = stored
    view = memoryview(mm)
    rec = BlobRecord("0" * 64, enc, 0, len(stored), len(base), "0" * 64, "1" * 64)
    base_arr = np.frombuffer(base, np.uint8)
    reader = stream.DeltaReader(mm, view, rec, "test", lambda a, z: base_arr[a:z],
                                release=False)
    out = np.empty(len(base), np.uint8)
    step = max(reader.unit, step // reader.unit * reader.unit)
    for i in range(0, len(out), step):
        reader.readinto(out[i:i + step])
    reader.finish()
    del reader, view
    return out.tobytes()


def family_pair(enc: E, rows: int, changed: int, seed: int) -> tuple[bytes, bytes]:
    """A base and a target the encoding is made for, ``changed`` elements off it."""
    rng = np.random.default_rng(seed)
    cols = 48
    base = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    target = base.copy()
    if enc is E.DECAY_SUB_BYTEPLANE_ZSTD:
        c = np.float32(1 - 2.0 ** -21)
        for _ in range(9):
            target = (target * c).astype(np.float32)
    elif enc is E.LOWRANK_SUB_BYTEPLANE_ZSTD:
        target = (base.astype(np.float64) + (rng.standard_normal((rows, 2)) * 0.01)
                  @ (rng.standard_normal((2, cols)) * 0.01)).astype(np.float32)
    flat = target.reshape(-1)
    flat[rng.choice(flat.size, size=min(changed, flat.size), replace=False)] += np.float32(1e-2)
    return target.tobytes(), base.tobytes()


def check(enc: E, rows: int, changed: int, seed: int, step: int) -> None:
    data, bb = family_pair(enc, rows, changed, seed)
    stored = delta_encode.encode_delta(enc, data, bb, width=4, shape=(rows, 48))
    assert decode_delta(enc, stored, len(bb), bb).tobytes() == data
    assert read_streamed(stored, enc, bb, step) == data


@settings(max_examples=40, deadline=None)
@given(enc=st.sampled_from(DELTAS), changed=st.sampled_from([0, 1, 7, 200, 10_000]),
       seed=st.integers(0, 2**32 - 1), step=st.sampled_from([1 << 20, 4 * 48 * 5]))
def test_streamed_deltas_equal_the_codec(enc, changed, seed, step):
    check(enc, 256, changed, seed, step)


@pytest.mark.parametrize("enc", DELTAS, ids=[e.name for e in DELTAS])
def test_pieces_of_a_host_chunk_each_choose(enc):
    """Over PLANE_CHUNK elements in one read: one piece sparse, the next dense."""
    rows = stream.PLANE_CHUNK // 48 + 64
    data, bb = family_pair(enc, rows, 0, 5)
    t = np.frombuffer(data, np.float32).copy()
    t[-60 * 48:] += np.float32(1e-2)  # the last rows: every element changed
    data = t.tobytes()
    stored = delta_encode.encode_delta(enc, data, bb, width=4, shape=(rows, 48))
    assert read_streamed(stored, enc, bb, 1 << 22) == data


@pytest.mark.parametrize("enc", [E.XOR_BYTEPLANE_ZSTD, E.SUB_BYTEPLANE_ZSTD,
                                 E.ZIGZAG_SUB_BYTEPLANE_ZSTD])
@pytest.mark.parametrize("width", [1, 2, 8])
def test_sparse_residuals_of_every_width(enc, width):
    rng = np.random.default_rng(width)
    base = rng.integers(0, 256, 8 * 4096, dtype=np.uint8)
    target = base.copy()
    target[rng.choice(target.size, 40, replace=False)] ^= 0x5A
    stored = delta_encode.encode_delta(enc, target.tobytes(), base.tobytes(), width=width)
    assert read_streamed(stored, enc, base.tobytes(), 1 << 20) == target.tobytes()

"""Delta encodings (16-20): byte-exact round trips under random drift patterns, exact
agreement of the predictions with the spec's formulas, refusal of damaged input with
tdedup errors only, and the sizes the predictions reach on real fine-tunes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdedup.errors import BundleFormatError, TdedupError
from tdedup.format import codecs
from tdedup.format.codecs import byteplane
from tdedup.format.bundle.constants import BlobEncoding as E
from tdedup.format.codecs.delta import (MAX_DECAY_STEPS, decay_predict, decode_delta,
                                        lowrank_predict)
from tdedup.format.codecs.delta_encode import encode_delta, fit_decay, fit_lowrank, probe_rank

DELTAS = [e for e in E if e.is_delta and not e.any_length_base]  # 24, 25: test_derived
PREDICTED = (E.DECAY_SUB_BYTEPLANE_ZSTD, E.LOWRANK_SUB_BYTEPLANE_ZSTD)
WIDTH = {"F32": 4, "F16": 2, "BF16": 2}


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the bytes of ``dtype`` (BF16 by truncating F32)."""
    x = x.astype(np.float32)
    if dtype == "F32":
        return x.view(np.uint8)
    if dtype == "F16":
        with np.errstate(all="ignore"):
            return x.astype(np.float16).view(np.uint8)
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def flat(x):
    """Bytes-like as the writer hands them over: 1-D (numpy arrays as uint8 views)."""
    return np.ascontiguousarray(x).view(np.uint8).reshape(-1) if isinstance(x, np.ndarray) else x


def roundtrip(enc, data, base, width, shape=None):
    data, base = flat(data), flat(base)
    stored = codecs.encode(enc, data, width=width, base=base) if shape is None else \
        encode_delta(enc, data, base, width=width, shape=shape)
    out = codecs.decode(enc, stored, memoryview(data).nbytes, base=base)
    assert np.array_equal(np.frombuffer(out, np.uint8), np.frombuffer(data, np.uint8)), enc
    return stored


# -- drift patterns ----------------------------------------------------------------------

def drift(kind: str, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float32 target drifted from float32 ``base`` in one of several ways."""
    n = base.size
    t = base.copy()
    if kind == "sparse":
        idx = rng.choice(n, size=max(1, n // 20), replace=False)
        t[idx] += rng.standard_normal(len(idx)).astype(np.float32) * 0.01
    elif kind == "lowbits":
        bits = t.view(np.uint32)
        bits ^= rng.integers(0, 1 << 12, n, dtype=np.uint32)
    elif kind == "signs":
        idx = rng.choice(n, size=max(1, n // 10), replace=False)
        t[idx] = -t[idx]
    elif kind == "whole":
        t = rng.standard_normal(n).astype(np.float32)
    elif kind == "decay":
        c = np.float32(1 - rng.integers(1, 200) * 2.0 ** -24)
        for _ in range(int(rng.integers(1, 30))):
            t = (t * c).astype(np.float32)
        t[: n // 8] += np.float32(1e-3)
    elif kind == "adam":
        t += (rng.standard_normal(n) * 1e-4).astype(np.float32)
    return t


def special(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sprinkle NaNs, infinities, zeros of both signs and subnormals."""
    x = x.copy()
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 3e38],
                    dtype=np.float32)
    idx = rng.choice(x.size, size=min(x.size, 8), replace=False)
    x[idx] = vals[: len(idx)]
    return x


KINDS = ["sparse", "lowbits", "signs", "whole", "decay", "adam"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(list(WIDTH)),
       rows=st.integers(1, 40), cols=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       specials=st.booleans())
def test_roundtrip_drift_patterns(kind, dtype, rows, cols, seed, specials):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(rows * cols) * 0.05).astype(np.float32)
    target = drift(kind, base, rng)
    if specials:
        base, target = special(base, rng), special(target, rng)
    b, t = as_dtype(base, dtype), as_dtype(target, dtype)
    for enc in DELTAS:
        roundtrip(enc, t.tobytes(), b.tobytes(), WIDTH[dtype])
        roundtrip(enc, t, b, WIDTH[dtype], shape=(rows, cols))


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**32 - 1),
       width=st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_roundtrip_any_bytes_any_width(data, seed, width):
    """Arbitrary byte strings (lengths need not divide the width) round-trip exactly."""
    base = np.random.default_rng(seed).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    for enc in DELTAS:
        roundtrip(enc, data, base, width)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(8, 48), cols=st.integers(8, 48), rank=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_lowrank_finds_a_merged_low_rank_update(rows, cols, rank, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    u = rng.standard_normal((rows, rank)).astype(np.float32) * 0.01
    v = rng.standard_normal((rank, cols)).astype(np.float32)
    merged = (w + u @ v).astype(np.float32)
    found_u, found_v = fit_lowrank(merged.tobytes(), w.tobytes(), rows, cols)
    if min(rows, cols) // 4 >= rank:
        assert found_u.shape == (rows, rank) and found_v.shape == (rank, cols)
    low = roundtrip(E.LOWRANK_SUB_BYTEPLANE_ZSTD, merged, w, 4, shape=(rows, cols))
    plain = roundtrip(E.ZIGZAG_SUB_BYTEPLANE_ZSTD, merged, w, 4, shape=(rows, cols))
    if found_u.shape[1] and rows * cols >= 1024:
        assert len(low) < len(plain)


def test_probe_rank():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 100))
    r, v, _ = probe_rank(d, 16)
    assert r == 3 and np.allclose(v @ v.T, np.eye(3), atol=1e-12)
    assert probe_rank(rng.standard_normal((40, 100)), 16)[0] == 0
    assert probe_rank(np.zeros((4, 4)), 2)[0] == 0


# -- the predictions follow the spec's formulas exactly -----------------------------------

def test_decay_prediction_matches_the_spec():
    rng = np.random.default_rng(1)
    base = np.concatenate([(rng.standard_normal(64) * 0.05).astype(np.float32),
                           np.array([0.0, -0.0, 1e-40, np.inf, np.nan, 2.0 ** -100,
                                     2.0 ** 100], np.float32)])
    c, k = np.float32(1 - 7 * 2.0 ** -24), 13
    got = decay_predict(base.tobytes(), float(c), k)
    for b, g in zip(base, got):
        e = (int(b.view(np.uint32)) >> 23) & 0xFF
        want = b
        if 32 <= e <= 223:
            for _ in range(k):
                want = np.float32(want * c)  # binary32 multiply, rounded each step
        assert int(g) == int(np.float32(want).view(np.uint32))


def test_lowrank_prediction_matches_the_spec():
    rng = np.random.default_rng(2)
    rows, cols, rank = 5, 7, 3
    base = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    base[0, 0], base[1, 1] = 1e-40, np.nan
    u = rng.standard_normal((rows, rank)).astype(np.float32)
    v = rng.standard_normal((rank, cols)).astype(np.float32)
    got = lowrank_predict(base.tobytes(), u, v).reshape(rows, cols)
    for i in range(rows):
        for j in range(cols):
            bits = int(base[i, j].view(np.uint32))
            a = float(base[i, j])
            for t in range(rank):
                a = a + float(u[i, t]) * float(v[t, j])  # Python floats are binary64
            want = bits
            if 32 <= (bits >> 23) & 0xFF <= 223 and 2.0 ** -100 <= abs(a) <= 2.0 ** 100:
                want = int(np.float32(a).view(np.uint32))
            assert int(got[i, j]) == want


def test_fit_decay_recovers_steps_and_factor():
    rng = np.random.default_rng(3)
    base = (rng.standard_normal(4096) * 0.05).astype(np.float32)
    c = np.float32(1 - 8 * 2.0 ** -24)
    t = base.copy()
    for _ in range(40):
        t = (t * c).astype(np.float32)
    fc, k, matches = fit_decay(t.view(np.uint32), base.view(np.uint32))
    assert matches == 4096 and k * fc > 0
    assert np.array_equal(decay_predict(base.tobytes(), fc, k), t.view(np.uint32))
    # Unrelated tensors: no decay.
    assert fit_decay(rng.standard_normal(4096).astype(np.float32).view(np.uint32),
                     base.view(np.uint32))[1] == 0


# -- damaged input ------------------------------------------------------------------------

def _valid_blobs():
    rng = np.random.default_rng(4)
    base = (rng.standard_normal(256) * 0.05).astype(np.float32)
    u = rng.standard_normal((16, 2)).astype(np.float32) * 0.01
    v = rng.standard_normal((2, 16)).astype(np.float32)
    target = (base.reshape(16, 16) + u @ v).astype(np.float32).reshape(-1)
    decayed = base.copy()
    for _ in range(5):
        decayed = (decayed * np.float32(1 - 2.0 ** -20)).astype(np.float32)
    out = []
    for enc in DELTAS:
        t = decayed if enc is E.DECAY_SUB_BYTEPLANE_ZSTD else target
        out.append((enc, encode_delta(enc, t, base, width=4, shape=(16, 16)), base))
    return out


BLOBS = _valid_blobs()


@pytest.mark.parametrize("enc,stored,base", BLOBS, ids=[e.name for e, _, _ in BLOBS])
def test_every_truncation_is_refused(enc, stored, base):
    for n in range(len(stored)):
        with pytest.raises(TdedupError):
            decode_delta(enc, stored[:n], base.nbytes, base)


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, len(BLOBS) - 1), flips=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_damaged_blobs_raise_tdedup_errors_only(which, flips):
    enc, stored, base = BLOBS[which]
    buf = bytearray(stored)
    for pos, x in flips:
        buf[pos % len(buf)] ^= x
    try:
        out = decode_delta(enc, bytes(buf), base.nbytes, base)
    except TdedupError:
        return
    assert len(out) == base.nbytes  # undetected damage is the blob hash's job


@pytest.mark.parametrize("head", [
    struct.pack("<II", 0x7FC00000, 3),                       # c is NaN
    struct.pack("<II", int(np.float32(0.5).view(np.uint32)), 17),   # 0.5**17: too far
    struct.pack("<II", int(np.float32(0.99).view(np.uint32)), MAX_DECAY_STEPS + 1),
    struct.pack("<II", int(np.float32(-0.99).view(np.uint32)), 2),
])
def test_bad_decay_headers_are_refused(head):
    base = np.ones(16, np.float32)
    rest = BLOBS[DELTAS.index(E.ZIGZAG_SUB_BYTEPLANE_ZSTD)][1]
    with pytest.raises(TdedupError, match="decay"):
        decode_delta(E.DECAY_SUB_BYTEPLANE_ZSTD, head + rest, 64, base)


@pytest.mark.parametrize("rows,cols,rank,flen", [
    (16, 16, 17, 0), (8, 8, 2, 10), (16, 16, 2, 10**9), (16, 16, 300, 40), (16, 16, 0, 5)])
def test_bad_lowrank_headers_are_refused(rows, cols, rank, flen):
    base = np.ones(256, np.float32)
    head = struct.pack("<IIII", rows, cols, rank, flen)
    with pytest.raises(TdedupError):
        decode_delta(E.LOWRANK_SUB_BYTEPLANE_ZSTD, head + b"\0" * 64, 1024, base)


def test_residual_bomb_is_refused():
    """A residual plane whose frame declares more bytes than the blob's size."""
    from tdedup.errors import DecompressionBombError
    base = np.zeros(64, np.uint8)
    bomb = byteplane.byteplane_compress(np.zeros(4096, np.uint8), 1)
    for enc in (E.XOR_BYTEPLANE_ZSTD, E.ZIGZAG_SUB_BYTEPLANE_ZSTD):
        with pytest.raises(DecompressionBombError):
            decode_delta(enc, bomb, 64, base)


def test_wrong_base_and_unknown_encoding():
    enc, stored, base = BLOBS[0]
    with pytest.raises(BundleFormatError):
        decode_delta(enc, stored, base.nbytes, base[:-1])
    with pytest.raises(BundleFormatError):
        decode_delta(enc, stored, base.nbytes, None)
    with pytest.raises(BundleFormatError):
        decode_delta(31, stored, base.nbytes, base)
    with pytest.raises(BundleFormatError):
        encode_delta(E.BYTEPLANE_ZSTD, base, base, width=4)


def test_residual_width_must_suit_the_encoding():
    base = np.zeros(48, np.uint8)
    three = byteplane.byteplane_compress(np.zeros(48, np.uint8), 3)
    with pytest.raises(TdedupError, match="width"):
        decode_delta(E.ZIGZAG_SUB_BYTEPLANE_ZSTD, three, 48, base)
    # Width 3 is a valid XOR residual.
    assert not decode_delta(E.XOR_BYTEPLANE_ZSTD, three, 48, base).any()
    two = byteplane.byteplane_compress(np.zeros(48, np.uint8), 2)
    head = struct.pack("<II", int(np.float32(0.999).view(np.uint32)), 2)
    with pytest.raises(TdedupError, match="width"):
        decode_delta(E.DECAY_SUB_BYTEPLANE_ZSTD, head + two, 48, base)


# -- real fine-tunes ----------------------------------------------------------------------

def test_predictions_on_real_gradient_steps():
    """AdamW's decay of unseen embedding rows and a merged LoRA, both made by torch."""
    pytest.importorskip("torch")
    from helpers import delta_helpers as dh
    import torch

    m = dh._model(0)
    dh.train(m, 3, seed=0)
    base = dh.state(m)
    dh.train(m, 12, seed=1)
    ft = dh.state(m)
    b, t = base["embed.weight"], ft["embed.weight"]
    assert not np.array_equal(b, t)
    decay = roundtrip(E.DECAY_SUB_BYTEPLANE_ZSTD, t, b, 4)
    plain = roundtrip(E.ZIGZAG_SUB_BYTEPLANE_ZSTD, t, b, 4)
    assert len(decay) < 0.5 * len(plain)
    del torch

    merged = dh.merge_lora(base, "up.weight", rank=4, seed=2)["up.weight"]
    w = base["up.weight"]
    low = roundtrip(E.LOWRANK_SUB_BYTEPLANE_ZSTD, merged, w, 4, shape=w.shape)
    plain = roundtrip(E.ZIGZAG_SUB_BYTEPLANE_ZSTD, merged, w, 4, shape=w.shape)
    assert len(low) < 0.7 * len(plain)


@pytest.mark.corpus
def test_corpus_minilm_predictions(corpus):
    """ft-full's word embeddings are base after 40 decay steps but for the rows of the
    tokens its batches saw; ft-lora-merged's query matrices are base plus a rank-8 product."""
    from safetensors.numpy import load_file

    base = load_file(corpus / "minilm/base/model.safetensors")
    full = load_file(corpus / "minilm/ft-full/model.safetensors")
    lora = load_file(corpus / "minilm/ft-lora-merged/model.safetensors")
    name = "embeddings.word_embeddings.weight"
    b, t = base[name], full[name]
    stored = roundtrip(E.DECAY_SUB_BYTEPLANE_ZSTD, t, b, 4)
    c_bits, k = struct.unpack_from("<II", stored)
    assert k == 40 and len(stored) < 0.002 * b.nbytes
    name = "encoder.layer.1.attention.self.query.weight"
    b, t = base[name], lora[name]
    stored = roundtrip(E.LOWRANK_SUB_BYTEPLANE_ZSTD, t, b, 4, shape=b.shape)
    assert struct.unpack_from("<IIII", stored)[2] == 8
    assert len(stored) < 0.15 * len(encode_delta(E.ZIGZAG_SUB_BYTEPLANE_ZSTD, t, b, width=4))

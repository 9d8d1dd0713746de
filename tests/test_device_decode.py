"""The torch decoders of ``loaders.device_decode`` give the same bytes as the numpy
decoders of ``format.codecs`` (byteplane, delta), over hypothesis-generated inputs
(widths, sizes including 0, NaN/inf/subnormal/zero float bases, chunk boundaries), and a
whole delta blob decoded the device way (zstd on the host, the rest in torch) equals its
original. On CPU tensors here; on CUDA too when one is present."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from tdedup.format.bundle.constants import BlobEncoding as E  # noqa: E402
from tdedup.format.codecs import byteplane, delta, delta_encode, zstd  # noqa: E402
from tdedup.loaders import device_decode as dd  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SPECIAL_BITS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                0x00000001, 0x807FFFFF, 0x00800000, 0x0F800000, 0x10000000, 0x6F800000,
                0x6F7FFFFF, 0x70000000, 0x3F800000, 0xBF800001]


def t(a, device="cpu") -> torch.Tensor:
    """A uint8 torch tensor of the bytes of ``a``."""
    return torch.from_numpy(np.frombuffer(bytes(memoryview(a).cast("B")), np.uint8).copy()
                            ).to(device)


def b(x: torch.Tensor) -> bytes:
    return x.cpu().numpy().tobytes()


def f32_bits():
    """F32 bit patterns: ordinary values, specials (NaN, inf, zeros, subnormals, the edges
    of the predicted exponent range) and arbitrary patterns."""
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
        .map(lambda f: int(np.array(f, np.float32).view(np.uint32))),
        st.sampled_from(SPECIAL_BITS),
        st.integers(0, 2 ** 32 - 1))


def bits_array(values) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


chunks = st.sampled_from([dd.CHUNK, 1, 3, 64])
devices = st.sampled_from(DEVICES)


# -- byte planes ------------------------------------------------------------------------

@FAST
@given(width=st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(1, 16)),
       n=st.integers(0, 300), data=st.data(), stacked=st.booleans(), device=devices)
def test_join_planes_matches_numpy(width, n, data, stacked, device):
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    planes = byteplane.split_planes(raw, width)
    want = byteplane.join_planes([p.tobytes() for p in planes], n * width, width)
    tp = [t(p, device) for p in planes]
    got = dd.join_planes(torch.stack(tp) if stacked else tp)
    assert b(got) == want.tobytes() == raw
    out = torch.full((n * width,), 7, dtype=torch.uint8, device=device)
    assert dd.join_planes(tp, out=out) is out and b(out) == raw


def test_join_planes_refuses_bad_shapes():
    with pytest.raises(ValueError):
        dd.join_planes([torch.zeros(3, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)])
    with pytest.raises(ValueError):
        dd.join_planes(torch.zeros(2, 3, dtype=torch.uint8), out=torch.empty(5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dd.join_planes([])


@FAST
@given(width=st.sampled_from([2, 4]), n=st.integers(0, 300), data=st.data(), chunk=chunks,
       device=devices)
def test_unrotate_matches_numpy(width, n, data, chunk, device):
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    rotation = data.draw(st.integers(1, 8 * width - 1))
    want = np.frombuffer(raw, np.uint8).copy()
    byteplane.unrotate_(want, width, rotation)
    got = t(raw, device)
    assert dd.unrotate_(got, width, rotation, chunk=chunk) is got and b(got) == want.tobytes()


@FAST
@given(width=st.sampled_from([2, 4]), n=st.integers(0, 200), data=st.data(), device=devices)
def test_rotated_blob_decoded_the_device_way(width, n, data, device):
    """A rotated byte-plane blob (any rotation): zstd per plane on the host, then the
    planes joined and rotated back in torch, equals the original and the numpy decoder."""
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    rotation = data.draw(st.integers(1, 8 * width - 1))
    stored = byteplane.rotated_compress(raw, width, rotation=rotation)
    _, frames = byteplane.byteplane_frames(stored, len(raw))
    planes = np.concatenate([np.frombuffer(zstd.zstd_decompress(stored[f], n), np.uint8)
                             for f in frames] or [np.empty(0, np.uint8)])
    got = dd.unrotate_(dd.join_planes(t(planes, device).view(width, n)), width, rotation)
    assert b(got) == raw == byteplane.rotated_decompress(
        stored, len(raw), rotation=rotation).tobytes()


def test_unrotate_refuses_bad_widths_and_rotations():
    for width in (1, 8):
        with pytest.raises(ValueError):
            dd.unrotate_(torch.zeros(8, dtype=torch.uint8), width)
    for width, rotation in ((2, 0), (2, 16), (4, 32)):
        with pytest.raises(ValueError, match="rotation"):
            dd.unrotate_(torch.zeros(8, dtype=torch.uint8), width, rotation)


# -- residuals --------------------------------------------------------------------------

@FAST
@given(width=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 200), data=st.data(),
       zigzag=st.booleans(), chunk=chunks, device=devices)
def test_add_residual_matches_numpy(width, n, data, zigzag, chunk, device):
    res = data.draw(st.binary(min_size=n * width, max_size=n * width))
    base = data.draw(st.binary(min_size=n * width, max_size=n * width))
    want = delta.add_residual_(np.frombuffer(res, np.uint8).copy(), base, width, zigzag)
    out = t(res, device)
    assert dd.add_residual_(out, t(base, device), width, zigzag=zigzag, chunk=chunk) is out
    assert b(out) == want.tobytes()


@FAST
@given(width=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 200), data=st.data(),
       chunk=chunks, device=devices)
def test_zigzag_roundtrip(width, n, data, chunk, device):
    """``unzigzag_`` inverts the encoder's zigzag (``sub_residual`` against zero)."""
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    z = delta.sub_residual(raw, bytes(n * width), width, zigzag=True)
    assert b(dd.unzigzag_(t(z, device), width, chunk=chunk)) == raw


@FAST
@given(n=st.integers(0, 200), skip=st.integers(0, 7), data=st.data(), device=devices)
def test_xor_matches_numpy(n, skip, data, device):
    """Any length, and slices at any byte offset (the 8-byte fast path must not apply)."""
    res = data.draw(st.binary(min_size=n, max_size=n))
    base = data.draw(st.binary(min_size=n, max_size=n))
    want = np.bitwise_xor(np.frombuffer(res, np.uint8), np.frombuffer(base, np.uint8))
    out = t(bytes(skip) + res, device)[skip:]
    dd.xor_residual_(out, t(bytes(skip) + base, device)[skip:])
    assert b(out) == want.tobytes()


@pytest.mark.parametrize("op,width", [("xor", 1), ("add", 2), ("zigzag-add", 4),
                                      ("zigzag-add", 8)])
def test_combine_names_the_delta_ops(op, width):
    rng = np.random.default_rng(width)
    res, base = rng.bytes(64), rng.bytes(64)
    if op == "xor":
        want = bytes(x ^ y for x, y in zip(res, base))
    else:
        want = delta.add_residual_(np.frombuffer(res, np.uint8).copy(), base, width,
                                          op == "zigzag-add").tobytes()
    assert b(dd.combine_(t(res), t(base), op, width)) == want
    with pytest.raises(ValueError):
        dd.combine_(t(res), t(base), "mul", width)


def test_refuses_bad_widths_and_lengths():
    with pytest.raises(ValueError):
        dd.add_residual_(torch.zeros(6, dtype=torch.uint8), torch.zeros(6, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        dd.add_residual_(torch.zeros(6, dtype=torch.uint8), torch.zeros(6, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        dd.xor_residual_(torch.zeros(6, dtype=torch.uint8), torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dd.add_residual_(torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.uint8), 1)


# -- predictions ------------------------------------------------------------------------

def decay_params():
    """Valid ``(c, k)`` (spec §4.4: ``|k log2 c| <= 16``): rescales, AdamW-like factors
    next to 1 with many steps, and k = 0."""
    near_one = st.tuples(st.integers(1, 4000), st.booleans()).map(
        lambda js: float(np.float32(1 + (js[0] * 2.0 ** -23 if js[1] else -js[0] * 2.0 ** -24))))
    rescale = st.floats(0.5, 2.0, width=32).filter(lambda c: c > 0)
    return st.one_of(
        st.tuples(near_one, st.integers(0, delta.MAX_DECAY_STEPS)),
        st.tuples(rescale, st.integers(0, 16)),
        st.tuples(st.floats(2.0 ** -16, 2.0 ** 16, width=32), st.just(1)),
    ).filter(lambda ck: delta.decay_ok(ck[0], ck[1]))


@FAST
@given(values=st.lists(f32_bits(), max_size=150), ck=decay_params(), chunk=chunks,
       device=devices)
def test_decay_predict_matches_numpy(values, ck, chunk, device):
    c, k = ck
    base = bits_array(values)
    want = delta.decay_predict(base.tobytes(), c, k)
    got = dd.decay_predict(t(base, device), c, k, chunk=chunk)
    assert b(got) == want.tobytes()


def test_f32_from_bits():
    assert dd.f32_from_bits(0x3F800000) == 1.0
    assert dd.f32_from_bits(0x3F7FFFFF) == float(np.array(0x3F7FFFFF, np.uint32).view(np.float32))


def factor_values():
    return st.one_of(
        st.floats(-4.0, 4.0, width=32),
        st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from([2.0 ** 60, -(2.0 ** 60), 2.0 ** -60, 1e-30]))


@FAST
@given(rows=st.integers(0, 9), cols=st.integers(0, 9), rank=st.integers(0, 4),
       data=st.data(), block=st.sampled_from([dd.LOWRANK_BLOCK, 1, 7, 20]), device=devices)
def test_lowrank_predict_matches_numpy(rows, cols, rank, data, block, device):
    base = bits_array(data.draw(st.lists(f32_bits(), min_size=rows * cols,
                                         max_size=rows * cols)))
    fac = data.draw(st.lists(factor_values(), min_size=(rows + cols) * rank,
                             max_size=(rows + cols) * rank))
    fac = np.array(fac, dtype=np.float32)
    u = fac[:rows * rank].reshape(rows, rank)
    v = fac[rows * rank:].reshape(rank, cols)
    want = delta.lowrank_predict(base.tobytes(), u, v)
    got = dd.lowrank_predict(t(base, device), torch.from_numpy(u).to(device),
                             torch.from_numpy(v).to(device), block=block)
    assert b(got) == want.tobytes()


def test_lowrank_predict_on_a_merged_lora():
    """Realistic magnitudes: weights ~N(0, 0.05), a rank-8 update; every element that the
    spec predicts gets the float64 sum, bit for bit."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((96, 80)) * 0.05).astype(np.float32)
    u = (rng.standard_normal((96, 8)) * 0.01).astype(np.float32)
    v = (rng.standard_normal((8, 80)) * 0.01).astype(np.float32)
    want = delta.lowrank_predict(base.view(np.uint8).reshape(-1), u, v)
    got = dd.lowrank_predict(t(base), torch.from_numpy(u), torch.from_numpy(v), block=1000)
    assert b(got) == want.tobytes()
    assert not np.array_equal(want, base.view(np.uint32).reshape(-1))  # it did predict


def test_lowrank_refuses_mismatched_factors():
    with pytest.raises(ValueError):
        dd.lowrank_predict(torch.zeros(16, dtype=torch.uint8), torch.zeros(2, 1),
                           torch.zeros(2, 2))
    with pytest.raises(ValueError):
        dd.lowrank_predict(torch.zeros(20, dtype=torch.uint8), torch.zeros(2, 1),
                           torch.zeros(1, 2))


# -- whole delta blobs, the device way ---------------------------------------------------

def planes_on_device(stored: memoryview, n: int, device) -> tuple[torch.Tensor, int]:
    """zstd on the host (as the loader does), then the joins in torch."""
    width, frames = byteplane.byteplane_frames(stored, n)
    planes = [t(zstd.zstd_decompress(stored[f], n // width), device) for f in frames]
    return dd.join_planes(torch.stack(planes)), width


def device_decode(enc: E, stored: bytes, base: bytes, device) -> bytes:
    """Decode a delta blob with zstd on the host and everything else in ``device_decode``."""
    mv, n = memoryview(stored), len(base)
    tb = t(base, device)
    pred, skip = tb, 0
    if enc is E.DECAY_SUB_BYTEPLANE_ZSTD:
        c_bits, k = struct.unpack_from("<II", mv, 0)
        skip = 8
        pred = dd.decay_predict(tb, dd.f32_from_bits(c_bits), k)
    elif enc is E.LOWRANK_SUB_BYTEPLANE_ZSTD:
        rows, cols, rank, flen = struct.unpack_from("<IIII", mv, 0)
        skip = 16 + flen
        if rank:
            fac, _ = planes_on_device(mv[16:skip], (rows + cols) * rank * 4, device)
            fac = fac.view(torch.float32)
            pred = dd.lowrank_predict(tb, fac[:rows * rank].view(rows, rank),
                                      fac[rows * rank:].view(rank, cols))
    out, width = planes_on_device(mv[skip:], n, device)
    op = {E.XOR_BYTEPLANE_ZSTD: "xor", E.SUB_BYTEPLANE_ZSTD: "add"}.get(enc, "zigzag-add")
    return b(dd.combine_(out, pred, op, width))


DELTAS = [e for e in E if e.is_delta and not e.any_length_base]  # 24, 25: test_derived


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("enc", DELTAS, ids=[e.name for e in DELTAS])
def test_whole_delta_blobs(enc, device):
    """A fine-tune-like target: weight decay on most rows, a merged LoRA, a few specials;
    encoded by the reference encoder, decoded the device way, equal to the original."""
    rng = np.random.default_rng(int(enc))
    rows, cols = 64, 48
    base = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    base.reshape(-1)[:6] = [np.nan, np.inf, -0.0, 1e-40, -1e-42, 3e38]
    target = base.copy()
    c = np.float32(1 - 37 * 2.0 ** -24)
    for _ in range(11):
        target = (target * c).astype(np.float32)
    if enc is E.LOWRANK_SUB_BYTEPLANE_ZSTD:
        target = (base.astype(np.float64) + (rng.standard_normal((rows, 4)) * 0.01)
                  @ (rng.standard_normal((4, cols)) * 0.01)).astype(np.float32)
    target[5, :7] += np.float32(1e-3)
    data, bb = target.tobytes(), base.tobytes()
    for width in ((4, 2, 1) if enc is E.XOR_BYTEPLANE_ZSTD else (4, 2, 8)):
        stored = delta_encode.encode_delta(enc, data, bb, width=width, shape=(rows, cols))
        assert device_decode(enc, stored, bb, device) == data, width

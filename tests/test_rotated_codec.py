"""ROTATED_BYTEPLANE_ZSTD (32, spec §4.3.1) and ROTATEDN_BYTEPLANE_ZSTD (33, §4.3.2): any
bytes round-trip bit for bit at any rotation, F32/BF16 tensors are packed with the rotation
that compresses them best, and their frames and rotations are checked like every byte-plane
blob."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdedup.errors import IntegrityError
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.codecs import decode, encode
from tdedup.format.codecs.byteplane import (
    ROTATE_CHUNK,
    ROTATION,
    best_rotation,
    byteplane_compress,
    rotated_compress,
)

ROT = BlobEncoding.ROTATED_BYTEPLANE_ZSTD
ROTN = BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1.17e-38,
                     3.4e38, -3.4e38, 1.0, -2.5], dtype=np.float32)


def roundtrip(data: bytes, width: int, rotation: int = 1) -> bytes:
    enc = ROT if rotation == 1 else ROTN
    stored = encode(enc, data, width=width, rotation=rotation)
    if enc is ROTN:
        assert ROTATION.unpack_from(stored)[0] == rotation
    return bytes(decode(enc, stored, len(data)))


def test_is_self_contained():
    assert not ROT.is_delta and not ROTN.is_delta
    assert BlobEncoding.LOWRANK_SUB_BYTEPLANE_ZSTD.is_delta


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.sampled_from([2, 4]), st.data())
def test_any_bytes_roundtrip_at_any_rotation(data, width, draw):
    data = data[:len(data) // width * width]
    rotation = draw.draw(st.integers(1, 8 * width - 1))
    assert roundtrip(data, width, rotation) == data


@pytest.mark.parametrize("rotation", [1, 2, 3, 4, 31])
@pytest.mark.parametrize("n", [1, ROTATE_CHUNK - 1, ROTATE_CHUNK, 2 * ROTATE_CHUNK + 3])
def test_floats_with_specials_and_subnormals_roundtrip(n, rotation):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 0.02).astype(np.float32)
    k = min(n, len(SPECIALS))
    a[:k] = SPECIALS[:k]
    assert roundtrip(a.tobytes(), 4, rotation) == a.tobytes()
    bf16 = (a.view(np.uint32) >> 16).astype(np.uint16)
    assert roundtrip(bf16.tobytes(), 2, min(rotation, 15)) == bf16.tobytes()
    with np.errstate(over="ignore"):
        f16 = a.astype(np.float16)
    assert roundtrip(f16.tobytes(), 2, min(rotation, 15)) == f16.tobytes()


@pytest.mark.parametrize("rotation", range(1, 16))
def test_every_16_bit_pattern_roundtrips(rotation):
    data = np.arange(1 << 16, dtype=np.uint16).tobytes()
    assert roundtrip(data, 2, rotation) == data


def test_exponent_lands_in_the_top_plane_and_shrinks_trained_like_weights():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1 << 18) * 0.05).astype(np.float32).tobytes()
    assert len(encode(ROT, a, width=4)) < len(byteplane_compress(a, 4))


@pytest.mark.parametrize("dtype,width", [(np.float32, 4), ("bf16", 2)])
def test_best_rotation_takes_the_mantissa_lead_bits_into_the_top_plane(dtype, width):
    """Trained-like weights (|w| < 2): rotating by more than one moves the exponent's
    constant top bits to the lowest plane and the mantissa's skewed leading bits to the
    top one; the sampled choice is smaller than one bit in full."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(1 << 19) * 0.05).astype(np.float32)
    if dtype == "bf16":
        a = (a.view(np.uint32) >> 16).astype(np.uint16)
    data = a.tobytes()
    r = best_rotation(data, width)
    assert r >= 2
    assert len(rotated_compress(data, width, rotation=r)) < len(rotated_compress(data, width))
    assert roundtrip(data, width, r) == data


def test_width_other_than_2_or_4_is_refused():
    stored = byteplane_compress(bytes(24), 8)
    with pytest.raises(IntegrityError, match="rotated"):
        decode(ROT, stored, 24)
    with pytest.raises(IntegrityError, match="rotated"):
        decode(ROTN, ROTATION.pack(3) + stored, 24)


@pytest.mark.parametrize("width,rotation", [(2, 0), (2, 16), (4, 32), (4, 1 << 31)])
def test_rotation_out_of_range_is_refused(width, rotation):
    stored = ROTATION.pack(rotation) + byteplane_compress(bytes(8 * width), width)
    with pytest.raises(IntegrityError, match="rotation"):
        decode(ROTN, stored, 8 * width)


def test_truncated_rotation_prefix_is_refused():
    with pytest.raises(IntegrityError, match="too short"):
        decode(ROTN, b"\x03\x00", 8)


def test_pack_uses_it_for_f32_and_bf16(tmp_path):
    from helpers.factory import make_safetensors

    import tdedup

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((512, 1024)) * 0.05).astype(np.float32)
    make_safetensors(tmp_path / "m" / "model.safetensors", {"w": w, "i": np.arange(8)})
    r = tdedup.pack([str(tmp_path / "m")], tmp_path / "b.tdd")
    assert r.encodings.get("rotatedn_byteplane_zstd") == 1
    tdedup.unpack(tmp_path / "b.tdd", tmp_path / "out")
    assert ((tmp_path / "out" / "m" / "model.safetensors").read_bytes()
            == (tmp_path / "m" / "model.safetensors").read_bytes())


def test_load_streams_it_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    import tdedup

    g = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(300, 700, generator=g) * 0.05,  # odd chunk edges
               "bf": (torch.randn(333, 257, generator=g) * 0.05).to(torch.bfloat16),
               "h": (torch.randn(129, 513, generator=g) * 0.05).to(torch.float16)}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    tdedup.pack([str(tmp_path / "m")], tmp_path / "b.tdd")
    with tdedup.open_bundle(tmp_path / "b.tdd") as b:
        encodings = {t.name: b.blob(t.hash).encoding for f in b.model("m").files
                     for t in f.tensors}
        assert encodings["w"] is encodings["bf"] is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD
    for verify in (False, True):
        got = tdedup.load(tmp_path / "b.tdd", device="cpu", verify=verify)["m"]
        for k, v in tensors.items():
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_high_levels_never_store_a_plane_larger_than_the_default(dtype):
    """Above level 3 a plane may take zstd's btultra2 entropy effort, kept only when
    smaller; either way the blob decodes to the same bytes."""
    from tdedup.format.codecs.byteplane import byteplane_compress, byteplane_decompress

    rng = np.random.default_rng(7)
    data = (rng.standard_normal(1 << 16) * 0.02).astype(dtype).tobytes()
    width = np.dtype(dtype).itemsize
    fast, effort = byteplane_compress(data, width, 1), byteplane_compress(data, width, 19)
    assert len(effort) <= len(fast)
    assert byteplane_decompress(effort, len(data)).tobytes() == data

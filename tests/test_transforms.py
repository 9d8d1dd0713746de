"""Every transform against an independent computation.

Casts against torch (and numpy); simple quantizers against gguf-py; the K-quant ports against
llama.cpp's own quantizers, both through committed golden vectors (always) and through ggml
itself over hypothesis tensors (``llamacpp``, where shared/tools/llama-cpp.sh has built it).
Inputs include NaN, infinities, subnormals, zeros and constant blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tdedup.errors import TransformMismatch
from tdedup.format.codecs import kquants
from tdedup.format.codecs.transforms import (
    QUANT_TYPES,
    SIMPLE_QUANTS,
    Transform,
    TransformKind,
    TypedTensor,
    apply,
    apply_chain,
    quantize,
    type_number,
    xor_residual,
)

torch = pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "data" / "ggml_quant_golden.npz"
SPECIAL = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-40, 1e-38, 6.1e-5, 65504.0,
           65520.0, 3.4e38, -3.4e38, 1.0, -2.5]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nasty_f32(draw, blocks: int = 2, block: int = 256, finite: bool = False) -> np.ndarray:
    """Float32 rows: random magnitudes, sprinkled specials, constant and zero blocks."""
    n = draw(st.integers(1, blocks)) * block
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-30, 1e-41, 1e20, 1e35]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    specials = [s for s in SPECIAL if not finite or np.isfinite(s)]
    for i in draw(st.lists(st.integers(0, n - 1), max_size=6)):
        x[i] = draw(st.sampled_from(specials))
    style = draw(st.sampled_from(["plain", "const", "zero", "halfconst"]))
    if style == "const":
        x[:block] = x[0] if np.isfinite(x[0]) or not finite else 1.0
    elif style == "zero":
        x[:block] = 0
    elif style == "halfconst":
        x[: block // 2] = draw(st.sampled_from([0.5, -3.0, 1e-40]))
    return x


def tensor(x: np.ndarray, etype: str = "F32") -> TypedTensor:
    return TypedTensor.of(x.tobytes(), etype, x.shape)


def T(kind: TransformKind, etype: str | int = 0) -> Transform:
    return Transform(kind, type_number(etype) if isinstance(etype, str) else etype)


# -- casts ---------------------------------------------------------------------------

f32_arrays = hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=40),
                        elements=st.floats(width=32, allow_nan=True, allow_infinity=True,
                                           allow_subnormal=True))


@HYP
@given(f32_arrays)
def test_cast_f32_to_f16_matches_numpy_and_torch(x):
    out = apply(T(TransformKind.CAST, "F16"), tensor(x)).data.view(np.uint16)
    ours = out.reshape(x.shape)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours, x.astype(np.float16).view(np.uint16))
    ref = torch.from_numpy(x.copy()).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.array_equal(ours[nan] & 0x8000, ref[nan] & 0x8000)  # sign kept, still NaN
    assert np.isnan(ours[nan].view(np.float16)).all()


@HYP
@given(f32_arrays)
def test_cast_f32_to_bf16_matches_torch_and_gguf_py(x):
    ours = apply(T(TransformKind.CAST, "BF16"), tensor(x)).data.view(np.uint16).reshape(x.shape)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert (ours[nan] & 0x7FFF > 0x7F80).all()  # torch's own NaN bits vary by code path
    ggml = gq.quantize(x.reshape(-1), GGMLQuantizationType.BF16).view(np.uint16)
    assert np.array_equal(ours.reshape(-1), ggml)


@HYP
@given(hnp.arrays(np.uint16, hnp.array_shapes(max_dims=2, max_side=40)),
       st.sampled_from(["F16", "BF16"]))
def test_widening_to_f32_is_exact(bits, etype):
    out = apply(T(TransformKind.CAST, "F32"), tensor(bits, etype)).data.view(np.float32)
    tdt = torch.float16 if etype == "F16" else torch.bfloat16
    ref = torch.from_numpy(bits.astype(np.int16)).view(tdt).float().numpy().reshape(-1)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# (input bits, output bits): a NaN keeps its sign and payload, top bits first; none is
# quieted (spec §4.8). A payload that only has low bits becomes 1 in F16.
F32_TO_F16_NANS = [(0x7FC00000, 0x7E00), (0x7FA00000, 0x7D00), (0x7F800001, 0x7C01),
                   (0xFF802000, 0xFC01), (0xFFC00001, 0xFE00), (0x7FFFFFFF, 0x7FFF)]
F16_TO_F32_NANS = [(0x7E00, 0x7FC00000), (0x7D00, 0x7FA00000), (0x7C01, 0x7F802000),
                   (0xFDFF, 0xFFBFE000)]


def test_nan_bits_of_the_f16_casts_are_the_specs():
    src = np.array([a for a, _ in F32_TO_F16_NANS], np.uint32)
    out = apply(T(TransformKind.CAST, "F16"), tensor(src.view(np.float32))).data
    assert [hex(v) for v in out.view(np.uint16)] == [hex(b) for _, b in F32_TO_F16_NANS]
    src16 = np.array([a for a, _ in F16_TO_F32_NANS], np.uint16)
    out = apply(T(TransformKind.CAST, "F32"), tensor(src16, "F16")).data
    assert [hex(v) for v in out.view(np.uint32)] == [hex(b) for _, b in F16_TO_F32_NANS]


def test_cast_refuses_non_float_and_identity():
    with pytest.raises(TransformMismatch):
        apply(T(TransformKind.CAST, "F16"), TypedTensor.of(bytes(34), "Q8_0", (32,)))
    with pytest.raises(TransformMismatch):
        apply(T(TransformKind.CAST, "F32"), tensor(np.zeros(4, np.float32)))


# -- quantization --------------------------------------------------------------------

@HYP
@given(nasty_f32(blocks=3, block=32), st.sampled_from(SIMPLE_QUANTS))
@example(np.full(32, -0.0, np.float32), "Q4_0")  # CI's hypothesis found it (stop 23)
@example(np.full(32, -0.0, np.float32), "Q5_0")
def test_simple_quantizers_match_gguf_py(x, etype):
    ours = quantize(x, etype, x.size)
    qtype = GGMLQuantizationType[etype]
    block, size = gq.GGML_QUANT_SIZES[qtype]
    finite = np.isfinite(x.reshape(-1, block)).all(axis=1)
    ours = ours.reshape(-1, size)
    with np.errstate(all="ignore"):
        ref = gq.quantize(x.reshape(-1, block), qtype).reshape(-1, size)
    if etype in ("Q4_0", "Q5_0"):
        # ggml's reference keeps ``max = 0.0f`` on a block of zeros, +0.0 or -0.0 alike,
        # so its scale ``max / -k`` is -0.0 (F16 0x8000); gguf-py takes max from the block
        # and stores +0.0 for a block of -0.0. The spec follows the reference.
        zeros = ~np.any(x.reshape(-1, block), axis=1)
        ref[zeros, 0:2] = (0x00, 0x80)
    assert np.array_equal(ours[finite], ref[finite])
    assert not ours[~finite].any()  # non-finite blocks predict zeros (spec §13)


@pytest.mark.parametrize("etype", sorted(QUANT_TYPES))
def test_quantizers_match_llamacpp_golden_vectors(etype):
    golden = np.load(GOLDEN)
    x = golden["input"]
    if etype in SIMPLE_QUANTS:  # only finite blocks are defined by llama.cpp's arithmetic
        x = x[np.isfinite(x)]
    assert np.array_equal(quantize(x, etype, 256), golden[etype][: quantize(x, etype, 256).size])


@pytest.mark.parametrize("etype", sorted(kquants.QUANTIZERS))
def test_kquants_dequantize_close_to_input(etype):
    x = np.random.default_rng(3).standard_normal(256 * 8).astype(np.float32)
    q = apply(T(TransformKind.QUANTIZE, etype), tensor(x.reshape(8, 256)))
    back = apply(T(TransformKind.DEQUANTIZE, "F32"), q).data.view(np.float32)
    err = np.abs(back - x).mean() / np.abs(x).mean()
    assert err < {"Q2_K": 0.4, "Q3_K": 0.25}.get(etype, 0.12)


def test_quantize_refuses_partial_blocks():
    with pytest.raises(TransformMismatch):
        apply(T(TransformKind.QUANTIZE, "Q4_K"), tensor(np.zeros((2, 384), np.float32)))


def test_dequantize_q8_0_is_scale_times_int():
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    q = apply(T(TransformKind.QUANTIZE, "Q8_0"), tensor(x))
    blocks = q.data.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    ints = blocks[:, 2:].view(np.int8).astype(np.float32)
    for dst, check in (("F32", lambda v: v.view(np.float32)),
                       ("F16", lambda v: v.view(np.float16).astype(np.float32))):
        got = check(apply(T(TransformKind.DEQUANTIZE, dst), q).data)
        want = (d * ints).reshape(-1)
        assert np.array_equal(got, want if dst == "F32" else want.astype(np.float16))


def test_chain_requantize_and_cast_then_quantize():
    x = np.random.default_rng(6).standard_normal((4, 256)).astype(np.float32)
    q41 = apply(T(TransformKind.QUANTIZE, "Q4_1"), tensor(x))
    chain = (T(TransformKind.DEQUANTIZE, "F32"), T(TransformKind.QUANTIZE, "Q8_0"))
    via = apply_chain(chain, q41)
    with np.errstate(all="ignore"):
        deq = gq.dequantize(q41.data.reshape(-1, 20), GGMLQuantizationType.Q4_1)
    assert via.tobytes() == gq.quantize(deq.reshape(4, 256), GGMLQuantizationType.Q8_0).tobytes()
    half = apply_chain((T(TransformKind.CAST, "F16"), T(TransformKind.QUANTIZE, "Q6_K")), tensor(x))
    assert half.tobytes() == kquants.quantize_q6_k(x.astype(np.float16).astype(np.float32))


def test_residual_round_trips_a_transform_that_does_not_reproduce():
    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    pred = apply(T(TransformKind.CAST, "F16"), tensor(x)).tobytes()
    actual = bytearray(pred)
    actual[5] ^= 0x40  # a hand-edited element
    res = xor_residual(bytes(actual), pred)
    assert np.count_nonzero(res) == 1
    assert xor_residual(res, pred).tobytes() == bytes(actual)


# -- layout --------------------------------------------------------------------------

@HYP
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.sampled_from(["F32", "F16"]))
def test_qk_permutation_matches_torch_reference(n_head, half, cols, etype):
    rows = n_head * 2 * half
    x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    if etype == "F16":
        x = x.astype(np.float16)
    t = tensor(x, etype)
    ours = apply(T(TransformKind.PERMUTE_QK, n_head), t).data.view(x.dtype).reshape(x.shape)
    # convert_hf_to_gguf.py LlamaModel.permute, written with torch ops
    w = torch.from_numpy(x)
    ref = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape).numpy()
    assert np.array_equal(ours, ref)
    back = apply(T(TransformKind.UNPERMUTE_QK, n_head), TypedTensor.of(ours.tobytes(), etype, x.shape))
    assert back.tobytes() == x.tobytes()


def test_transpose_matches_numpy():
    x = np.random.default_rng(8).standard_normal((3, 5)).astype(np.float32)
    out = apply(T(TransformKind.TRANSPOSE), tensor(x))
    assert out.shape == (5, 3) and out.tobytes() == np.ascontiguousarray(x.T).tobytes()
    with pytest.raises(TransformMismatch):
        apply(T(TransformKind.TRANSPOSE), tensor(np.zeros((2, 2, 2), np.float32)))


def test_registry_json_and_unknown_kind():
    tr = T(TransformKind.QUANTIZE, "Q4_K")
    assert Transform.from_json(tr.to_json()) == tr and tr.describe() == "Q4_K quantization"
    for bad in ([99, 0], [1], "x", [1, True]):
        with pytest.raises(TransformMismatch):
            Transform.from_json(bad)


# -- llama.cpp itself ----------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from helpers.llamacpp import build_oracle, llama_env
    if llama_env() is None:
        pytest.skip("llama.cpp not built (bash shared/tools/llama-cpp.sh)")
    return build_oracle(tmp_path_factory.mktemp("oracle"))


@pytest.mark.llamacpp
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(x=nasty_f32(blocks=3), etype=st.sampled_from(sorted(kquants.QUANTIZERS)))
def test_kquants_bit_exact_with_ggml(oracle, x, etype):
    from helpers.llamacpp import oracle_quantize
    assert quantize(x, etype, 256) .tobytes() == oracle_quantize(oracle, etype, x.reshape(-1, 256))


@pytest.mark.llamacpp
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(x=nasty_f32(blocks=3, block=32, finite=True), etype=st.sampled_from(SIMPLE_QUANTS))
def test_simple_quantizers_bit_exact_with_ggml_on_finite_blocks(oracle, x, etype):
    from helpers.llamacpp import oracle_quantize
    assert quantize(x, etype, 32).tobytes() == oracle_quantize(oracle, etype, x.reshape(-1, 32))


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q5_1"])
def test_llama_quantize_outputs_reproduce_from_f32(corpus, tmp_path, ftype):
    """Every tensor llama-quantize writes is our QUANTIZE of the F32 file's tensor, bit for bit."""
    import subprocess

    from gguf import GGUFReader
    from helpers.llamacpp import llama_env

    env = llama_env()
    if env is None:
        pytest.skip("llama.cpp not built (bash shared/tools/llama-cpp.sh)")
    src = corpus / "minilm-gguf" / "f32.gguf"
    out = tmp_path / f"{ftype}.gguf"
    subprocess.run([env["LLAMA_QUANTIZE"], str(src), str(out), ftype, "1"], check=True,
                   capture_output=True)
    base = {t.name: t for t in GGUFReader(src).tensors}
    changed = 0
    for t in GGUFReader(out).tensors:
        b = base[t.name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        bt = TypedTensor.of(np.asarray(b.data).reshape(-1).view(np.uint8), "F32", shape)
        actual = np.asarray(t.data).reshape(-1).view(np.uint8).tobytes()
        if t.tensor_type.name == "F32":
            assert actual == bt.tobytes()
            continue
        pred = apply(T(TransformKind.QUANTIZE, t.tensor_type.name), bt)
        assert pred.tobytes() == actual, t.name
        changed += 1
    assert changed >= 36


def test_q8_0_fast_path_rounds_ties_away_from_zero():
    """A block whose amax is 127 has scale 1: every .5 value is a tie roundf sends away
    from zero (numpy's round would send half of them to even)."""
    x = np.arange(-127, 127, 0.5, dtype=np.float32)[: 32 * 15].reshape(-1, 32).copy()
    x[:, 0] = 127
    ref = gq.quantize(x, GGMLQuantizationType.Q8_0).reshape(-1)
    assert quantize(x.reshape(-1), "Q8_0", 32).tobytes() == ref.tobytes()

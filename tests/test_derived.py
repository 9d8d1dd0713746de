"""Derived tensors end to end: codec, planner across formats, pack/unpack/load bit-exact.

Ladders are built with the real libraries: gguf-py writes GGUF files (its quantizers and
TensorNameMap names), safetensors writes the F32/F16/BF16 files; where llama.cpp is built,
its converter and llama-quantize make the corpus MiniLM ladder (``llamacpp``)."""

from __future__ import annotations

import numpy as np
import pytest

from tdedup.errors import TdedupError
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.codecs import decode, encode
from tdedup.format.codecs.derived import (
    decode_ref,
    encode_derived,
    encode_ref,
    parse_derived,
)
from tdedup.format.codecs.transforms import Transform, TransformKind, type_number


def test_derived_codec_round_trips_exact_and_inexact():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    chain = (Transform(TransformKind.QUANTIZE, type_number("Q4_K")),)
    from tdedup.format.codecs.transforms import TypedTensor, apply_chain
    target = apply_chain(chain, TypedTensor.of(x.tobytes(), "F32", x.shape)).tobytes()
    for actual in (target, bytes([target[0] ^ 1]) + target[1:]):
        stored = encode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, actual, base=x.tobytes(),
                        derive=(chain, "F32", x.shape))
        assert bytes(decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, stored, len(actual),
                            base=x.tobytes())) == actual
    assert len(encode_derived(target, x.tobytes(), chain, "F32", x.shape)) < 300
    assert parse_derived(stored)[:3] == (chain, "F32", (4, 256))


def test_derived_decode_refuses_bad_headers():
    x = np.zeros((1, 32), np.float32).tobytes()
    stored = encode_derived(bytes(34), x, (Transform(TransformKind.QUANTIZE, 8),), "F32", (1, 32))
    for bad in (stored[:3], b"\x03" + stored[1:], stored[:8] + b"\x63" + stored[9:],
                stored[:4] + b"\xff\xff\x00\x00" + stored[8:]):
        with pytest.raises(TdedupError):
            decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, bad, 34, base=x)
    with pytest.raises(TdedupError):  # base of the wrong size for the declared shape
        decode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, stored, 34, base=x[:64])


def test_zstd_ref_makes_a_repeated_layout_nearly_free():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    data = base[:500_000] + b"changed" + base[500_007:]
    stored = encode_ref(data, base)
    assert len(stored) < 2000
    assert decode_ref(stored, len(data), base) == data
    with pytest.raises(TdedupError):
        decode_ref(stored, len(data) - 1, base)



"""The format test vectors (spec/vectors/): every bundle unpacks to the recorded files, its
derived blobs name the recorded transform chains and decode to the recorded hashes, and
the rotated byte-plane vector (1.2) stores the recorded rotations, and the delta vector
holds one blob of each delta encoding (16-20).

Regenerate with ``python spec/vectors/make_vectors.py`` when the writer changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import tdedup
from tdedup.format.bundle.constants import BlobEncoding
from tdedup.format.bundle.hashing import hash_bytes
from tdedup.format.codecs.derived import parse_derived
from tdedup.format.codecs.transforms import TransformKind

VECTORS = Path(__file__).parents[1] / "spec" / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
#: The registry entry each vector exercises (by its name's first word).
KIND = {"cast": TransformKind.CAST, "quantize": TransformKind.QUANTIZE,
        "dequantize": TransformKind.DEQUANTIZE, "chain": TransformKind.QUANTIZE,
        "transpose": TransformKind.TRANSPOSE, "permute": TransformKind.PERMUTE_QK}


TRANSFORMS = sorted(n for n in EXPECTED if "derived" in EXPECTED[n])


def test_every_transform_has_a_vector():
    kinds = {KIND[name.split("_")[0]] for name in TRANSFORMS}
    assert kinds >= set(TransformKind) - {TransformKind.UNPERMUTE_QK}
    # each simple and K-quant quantizer, and Q8_0 again on exact halves (roundf) and on
    # NaN / infinity blocks
    assert len({n for n in EXPECTED if n.startswith("quantize_")}) == 12


def unpacked_vector(name: str, tmp_path: Path) -> tuple[dict, Path]:
    """The vector's expectations and bundle, after checking it unpacks to its files."""
    want = EXPECTED[name]
    bundle = VECTORS / f"{name}.tdd"
    tdedup.unpack(bundle, tmp_path / "out")
    for rel, sha in want["files"].items():
        assert hashlib.sha256((tmp_path / "out" / rel).read_bytes()).hexdigest() == sha, rel
    return want, bundle


@pytest.mark.parametrize("name", TRANSFORMS)
def test_vector(name, tmp_path):
    want, bundle = unpacked_vector(name, tmp_path)
    with tdedup.open_bundle(bundle) as b:
        derived = {h: r for h, r in b.manifest.blobs.items()
                   if r.encoding is BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD}
        assert set(derived) == set(want["derived"])
        for h, rec in derived.items():
            chain = parse_derived(b.stored_bytes(rec))[0]
            assert [t.to_json() for t in chain] == want["derived"][h]
            assert hash_bytes(bytes(b.read_blob(h))) == h
        kinds = {t[0] for chains in want["derived"].values() for t in chains}
        assert int(KIND[name.split("_")[0]]) in kinds


def test_rotated_vector(tmp_path):
    """Rotations 3 and 4 (§4.3.2): each blob's prefix is the recorded rotation, decodes to
    its hash, and the file comes back byte for byte."""
    from tdedup.format.codecs.byteplane import rotation_prefix

    want, bundle = unpacked_vector("rotated_n", tmp_path)
    with tdedup.open_bundle(bundle) as b:
        rotated = {h: r for h, r in b.manifest.blobs.items()
                   if r.encoding is BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD}
        assert {h: rotation_prefix(b.stored_bytes(r)) for h, r in rotated.items()} == \
            want["rotations"]
        assert len(set(want["rotations"].values())) >= 2
        for h in rotated:
            assert hash_bytes(bytes(b.read_blob(h))) == h


def test_delta_vector(tmp_path):
    """One blob of each delta encoding (§4.4), each decoding to its hash against its base,
    and every file back byte for byte."""
    want, bundle = unpacked_vector("deltas", tmp_path)
    with tdedup.open_bundle(bundle) as b:
        deltas = {h: int(r.encoding) for h, r in b.manifest.blobs.items()
                  if 16 <= r.encoding <= 20}
        assert deltas == want["deltas"]
        assert sorted(deltas.values()) == [16, 17, 18, 19, 20]
        for h in deltas:
            assert hash_bytes(bytes(b.read_blob(h))) == h

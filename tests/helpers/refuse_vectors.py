"""The must-refuse vectors of spec/vectors/refuse/ (spec/FORMAT.md §3.4, §4.4, §12): each a
complete bundle with correct checksums that a conforming reader MUST refuse, built from
one small real bundle by surgery. ``python -m helpers.refuse_vectors DIR`` (from tests/)
writes them and ``index.json`` (file name -> what the refusal is about)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from helpers import hostile_helpers as hh

F32_NAN, F32_INF, F32_SUBNORMAL = 0x7FC00000, 0x7F800000, 0x00000001


def _base_bundle(root: Path) -> Path:
    return hh.pack_tiny_family(root)


def _delta_blob(doc: dict) -> dict:
    return next(b for b in doc["blobs"] if "base" in b)


def _lowrank(doc: dict, offsets: list[int], stored: bytes, blob: dict) -> None:
    blob.update(encoding=20, offset=offsets[0], stored_length=len(stored),
                checksum=hh.digest(stored))


def lowrank_stored(rows: int, cols: int, bad_bits: int) -> bytes:
    """A rank-1 low-rank delta of a ``rows x cols`` F32 tensor whose first factor is the
    binary32 with bits ``bad_bits``; a zero residual."""
    from tdedup.format.codecs.delta import LOWRANK_HEAD, planes_compress

    fac = np.ones(rows + cols, np.float32)
    fac.view(np.uint32)[0] = bad_bits
    factors = planes_compress(fac, 4)
    residual = planes_compress(np.zeros(rows * cols, np.uint32), 4)
    return LOWRANK_HEAD.pack(rows, cols, 1, len(factors)) + factors + residual


def build(out: Path, scratch: Path) -> dict[str, str]:
    """Write every vector into ``out``; returns {file name: what must be refused}."""
    out.mkdir(parents=True, exist_ok=True)
    src = _base_bundle(scratch)
    vectors: dict[str, str] = {}

    data = src.read_bytes()
    foot = len(data) - hh.FOOTER_SIZE
    body = bytearray(data[foot:foot + 88])
    body[72] = 1
    import blake3

    (out / "footer-reserved-nonzero.tdd").write_bytes(
        data[:foot] + bytes(body) + blake3.blake3(bytes(body)).digest()[:8])
    vectors["footer-reserved-nonzero.tdd"] = "reserved footer bytes"

    doc = hh.read_parts(src).manifest
    delta = _delta_blob(doc)
    rows_cols = (delta["decoded_length"] // 4 // 8, 8)
    for name, bits in (("nan", F32_NAN), ("inf", F32_INF), ("subnormal", F32_SUBNORMAL)):
        stored = lowrank_stored(*rows_cols, bits)

        def edit(d, offsets, stored=stored):
            _lowrank(d, offsets, stored, _delta_blob(d))
        fname = f"lowrank-factor-{name}.tdd"
        hh.rewrite_manifest(src, out / fname, edit, append=[stored], scrub=True)
        vectors[fname] = "low-rank factors"

    def deep(d, offsets):
        nest: object = 1
        for _ in range(64):  # inside the top-level object: 65 levels
            nest = [nest]
        d["x_future_key"] = nest
    hh.rewrite_manifest(src, out / "manifest-nested-65.tdd", deep)
    vectors["manifest-nested-65.tdd"] = "nested more than 64"

    def surrogate(d, offsets):
        d["models"][0]["files"][0]["path"] = "x\ud800.json"
    hh.rewrite_manifest(src, out / "manifest-lone-surrogate.tdd", surrogate)
    vectors["manifest-lone-surrogate.tdd"] = "surrogate"

    (out / "index.json").write_text(json.dumps(vectors, indent=2, sort_keys=True) + "\n")
    return vectors


if __name__ == "__main__":  # pragma: no cover - regenerating the committed vectors
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(sys.argv[1]), Path(tmp))

"""Property tests: whatever the models hold, the overlap report's totals are consistent."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.factory import make_safetensors
from tdedup.analyzers.tensor_hashes import HashedTensor
from tdedup.analyzers.overlap import compute_overlap
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format.checkpoints.records import ModelLayout, ModelSource, TensorRecord

# A model is a list of (content id, byte length, dtype) picked from a small pool, so that
# contents recur within and across models; lengths may be 0.
_content = st.tuples(st.integers(0, 12), st.sampled_from([0, 2, 4, 96, 1000]),
                     st.sampled_from(["F32", "F16", "BF16"]))
_models = st.lists(st.lists(_content, max_size=12), min_size=1, max_size=6)


def _synthetic(spec: list[list[tuple[int, int, str]]]):
    models, hashed = [], {}
    for i, tensors in enumerate(spec):
        name = f"m{i}"
        models.append(ModelSource(name, Path(name), ModelLayout.SAFETENSORS))
        hashed[name] = [
            HashedTensor(TensorRecord(name, "w.safetensors", f"t{j}", dtype, (length,),
                                      j * 1000, length), f"{cid:064x}")
            for j, (cid, length, dtype) in enumerate(tensors)]
    return models, hashed


def check_consistent(report) -> None:
    names = [m.name for m in report.models]
    assert report.distinct_tensor_bytes <= report.total_tensor_bytes
    assert report.total_tensor_bytes == sum(m.tensor_bytes for m in report.models)
    assert report.saved_bytes == sum(g.saved_bytes for g in report.groups)
    assert report.dedup_ratio >= 1.0
    for m in report.models:
        assert m.shared_bytes + m.unique_bytes == m.tensor_bytes
        assert 0 <= m.shared_bytes <= m.tensor_bytes
    matrix = report.shared_matrix()
    for i, a in enumerate(report.models):
        for j, b in enumerate(report.models):
            assert matrix[i][j] == matrix[j][i]
            if i != j:
                assert report.pair(names[i], names[j]) is report.pair(names[j], names[i])
                # Bytes shared with one other model are at most what a shares at all.
                assert matrix[i][j] <= a.shared_bytes and matrix[i][j] <= b.shared_bytes
    assert len(report.pairs) == len(names) * (len(names) - 1) // 2
    for g in report.groups:
        assert g.count >= 2 and g.saved_bytes == g.bytes * (g.count - 1)


@settings(max_examples=300, deadline=None)
@given(_models)
def test_totals_are_consistent(spec):
    models, hashed = _synthetic(spec)
    report = compute_overlap(models, hashed)
    check_consistent(report)
    keys = {h.key for hs in hashed.values() for h in hs}
    assert report.distinct_tensor_bytes == sum(length for _, length in keys)
    d = report.to_dict()
    assert d["total_tensor_bytes"] == report.total_tensor_bytes
    assert all(p["a_fraction"] <= 1 and p["b_fraction"] <= 1 for p in d["pairs"])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=5, unique=True),
                min_size=2, max_size=4))
def test_totals_on_real_files(picks):
    """The same properties through real safetensors files and the real hashing pass."""
    pool = [np.full((3 + i,), i, np.float32) for i in range(6)]
    with tempfile.TemporaryDirectory() as d:
        paths = [make_safetensors(Path(d) / f"m{i}.safetensors",
                                  {f"w{k}": pool[k] for k in pick})
                 for i, pick in enumerate(picks)]
        scanned = hash_models(index_models([str(p) for p in paths]))
        report = compute_overlap(scanned.models, scanned.hashed)
    check_consistent(report)
    for i, a in enumerate(picks):
        for j, b in enumerate(picks[i + 1:], i + 1):
            want = sum(pool[k].nbytes for k in set(a) & set(b))
            assert report.pair(f"m{i}", f"m{j}").shared_bytes == want

"""The delta planner: base choice per tensor on checkpoints made by real AdamW steps,
renamed tensors, chain depth and cycles, estimates against real encodings, and the
bundle-size target on the corpus MiniLM family."""

from __future__ import annotations

import numpy as np
import zstandard
import pytest

from helpers import delta_helpers as dh
from helpers import factory
from tdedup.analyzers.tensor_bytes import TensorBytes
from tdedup.analyzers.delta_planning import (DeltaChoice, choose_bases,
                                             element_width, plan_deltas, plane_width)
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.format.codecs import byteplane as codecs
from tdedup.format.bundle.constants import MAX_DELTA_DEPTH
from tdedup.format.bundle.constants import BlobEncoding as E
from tdedup.format.codecs.delta import decode_delta
from tdedup.format.codecs.delta_encode import encode_delta


def scan(paths: dict) -> object:
    return hash_models(index_models([f"{k}={v}" for k, v in paths.items()]))


def check_chains(scanned, choices: dict, max_depth: int) -> None:
    """Bases come earlier in first-occurrence order, are other distinct contents of the same
    length, and no chain is longer than ``max_depth`` (so none is a cycle)."""
    order = {k: i for i, k in enumerate(scanned.first_occurrences())}
    for key, c in choices.items():
        assert isinstance(c, DeltaChoice) and c.encoding.is_delta
        assert c.base != key and c.base[1] == key[1] and order[c.base] < order[key]
        depth, cur = 0, key
        while cur in choices:
            cur = choices[cur].base
            depth += 1
            assert depth <= max_depth
        assert depth == c.depth


def encode_all(scanned, choices: dict) -> dict:
    """Encode every planned delta, check it decodes exactly; actual stored sizes."""
    firsts = scanned.first_occurrences()
    sizes = {}
    with TensorBytes(scanned) as read:
        for key, c in choices.items():
            data, base = read(firsts[key]), read(firsts[c.base])
            stored = encode_delta(c.encoding, data, base, width=c.width, shape=c.shape)
            out = decode_delta(c.encoding, stored, len(data), base)
            assert np.array_equal(out, data)
            sizes[key] = len(stored)
    return sizes


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    pytest.importorskip("torch")
    return dh.shared_family(tmp_path_factory)


def test_plan_on_real_fine_tunes(family):
    scanned = scan(family)
    plan = plan_deltas(scanned)
    choices = plan.choices
    check_chains(scanned, choices, MAX_DELTA_DEPTH)
    firsts = scanned.first_occurrences()
    by = {(h.record.model, h.record.name): h.key for h in firsts.values()}
    # The first model is self-contained; copies need nothing.
    assert not any(firsts[k].record.model in ("base", "copy") for k in choices)
    emb = choices[by[("ft", "embed.weight")]]
    assert emb.encoding is E.DECAY_SUB_BYTEPLANE_ZSTD and emb.base == by[("base", "embed.weight")]
    up = choices[by[("ft", "up.weight")]]
    assert up.base == by[("base", "up.weight")] and up.shape == (dh.HIDDEN, dh.DIM)
    lora = choices[by[("lora", "up.weight")]]
    assert lora.encoding is E.LOWRANK_SUB_BYTEPLANE_ZSTD
    assert lora.base == by[("base", "up.weight")]
    # Same batches, nothing frozen in the layers: ft-frozen's layers are closest to ft's.
    assert choices[by[("ft-frozen", "up.weight")]].base == by[("ft", "up.weight")]
    sizes = encode_all(scanned, choices)
    for key, c in choices.items():
        assert c.estimated_bytes < c.self_estimated_bytes
        assert 0.6 < sizes[key] / c.estimated_bytes < 1.6, (firsts[key].record.name, c)
    assert plan.estimated_bytes < plan.self_estimated_bytes
    assert choose_bases(scanned) == choices


def test_renamed_tensors_pair_by_shape(family, tmp_path):
    """A fine-tune stored under llama.cpp-style names finds the HF-named base tensors."""
    from safetensors.numpy import load_file

    names = {"embed.weight": "token_embd.weight", "norm.weight": "blk.0.attn_norm.weight",
             "norm.bias": "blk.0.attn_norm.bias", "up.weight": "blk.0.ffn_up.weight",
             "up.bias": "blk.0.ffn_up.bias", "down.weight": "blk.0.ffn_down.weight",
             "down.bias": "blk.0.ffn_down.bias"}
    ft = load_file(family["ft"])
    renamed = factory.make_safetensors(tmp_path / "renamed.safetensors",
                                       {names[k]: v for k, v in ft.items()})
    scanned = scan({"base": family["base"], "renamed": renamed})
    choices = choose_bases(scanned)
    check_chains(scanned, choices, MAX_DELTA_DEPTH)
    firsts = scanned.first_occurrences()
    pairs = {firsts[k].record.name: firsts[c.base].record.name for k, c in choices.items()}
    back = {v: k for k, v in names.items()}
    assert pairs and all(back[t] == b for t, b in pairs.items()), pairs
    assert "blk.0.ffn_up.weight" in pairs and "token_embd.weight" in pairs


@pytest.mark.parametrize("max_depth", [1, 2, MAX_DELTA_DEPTH])
def test_chain_of_checkpoints_respects_depth(tmp_path, max_depth):
    """Checkpoints saved after each of 8 training steps: each is closest to the previous
    one, so the planner would chain them all; chains stop at ``max_depth``."""
    pytest.importorskip("torch")
    m = dh._model(0)
    paths = {}
    for step in range(8):
        dh.train(m, 1, seed=step, lr=1e-4)
        paths[f"step{step}"] = factory.make_safetensors(tmp_path / f"s{step}.safetensors",
                                                        dh.state(m))
    scanned = scan(paths)
    choices = choose_bases(scanned, max_depth=max_depth)
    check_chains(scanned, choices, max_depth)
    assert max(c.depth for c in choices.values()) == max_depth
    encode_all(scanned, choices)


def test_no_pairing_across_dtypes_or_lengths(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64)).astype(np.float32)
    paths = {
        "f32": factory.make_safetensors(tmp_path / "a.safetensors", {"w": a}),
        "f16": factory.make_safetensors(tmp_path / "b.safetensors", {"w": a.astype(np.float16)}),
        "short": factory.make_safetensors(tmp_path / "c.safetensors", {"w": a[:32]}),
        "i32": factory.make_safetensors(tmp_path / "d.safetensors", {"w": a.view(np.int32) + 1}),
    }
    assert choose_bases(scan(paths)) == {}


def test_element_width():
    assert [element_width(d) for d in ("F32", "F16", "BF16", "I64", "U8", "Q4_1", "Q8_0")] \
        == [4, 2, 2, 8, 1, 1, 1]


def test_sparse_and_sign_drift_pick_the_right_plain_encoding(tmp_path):
    """Flipped signs are cheapest as XOR; small moves as a zigzagged difference."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((256, 256)) * 0.05).astype(np.float32)
    signs = w.copy()
    signs[rng.random(w.shape) < 0.3] *= -1
    moved = (w + rng.standard_normal(w.shape).astype(np.float32) * 1e-5).astype(np.float32)
    paths = {"w": factory.make_safetensors(tmp_path / "w.safetensors", {"x": w}),
             "signs": factory.make_safetensors(tmp_path / "s.safetensors", {"x": signs}),
             "moved": factory.make_safetensors(tmp_path / "m.safetensors", {"x": moved})}
    scanned = scan(paths)
    choices = choose_bases(scanned)
    firsts = scanned.first_occurrences()
    enc = {firsts[k].record.model: c.encoding for k, c in choices.items()}
    assert enc["signs"] is E.XOR_BYTEPLANE_ZSTD
    assert enc["moved"] is E.ZIGZAG_SUB_BYTEPLANE_ZSTD
    encode_all(scanned, choices)


@pytest.mark.corpus
def plain_byteplane_zstd(data, width: int, level: int = 3) -> int:
    """Size of the issue's baseline codec: each byte plane as a zstd frame at ``level``."""
    comp = zstandard.ZstdCompressor(level=level)
    return sum(len(comp.compress(p)) for p in codecs.split_planes(data, width))


def test_corpus_minilm_family_beats_both_baselines(corpus):
    """The MiniLM family: deltas against the planned bases make the distinct tensors at
    least 1.15x smaller than (a) distinct tensors in byte planes and (b) every tensor
    XORed with the first model's same-name tensor, in byte planes, each plane a zstd-3
    frame (the baselines as the issue states them). With the baselines given our own
    tuned plane settings too the margin is 1.147x (bench/RESULTS.md ## delta); that is
    asserted separately so that a regression in either shows."""
    names = ["base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged"]
    scanned = scan({n: corpus / "minilm" / n for n in names})
    choices = choose_bases(scanned)
    check_chains(scanned, choices, MAX_DELTA_DEPTH)
    firsts = scanned.first_occurrences()
    kinds = [c.encoding for c in choices.values()]
    assert kinds.count(E.LOWRANK_SUB_BYTEPLANE_ZSTD) == 12  # every merged query/value
    assert kinds.count(E.DECAY_SUB_BYTEPLANE_ZSTD) >= 1  # ft-full's word embeddings
    first = {h.record.name: h for h in scanned.hashed["base"]}
    a = b = a_tuned = b_tuned = ours = 0
    with TensorBytes(scanned) as read:
        for key, h in firsts.items():
            data, w = read(h), plane_width(h)
            own = len(codecs.byteplane_compress(data, w))
            own_plain = plain_byteplane_zstd(data, w)
            a += own_plain
            a_tuned += own
            ref = first.get(h.record.name)
            if ref is not None and ref.key != key and ref.record.length == key[1]:
                xor = np.bitwise_xor(data, read(ref))
                b += plain_byteplane_zstd(xor, w)
                b_tuned += len(codecs.byteplane_compress(xor, w))
            else:
                b += own_plain
                b_tuned += own
            c = choices.get(key)
            if c is not None:
                own = min(own, len(encode_delta(c.encoding, data, read(firsts[c.base]),
                                                width=c.width, shape=c.shape)))
            ours += own
    assert min(a, b) / ours >= 1.15, (a, b, ours)
    assert min(a_tuned, b_tuned) / ours >= 1.14, (a_tuned, b_tuned, ours)


def test_a_file_truncated_after_hashing_is_one_error_not_sigbus(tmp_path):
    """The planners and the drift report read samples by offset: a model file another
    process truncates after it was hashed gives an InputError naming it (a map of it
    killed the process with SIGBUS: no message, temporaries left behind). Run in a child
    process, so that a regression cannot take the test run down with it."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 256)) * 0.05).astype(np.float32)
    versions = {"a": {"w": x, "v": x[0].copy()},
                "b": {"w": x + np.float32(1e-4), "v": x[0] * np.float32(2)},
                "c": {"w": x.astype(np.float16), "v": x[0].astype(np.float16)}}
    for n, tensors in versions.items():
        factory.make_safetensors(tmp_path / f"{n}.orig", tensors)
    code = """
import shutil, sys
from tdedup.analyzers.scan import ScannedModels, hash_models, index_models
from tdedup.analyzers.delta_planning import plan_deltas
from tdedup.analyzers.derivation import plan_derived
from tdedup.analyzers.drift import compute_drift
from tdedup.errors import InputError
d = sys.argv[1]
locate = ScannedModels.locate
for step, fn in (("deltas", plan_deltas), ("derived", plan_derived), ("drift", compute_drift)):
    for n in "abc":
        shutil.copy(f"{d}/{n}.orig", f"{d}/{n}.safetensors")
    scanned = hash_models(index_models([f"{n}={d}/{n}.safetensors" for n in "abc"]))
    seen = []

    def locate_then_truncate(self, h, seen=seen):
        # A second read of b or c truncates both: after a first read opened (or mapped)
        # the file, as a trainer rewriting it would.
        path = locate(self, h)[0]
        if path.name[0] in "bc":
            seen.append(path)
            if seen.count(path) == 2:
                for n in "bc":
                    with open(f"{d}/{n}.safetensors", "r+b") as f:
                        f.truncate(200)
        return locate(self, h)
    ScannedModels.locate = locate_then_truncate
    try:
        fn(scanned)
        print(step, "no error")
    except InputError as e:
        print(step, "changed while" in str(e) and ".safetensors" in str(e))
"""
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])  # -7: SIGBUS
    assert res.stdout.split() == ["deltas", "True", "derived", "True", "drift", "True"]

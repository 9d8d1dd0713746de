"""The drift report: per-slot and per-layer metrics of differing tensors on checkpoints
made by real AdamW steps, sampling of large tensors, layer names, JSON and table output,
and the corpus MiniLM family."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from helpers import delta_helpers as dh
from helpers import factory
from tdedup.analyzers import drift as D
from tdedup.analyzers.drift import compute_drift, layer_of
from tdedup.cli.analyze_render import drift_table
from tdedup.analyzers.scan import hash_models, index_models


def scan(paths: dict):
    return hash_models(index_models([f"{k}={v}" for k, v in paths.items()]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")
    return compute_drift(scan(dh.shared_family(tmp_path_factory)))


def test_models_and_slots_on_real_fine_tunes(report):
    models = {m.model: m for m in report.models}
    assert models["base"].new == models["base"].slots == 7
    assert models["copy"].identical == 7
    assert models["ft"].differing == 7  # AdamW moves every parameter (decay included)
    frozen = models["ft-frozen"]
    assert (frozen.identical, frozen.differing) == (3, 4)  # embed, norm.weight, norm.bias
    assert (models["lora"].identical, models["lora"].differing) == (6, 1)
    slots = {(s.model, s.name): s for s in report.slots}
    assert slots[("lora", "up.weight")].reference == "base"
    assert slots[("ft-frozen", "up.weight")].reference == "base"
    emb = slots[("ft", "embed.weight")]
    # Decay touches every element, but only the low bits of most: plane 3 (sign and
    # exponent) almost never changes, plane 0 almost always does.
    assert emb.elements_changed > 0.99 and emb.planes_changed[3] < 0.05
    assert emb.planes_changed[0] > 0.9 and len(emb.planes_changed) == 4
    assert 0 < emb.rel_l2 < 0.05 and emb.max_abs_diff > 0
    assert 0 < emb.bytes_changed < emb.elements_changed
    up = slots[("ft", "up.weight")]
    assert up.rel_l2 > emb.rel_l2  # gradient steps move more than decay alone
    for s in report.slots:
        assert 0 <= s.bytes_changed <= s.elements_changed <= 1
        assert not s.sampled  # every tensor of this family is small


def test_layers_and_estimate(report):
    layers = {(g.model, g.layer): g for g in report.layers}
    assert layers[("ft", "embed")].tensors == 1 and layers[("ft", "up")].tensors == 2
    g = layers[("ft", "up")]
    slots = [s for s in report.slots if s.model == "ft" and s.layer == "up"]
    assert g.bytes == sum(s.bytes for s in slots)
    e = report.estimate
    assert e["with_deltas_bytes"] < e["without_deltas_bytes"] <= e["distinct_tensor_bytes"]
    assert e["delta_blobs"] == sum(e["delta_encodings"].values()) > 0


def test_to_dict_is_plain_json(report):
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert "_d2" not in text and "_r2" not in text
    assert set(d) == {"models", "layers", "slots", "estimate"}
    assert {"bytes_changed", "elements_changed", "planes_changed", "rel_l2",
            "sampled"} <= set(d["slots"][0])


def test_drift_table_renders(report):
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200).print(drift_table(report))
    text = out.getvalue()
    assert "ft-frozen" in text and "estimated bundle tensors" in text


@pytest.mark.parametrize("name,layer", [
    ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
    ("blk.12.attn_q.weight", "blk.12"), ("model.layers.0.mlp.up_proj.weight", "model.layers.0"),
    ("transformer.h.5.attn.c_attn.weight", "transformer.h.5"),
    ("down_blocks.1.resnets.0.conv1.weight", "down_blocks.1"),
    ("embeddings.word_embeddings.weight", "embeddings"), ("lm_head.weight", "lm_head"),
    ("token_embd.weight", "token_embd")])
def test_layer_names(name, layer):
    assert layer_of(name) == layer


def test_large_tensors_are_sampled(tmp_path):
    """Above SAMPLE_ABOVE elements the metrics come from a sample and stay close."""
    rng = np.random.default_rng(0)
    n = D.SAMPLE_ABOVE * 4
    a = (rng.standard_normal(n) * 0.05).astype(np.float32)
    b = a.copy()
    hit = rng.random(n) < 0.1
    b[hit] += np.float32(0.01)
    half = a.astype(np.float16)
    half2 = half.copy()
    half2[hit] = -half2[hit]
    paths = {"a": factory.make_safetensors(tmp_path / "a.safetensors", {"w": a, "h": half}),
             "b": factory.make_safetensors(tmp_path / "b.safetensors", {"w": b, "h": half2})}
    r = compute_drift(scan(paths), estimate=False)
    assert r.estimate == {}
    s = {x.name: x for x in r.slots}
    assert s["w"].sampled and abs(s["w"].elements_changed - hit.mean()) < 0.02
    want = np.linalg.norm(b.astype(np.float64) - a) / np.linalg.norm(a.astype(np.float64))
    assert abs(s["w"].rel_l2 / want - 1) < 0.1
    # F16 sign flips: only the high plane changes.
    h = s["h"]
    assert len(h.planes_changed) == 2 and h.planes_changed[0] == 0
    assert abs(h.planes_changed[1] - hit.mean()) < 0.02


def test_a_layers_l2_weighs_sampled_tensors_as_whole_ones(tmp_path):
    """A layer's relative L2 sums whole tensors: a sampled tensor's sums are scaled up to
    its size (they were added as they were, so small unsampled tensors dominated), and a
    layer whose reference is all zeros has an infinite one (reported as null), not 0."""
    rng = np.random.default_rng(1)
    big = (rng.standard_normal(D.SAMPLE_ABOVE * 8) * 0.05).astype(np.float32)
    small = (rng.standard_normal(64) * 0.05).astype(np.float32)
    big2 = big + (rng.standard_normal(big.size) * 1e-3).astype(np.float32)
    small2 = small * np.float32(1.5)
    paths = {"a": factory.make_safetensors(tmp_path / "a.safetensors", {
                 "layers.0.big": big, "layers.0.small": small, "layers.1.b": np.zeros(16, np.float32)}),
             "b": factory.make_safetensors(tmp_path / "b.safetensors", {
                 "layers.0.big": big2, "layers.0.small": small2, "layers.1.b": np.ones(16, np.float32)})}
    r = compute_drift(scan(paths), estimate=False)
    layers = {g.layer: g for g in r.layers}
    whole = np.concatenate([big2 - big, small2 - small]).astype(np.float64)
    ref = np.concatenate([big, small]).astype(np.float64)
    want = np.linalg.norm(whole) / np.linalg.norm(ref)
    assert abs(layers["layers.0"].rel_l2 / want - 1) < 0.05, (layers["layers.0"].rel_l2, want)
    assert layers["layers.1"].rel_l2 == float("inf")
    assert r.to_dict()["layers"][1]["rel_l2"] is None


def test_non_float_slots_have_no_l2(tmp_path):
    paths = {"a": factory.make_safetensors(tmp_path / "a.safetensors",
                                           {"i": np.arange(100, dtype=np.int64)}),
             "b": factory.make_safetensors(tmp_path / "b.safetensors",
                                           {"i": np.arange(100, dtype=np.int64) * 2})}
    (slot,) = compute_drift(scan(paths)).slots
    assert slot.rel_l2 is None and slot.max_abs_diff is None and len(slot.planes_changed) == 8


@pytest.mark.corpus
def test_corpus_minilm_family(corpus, corpus_facts):
    names = ["base", "dup-pkg", "resaved", "ft-freeze", "ft-full", "ft-lora-merged"]
    r = compute_drift(scan({n: corpus / "minilm" / n for n in names}))
    models = {m.model: m for m in r.models}
    pairs = {(p["a"], p["b"]): p for p in corpus_facts["pairs"]}
    for name in ("ft-freeze", "ft-lora-merged"):
        assert models[name].identical == pairs[("minilm/base", f"minilm/{name}")][
            "identical_tensors"]
    assert models["ft-lora-merged"].differing == 12
    assert models["dup-pkg"].differing == models["resaved"].differing == 0
    slots = {(s.model, s.name): s for s in r.slots}
    emb = slots[("ft-full", "embeddings.word_embeddings.weight")]
    assert emb.sampled and emb.elements_changed > 0.99 and emb.planes_changed[3] < 0.01
    layers = {(g.model, g.layer) for g in r.layers}
    assert ("ft-freeze", "encoder.layer.3") in layers
    assert ("ft-freeze", "encoder.layer.0") not in layers  # frozen
    e = r.estimate
    assert e["with_deltas_bytes"] < 0.7 * e["without_deltas_bytes"]

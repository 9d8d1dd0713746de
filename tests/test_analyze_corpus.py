"""``tdedup analyze`` on the real-checkpoint corpus (skipped when it is not built): the
relationships the corpus is built to have must all be found."""

from __future__ import annotations

import filecmp
import json

import pytest
from typer.testing import CliRunner

from tdedup.cli.app import app

pytestmark = pytest.mark.corpus


def model_name(entry: str) -> str:
    return entry.replace("/", "-")


@pytest.fixture(scope="module")
def report(corpus, corpus_facts) -> dict:
    """One analyze of every corpus entry, as JSON."""
    args = [f"{model_name(e)}={corpus / e}" for e in corpus_facts["models"]]
    result = CliRunner().invoke(app, ["analyze", "--json", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _model(report, entry):
    (m,) = [m for m in report["models"] if m["name"] == model_name(entry)]
    return m


def _pair(report, a, b):
    names = {model_name(a), model_name(b)}
    (p,) = [p for p in report["pairs"] if {p["a"], p["b"]} == names]
    return p


def test_published_copies_fully_shared(report):
    base, dup = _model(report, "minilm/base"), _model(report, "minilm/dup-pkg")
    p = _pair(report, "minilm/base", "minilm/dup-pkg")
    assert p["shared_tensors"] == base["tensors"] == dup["tensors"] == 104
    assert p["shared_bytes"] == base["tensor_bytes"] == dup["tensor_bytes"]


def test_resaved_fully_shared_though_file_bytes_differ(report, corpus):
    assert not filecmp.cmp(corpus / "minilm/base/model.safetensors",
                           corpus / "minilm/resaved/model.safetensors", shallow=False)
    resaved = _model(report, "minilm/resaved")
    assert resaved["unique_bytes"] == 0
    p = _pair(report, "minilm/base", "minilm/resaved")
    assert p["shared_tensors"] == resaved["tensors"] == 103
    assert p["shared_bytes"] == resaved["tensor_bytes"]
    assert _pair(report, "minilm/resaved", "minilm/sharded")["shared_bytes"] == \
        resaved["tensor_bytes"]


def test_frozen_fine_tune_shares_its_frozen_layers(report):
    p = _pair(report, "minilm/base", "minilm/ft-freeze")
    assert p["shared_tensors"] == 55
    names = {o["name"] for g in report["groups"]
             if {model_name("minilm/base"), model_name("minilm/ft-freeze")} <= set(g["models"])
             for o in g["occurrences"] if o["model"] == model_name("minilm/ft-freeze")}
    assert {n.split(".")[0] for n in names} == {"embeddings", "encoder", "pooler"}
    assert not any(n.startswith(("encoder.layer.3.", "encoder.layer.5.")) for n in names)


def test_f32_gguf_shares_all_its_tensors_with_safetensors(report):
    p = _pair(report, "minilm/base", "minilm-gguf/f32.gguf")
    assert p["shared_tensors"] == 101
    assert p["shared_bytes"] == _model(report, "minilm-gguf/f32.gguf")["tensor_bytes"]


def test_retagged_gguf_fully_shared_though_offsets_moved(report, corpus_facts):
    facts = corpus_facts["models"]
    assert facts["smollm/q4_1.gguf"]["data_offset"] != \
        facts["smollm/q4_1-retagged.gguf"]["data_offset"]
    p = _pair(report, "smollm/q4_1.gguf", "smollm/q4_1-retagged.gguf")
    q4 = _model(report, "smollm/q4_1.gguf")
    assert p["shared_tensors"] == q4["tensors"] == 272
    assert p["shared_bytes"] == q4["tensor_bytes"]


def test_unrelated_model_shares_nothing(report):
    m = _model(report, "wordllama/l2_supercat_256.safetensors")
    assert m["shared_bytes"] == 0 and m["unique_bytes"] == m["tensor_bytes"] > 0


def test_agrees_with_facts(report, corpus_facts):
    """Every count FACTS.json measured independently (with its own hashing)."""
    for entry, facts in corpus_facts["models"].items():
        m = _model(report, entry)
        assert (m["tensors"], m["tensor_bytes"]) == (facts["tensors"], facts["tensor_bytes"])
        assert m["shared_bytes"] == facts["bytes_shared_with_other_entries"], entry
    corpus = corpus_facts["corpus"]
    assert report["total_tensor_bytes"] == corpus["tensor_bytes"]
    assert report["distinct_tensor_bytes"] == corpus["unique_tensor_bytes"]
    for p in corpus_facts["pairs"]:
        if "*" in (p["a"], p["b"]):  # "shares nothing with anything": tested above
            continue
        ours = _pair(report, p["a"], p["b"])
        assert ours["shared_bytes"] == p["identical_bytes"], (p["a"], p["b"])


def test_markdown_summary_of_the_corpus(corpus, tmp_path):
    md = tmp_path / "summary.md"
    args = [str(corpus / "minilm/base"), str(corpus / "minilm/dup-pkg")]
    result = CliRunner().invoke(app, ["analyze", "--markdown", str(md),
                                      "--min-dedup-ratio", "1.9", *args])
    assert result.exit_code == 0, result.stderr
    text = md.read_text()
    assert "**Passed**: dedup ratio 2x >= required 1.9x" in text and "| base |" in text

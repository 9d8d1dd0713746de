"""Session fixtures: the real-checkpoint corpus (skipped when not built) and small real
checkpoint families built once per session with ``tests/factory.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import factory, hostile_helpers

# .ci/run: the same examples on every run, so that whether a change lands is never decided
# by a draw (a latent property failure found by chance blocked a landing once). Local runs
# keep drawing new examples and replay past failures from .hypothesis/.
settings.register_profile("ci", derandomize=True)
if os.environ.get("TDEDUP_CI"):
    settings.load_profile("ci")

CORPUS = Path(os.environ.get("TDEDUP_CORPUS") or Path.home() / ".cache" / "tdedup-corpus")


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Root of the corpus built by shared/corpus/build.sh; skips the test when absent."""
    if not (CORPUS / "MANIFEST.sha256").is_file():
        pytest.skip(f"real-checkpoint corpus not built at {CORPUS}; "
                    "run shared/corpus/build.sh (or set TDEDUP_CORPUS)")
    return CORPUS


@pytest.fixture(scope="session")
def corpus_facts(corpus) -> dict:
    """The corpus's FACTS.json (descriptive counts, see shared/corpus/README.md)."""
    return json.loads((corpus / "FACTS.json").read_text())


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    """Folders saved by transformers: base, finetune, frozen, resaved, sharded."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return factory.make_bert_family(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def diffusers_pipeline(tmp_path_factory) -> Path:
    """A tiny DDPM pipeline folder saved by diffusers (model_index.json, unet/, scheduler/)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return factory.make_diffusers_pipeline(tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="session")
def gguf_family(tmp_path_factory) -> dict[str, Path]:
    """GGUF files written by gguf.GGUFWriter from the same tensors:

    - ``f32``: every tensor F32, with a vocabulary (``factory.DEFAULT_VOCAB``);
    - ``q8_0``: the 2-D tensors quantized to Q8_0 (1-D tensors kept F32);
    - ``retagged``: ``f32``'s tensors under another name and vocabulary, so the tensor
      data starts at another offset;
    - ``split``: the first part of ``f32``'s tensors split in parts of 2 tensors;
    - ``safetensors``: the same tensors in a safetensors file.
    """
    import gguf

    root = tmp_path_factory.mktemp("gguf")
    tensors = factory.random_tensors(7, {
        "token_embd.weight": (64, 32), "blk.0.attn_q.weight": (32, 32),
        "blk.0.attn_norm.weight": (32,), "blk.0.ffn_up.weight": (64, 32),
        "output_norm.weight": (32,)})
    q8 = {n: gguf.GGMLQuantizationType.Q8_0 for n, a in tensors.items() if a.ndim == 2}
    return {
        "f32": factory.make_gguf(root / "f32.gguf", tensors, vocab=factory.DEFAULT_VOCAB,
                                 name="tiny"),
        "q8_0": factory.make_gguf(root / "q8_0.gguf", tensors, quantize=q8, name="tiny"),
        "retagged": factory.make_gguf(root / "retagged.gguf", tensors, name="tiny, retagged",
                                      vocab=factory.DEFAULT_VOCAB + ["extra"] * 10),
        "split": factory.make_split_gguf(root / "split" / "tiny.gguf", tensors, 2)[0],
        "safetensors": factory.make_safetensors(root / "tiny.safetensors", tensors),
    }


@pytest.fixture(scope="session")
def nested_family(tmp_path_factory) -> dict[str, Path]:
    """The tiny family with a nested folder in its base (``hostile_helpers``): for unpack's
    output checks. Read only: tests copy it before changing anything."""
    return hostile_helpers.make_nested_family(tmp_path_factory.mktemp("nested"))


@pytest.fixture(scope="session")
def nested_bundle(nested_family, tmp_path_factory) -> Path:
    """A bundle of ``nested_family``'s base and tuned models. Read only."""
    return hostile_helpers.pack_base_tuned(nested_family,
                                           tmp_path_factory.mktemp("nested-b") / "fam.tdd")

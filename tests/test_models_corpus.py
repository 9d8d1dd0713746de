"""Models from a bundle against the originals, on the real MiniLM checkpoints of the corpus
(issue 11): ``tdedup.from_bundle`` with default arguments gives ``torch.equal`` outputs
to ``AutoModel.from_pretrained`` on each original folder; the meta-device recipe leaves
nothing on ``meta``; a config naming a head the checkpoint lacks loads as the base model;
a weights-only file loads with an explicit config; shared parameters are one storage and
frozen; ``tdedup.sentence_transformer(...).encode`` equals the original's.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tdedup  # noqa: E402
from tdedup.errors import LoadError, ModuleMismatchError  # noqa: E402

FOLDERS = ("base", "dup-pkg", "resaved", "sharded", "ft-freeze", "ft-full", "ft-lora-merged")
FILES = ("f16.safetensors", "bf16.safetensors")  # weights only: no config.json
SENTENCES = ["Deduplicated tensors load once.", "A second, longer sentence here."]


@pytest.fixture(scope="module")
def minilm(corpus, tmp_path_factory):
    """Every MiniLM variant in one bundle, loaded on the CPU, and the originals' paths."""
    root = corpus / "minilm"
    paths = {n: root / n for n in (*FOLDERS, *FILES)}
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        pytest.skip(f"corpus lacks minilm/{', minilm/'.join(missing)}")
    # base with a config naming a head (BertForMaskedLM) whose weights it does not ship.
    head = tmp_path_factory.mktemp("head") / "head"
    head.mkdir()
    config = json.loads((root / "base" / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**config,
                                                   "architectures": ["BertForMaskedLM"]}))
    shutil.copy(root / "base" / "model.safetensors", head / "model.safetensors")
    paths["head"] = head
    bundle = tmp_path_factory.mktemp("bundle") / "minilm.tdd"
    tdedup.pack([f"{n}={p}" for n, p in paths.items()], bundle)
    return tdedup.load(bundle, device="cpu"), paths


@pytest.fixture(scope="module")
def batch(minilm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm[1]["base"])(SENTENCES, padding=True,
                                                            return_tensors="pt")


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_every_variant_equals_from_pretrained(minilm, batch):
    from transformers import AutoModel

    loaded, paths = minilm
    for name in FOLDERS:
        model = tdedup.from_bundle(loaded, name)
        ref = AutoModel.from_pretrained(paths[name]).eval()
        assert type(model) is type(ref) and not model.training
        assert torch.equal(hidden(model, batch), hidden(ref, batch)), name
        assert not [k for k, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_meta]


def test_meta_device_recipe(minilm, batch):
    """The README's recipe: a module built under torch.device("meta"), then load_into;
    base ships position_ids (a non-persistent buffer), resaved does not."""
    from transformers import AutoConfig, AutoModel, BertModel

    loaded, paths = minilm
    for name in ("base", "resaved"):
        with torch.device("meta"):
            model = BertModel(AutoConfig.from_pretrained(paths[name]))
        tdedup.load_into(model, loaded, name)
        assert not [k for k, t in model.named_buffers() if t.is_meta]
        assert not [k for k, t in model.named_parameters() if t.is_meta or t.requires_grad]
        ref = AutoModel.from_pretrained(paths[name]).eval()
        assert torch.equal(hidden(model.eval(), batch), hidden(ref, batch)), name


def test_head_the_checkpoint_lacks_loads_base_model(minilm, batch):
    from transformers import AutoModel, BertForMaskedLM

    loaded, paths = minilm
    with pytest.warns(UserWarning, match="BertForMaskedLM .* lacks cls.*built BertModel"):
        model = tdedup.from_bundle(loaded, "head")  # config: BertForMaskedLM, no cls.* tensors
    assert type(model).__name__ == "BertModel"
    ref = AutoModel.from_pretrained(paths["base"]).eval()
    assert torch.equal(hidden(model, batch), hidden(ref, batch))
    with pytest.raises(ModuleMismatchError, match="lacks tensors") as e:
        tdedup.from_bundle(loaded, "head", cls=BertForMaskedLM)
    assert "cls=" in e.value.hint and any(k.startswith("cls.") for k in e.value.on_meta)


def test_weights_only_with_explicit_config(minilm, batch, tmp_path):
    from transformers import AutoConfig, AutoModel

    loaded, paths = minilm
    with pytest.raises(LoadError, match="no config.json") as e:
        tdedup.from_bundle(loaded, "f16.safetensors")
    assert "config=" in e.value.hint
    for name in FILES:
        # The original: the same file next to base's config, loaded by transformers.
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(paths["base"] / "config.json", folder / "config.json")
        shutil.copy(paths[name], folder / "model.safetensors")
        ref = AutoModel.from_pretrained(folder, dtype="auto").eval()
        for config in (paths["base"], AutoConfig.from_pretrained(paths["base"])):
            model = tdedup.from_bundle(loaded, name, config=config)
            assert model.embeddings.word_embeddings.weight.dtype == ref.dtype != torch.float32
            assert torch.equal(hidden(model, batch), hidden(ref, batch)), name


def test_shared_parameters_are_one_frozen_storage(minilm, batch):
    loaded, _ = minilm
    base, dup, ft = (tdedup.from_bundle(loaded, n) for n in ("base", "dup-pkg", "ft-freeze"))
    pb, pd, pf = (dict(m.named_parameters()) for m in (base, dup, ft))
    assert all(pb[k].data_ptr() == pd[k].data_ptr() for k in pb)
    shared = [k for k in pb if pb[k].data_ptr() == pf[k].data_ptr()]
    assert len(shared) == 55  # embeddings, layers 0-2 (frozen), the pooler (no gradient)
    assert not any(p.requires_grad for m in (base, dup, ft) for p in m.parameters())
    # A private copy trains without touching the others.
    before = hidden(dup, batch)
    own = tdedup.private(base)
    po = dict(own.named_parameters())
    assert all(p.requires_grad and p.data_ptr() != pb[k].data_ptr() for k, p in po.items())
    with torch.no_grad():
        po["embeddings.word_embeddings.weight"].add_(1.0)
    assert torch.equal(hidden(dup, batch), before)
    assert not torch.equal(hidden(own.eval(), batch), before)


def test_sentence_transformer_encode(minilm):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    loaded, paths = minilm
    models = {}
    for name in ("base", "dup-pkg"):  # both ship modules.json, pooling and normalization
        model = tdedup.sentence_transformer(loaded, name)
        ref = SentenceTransformer(str(paths[name]), device="cpu")
        assert torch.equal(model.encode(SENTENCES, convert_to_tensor=True),
                           ref.encode(SENTENCES, convert_to_tensor=True)), name
        assert model.similarity_fn_name == ref.similarity_fn_name
        assert model.max_seq_length == ref.max_seq_length
        models[name] = dict(model.named_parameters())
    a, b = models["base"], models["dup-pkg"]
    assert a and all(a[k].data_ptr() == b[k].data_ptr() for k in a)
    from_path = tdedup.sentence_transformer(loaded.path, "base", device="cpu")
    assert torch.equal(from_path.encode(SENTENCES, convert_to_tensor=True),
                       model.encode(SENTENCES, convert_to_tensor=True))
    with pytest.raises(LoadError, match="no modules.json"):
        tdedup.sentence_transformer(loaded, "resaved")


def test_any_model_provider(minilm, batch):
    """The integrations need only [name], files(name) and read_file(name, path): a
    registry with that interface serves them as a loaded bundle does."""
    loaded, _ = minilm

    class Registry:
        def __getitem__(self, name):
            return loaded[name]

        def files(self, name):
            return loaded.files(name)

        def read_file(self, name, path):
            return loaded.read_file(name, path)

    model = tdedup.from_bundle(Registry(), "sharded")
    assert torch.equal(hidden(model, batch), hidden(tdedup.from_bundle(loaded, "base"), batch))
    with pytest.raises(LoadError, match="not a bundle path nor a loaded bundle"):
        tdedup.from_bundle(object(), "base")


def test_bundle_path_and_dtype(minilm, batch):
    loaded, paths = minilm
    model = tdedup.from_bundle(loaded.path, "ft-freeze", device="cpu")
    assert torch.equal(hidden(model, batch), hidden(tdedup.from_bundle(loaded, "ft-freeze"),
                                                     batch))
    a, b = (tdedup.from_bundle(loaded, n, dtype=torch.bfloat16) for n in ("base", "dup-pkg"))
    wa, wb = (m.embeddings.word_embeddings.weight for m in (a, b))
    assert wa.dtype == torch.bfloat16 and wa.data_ptr() == wb.data_ptr()  # converted once
    assert a.embeddings.position_ids.dtype == torch.int64

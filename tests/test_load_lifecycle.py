"""Loaded models over time, on the CPU with tiny factory models: a ``Registry``'s models
loaded, converted, replaced and unloaded (conversions keyed by content, a name that is
one model at a time, bundles rebuilt in place, memory given back), what a selection of
models means, and tensors read by the keys a load gives them.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tdedup  # noqa: E402
from tdedup.errors import (  # noqa: E402
    AmbiguousNameError,
    BundleChangedError,
    ModelNotFoundError,
    UsageError,
)
from tdedup.loaders import placement, registry  # noqa: E402


def pack(out: Path, sources: dict[str, Path], **kw) -> Path:
    tdedup.pack([f"{n}={p}" for n, p in sources.items()], out, **kw)
    return out


@pytest.fixture(scope="module")
def family_bundle(bert_family, tmp_path_factory) -> Path:
    names = ("base", "finetune", "frozen")
    return pack(tmp_path_factory.mktemp("lifecycle") / "fam.tdd",
                {n: bert_family[n] for n in names})


# -- conversions (from_bundle's dtype= and device=) ------------------------------------

def test_dtype_conversions_follow_content_not_addresses(family_bundle):
    """Load, convert, unload in a loop: freed blobs' addresses are reused by the next
    model, whose parameters must still be its own tensors converted (a cache keyed by
    address gave later models a former model's tensors)."""
    pytest.importorskip("transformers")
    reg = tdedup.Registry(device="cpu")
    for i in range(6):
        name = ("finetune", "frozen", "base")[i % 3]
        reg.load(family_bundle, [name])
        model = tdedup.from_bundle(reg, name, dtype=torch.bfloat16)
        params = model.state_dict()
        checked = 0
        for key, t in reg[name].items():
            if key in params and t.is_floating_point():
                assert torch.equal(params[key], t.to(torch.bfloat16)), (i, name, key)
                checked += 1
        assert checked > 20
        del model, params
        reg.unload(name)
        gc.collect()


def test_converted_tensors_are_shared_then_freed_with_the_models(family_bundle):
    pytest.importorskip("transformers")
    from tdedup.loaders.transformers import convert_state

    reg = tdedup.Registry(device="cpu")
    reg.load(family_bundle, ["base", "frozen"])
    a = convert_state(reg, "base", reg["base"], torch.bfloat16, None)
    b = convert_state(reg, "frozen", reg["frozen"], torch.bfloat16, None)
    shared = [k for k, t in reg["base"].items()
              if t.data_ptr() == reg["frozen"][k].data_ptr() and t.is_floating_point()]
    assert shared and all(a[k] is b[k] and a[k].dtype == torch.bfloat16 for k in shared)
    assert a["encoder.layer.1.output.dense.weight"] is not \
        b["encoder.layer.1.output.dense.weight"]  # fine-tuned: another content
    model = tdedup.from_bundle(reg, "base", dtype=torch.bfloat16)  # the same copies
    assert model.embeddings.word_embeddings.weight.data_ptr() == \
        a["embeddings.word_embeddings.weight"].data_ptr()
    refs = [weakref.ref(t) for t in (*a.values(), *b.values())]
    del a, b, model
    reg.unload("base")
    reg.unload("frozen")
    gc.collect()
    assert reg.stats.resident_bytes == 0
    assert not [r for r in refs if r() is not None]  # no cache keeps them


# -- one name, one model --------------------------------------------------------------

@pytest.fixture
def two_configs(bert_family, tmp_path) -> tuple[Path, Path]:
    """v1.tdd and v2.tdd: model 'base' with the same tensors, config.json differing."""
    relu = tmp_path / "relu"
    shutil.copytree(bert_family["base"], relu)
    config = json.loads((relu / "config.json").read_text())
    config["hidden_act"] = "relu"
    (relu / "config.json").write_text(json.dumps(config))
    return (pack(tmp_path / "v1.tdd", {"base": bert_family["base"]}),
            pack(tmp_path / "v2.tdd", {"base": relu}))


def act(reg, name: str = "base") -> str:
    return json.loads(reg.read_file(name, "config.json"))["hidden_act"]


def test_a_resident_name_with_other_files_is_refused(two_configs, tmp_path):
    v1, v2 = two_configs
    reg = tdedup.Registry(device="cpu")
    reg.load(v1, ["base"])
    copy = shutil.copy(v1, tmp_path / "copy.tdd")
    reg.load(copy, ["base"])  # the same model from another bundle: nothing to do
    with pytest.raises(UsageError, match="unload it first") as e:
        reg.load(v2, ["base"])
    line = str(e.value)
    assert "\n" not in line and "v1.tdd" in line and "v2.tdd" in line
    assert "config.json" in line and "unload('base')" in e.value.hint
    assert reg.record("base").path == v1 and act(reg) == "gelu"  # nothing mixed in
    reg.unload("base")
    reg.load(v2, ["base"])
    assert act(reg) == "relu"


def test_read_file_serves_the_loaded_bundle_not_one_rebuilt_at_its_path(two_configs,
                                                                        tmp_path):
    v1, v2 = two_configs
    live = tmp_path / "live.tdd"
    shutil.copy(v1, live)
    reg = tdedup.Registry(device="cpu")
    reg.load(live, ["base"])
    os.replace(shutil.copy(v2, tmp_path / "next.tdd"), live)  # rebuilt, same path
    with pytest.raises(BundleChangedError, match="replaced or rewritten") as e:
        reg.read_file("base", "config.json")  # the loaded config is gone: never v2's
    assert "load the model again" in e.value.hint
    reg.unload("base")
    reg.load(live, ["base"])
    assert act(reg) == "relu"
    # Rebuilt again once its file was read: the open file is the loaded one.
    os.replace(shutil.copy(v1, tmp_path / "next.tdd"), live)
    assert act(reg) == "relu"
    reg.unload("base")
    reg.load(live, ["base"])
    assert act(reg) == "gelu"
    # Rewritten with the same files (a repack): still served, checked by sha256.
    loaded = tdedup.load(live, device="cpu")
    os.replace(shutil.copy(v1, tmp_path / "next.tdd"), live)
    assert act(loaded) == "gelu"
    with pytest.raises(ModelNotFoundError, match="no file"):
        loaded.read_file("base", "nope.json")


def test_the_same_model_with_the_other_dequantize_is_named(tmp_path, gguf_family):
    bundle = pack(tmp_path / "q.tdd", {"q8": gguf_family["q8_0"]})
    reg = tdedup.Registry(device="cpu")
    reg.load(bundle, ["q8"])
    with pytest.raises(UsageError, match="resident already with dequantize=False") as e:
        reg.load(bundle, ["q8"], dequantize=True)
    assert "another model" not in str(e.value) and "unload('q8')" in e.value.hint
    assert reg.load(bundle, ["q8"])["q8"] is reg["q8"]  # as it is: fine


# -- selections -------------------------------------------------------------------------

def test_an_empty_selection_loads_nothing_and_a_str_is_one_name(family_bundle):
    empty = tdedup.load(family_bundle, device="cpu", models=[])
    assert len(empty) == 0 and empty.stats.device_bytes == 0
    reg = tdedup.Registry(device="cpu")
    assert reg.load(family_bundle, []) == {} and len(reg) == 0
    assert reg.stats.resident_bytes == 0
    assert list(tdedup.load(family_bundle, device="cpu", models="frozen")) == ["frozen"]
    assert list(reg.load(family_bundle, "base")) == ["base"] and list(reg) == ["base"]
    for bad in (1, [1], b"base"):
        with pytest.raises(UsageError, match="model name or a list"):
            tdedup.load(family_bundle, device="cpu", models=bad)
    assert set(tdedup.load(family_bundle, device="cpu", models=None)) == {
        "base", "finetune", "frozen"}


# -- memory ---------------------------------------------------------------------------

def test_unload_that_frees_gives_the_heap_back(family_bundle, monkeypatch):
    """Small blobs and the decoders' temporaries come from malloc, which keeps what is
    freed: an unload that freed something trims the heap (glibc's malloc_trim)."""
    trims = []
    monkeypatch.setattr(registry, "trim_heap", lambda: trims.append(1) or True)
    reg = tdedup.Registry(device="cpu")
    reg.load(family_bundle, ["base", "frozen"])
    assert reg.unload("frozen") > 0 and len(trims) == 1
    # A model whose every blob another resident model uses frees nothing: no trim.
    other = tdedup.Registry(device="cpu")
    other.load(family_bundle, ["base"])
    reg2 = tdedup.Registry(device="cpu")
    reg2.load(family_bundle, ["base"])
    assert reg2.unload("base") > 0 and len(trims) == 2
    monkeypatch.undo()
    assert placement.trim_heap() in (True, False)  # the real one runs (glibc or not)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_serving_load_keeps_no_pages_of_bases_used_only_by_deltas(tmp_path, monkeypatch):
    """A serving bundle's raw base, used only to finish another model's deltas, is a
    view of the bundle's map while they decode; once they are done its pages go (they
    stayed resident for good, uncounted by the stats: +91 MB on the corpus family)."""
    from safetensors.torch import save_file

    from tdedup.analyzers.delta_planning import DeltaChoice
    from tdedup.format.bundle.constants import BlobEncoding
    from tdedup.format.checkpoints.dtypes import element_width
    from tdedup.ops import pack as pack_module

    g = torch.Generator().manual_seed(0)
    big = torch.randn(512, 1024, generator=g)  # 2 MiB
    small = torch.randn(64, generator=g)
    for name, t in (("base", big), ("finetune", big + 1e-3 * torch.randn(big.shape,
                                                                        generator=g))):
        (tmp_path / name).mkdir()
        save_file({"big": t, "small": small}, str(tmp_path / name / "model.safetensors"))

    def plan(scanned, delta, decided=None):  # finetune's big: a delta of base's
        base = {h.record.name: h.key for h in scanned.hashed["base"]}
        return {h.key: DeltaChoice(base=base[h.record.name],
                                   encoding=BlobEncoding.XOR_BYTEPLANE_ZSTD,
                                   width=element_width(h.record.dtype), estimated_bytes=0,
                                   shape=h.record.shape)
                for h in scanned.hashed["finetune"] if base[h.record.name] != h.key}

    monkeypatch.setattr(pack_module, "_plan_deltas", plan)
    bundle = pack(tmp_path / "s.tdd", {n: tmp_path / n for n in ("base", "finetune")},
                  layout="serving")
    with tdedup.open_bundle(bundle) as b:
        kinds = {t.name: b.blob(t.hash).encoding for _, t in b.tensors("finetune")}
    assert kinds == {"big": BlobEncoding.XOR_BYTEPLANE_ZSTD, "small": BlobEncoding.RAW}
    loaded = tdedup.load(bundle, device="cpu", models=["finetune"])
    assert loaded.stats.mapped_bytes == small.nbytes  # small: a view of the map
    assert torch.equal(loaded["finetune"]["small"], small)
    # Its pages (two at most), not base's 2 MiB.
    assert mapping_rss(bundle) <= 2 * os.sysconf("SC_PAGE_SIZE")


def mapping_rss(path: Path) -> int:
    """Resident bytes of this process's maps of ``path``."""
    total, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) >= 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


# -- tensors by key -------------------------------------------------------------------

def test_read_tensor_takes_load_keys_and_refuses_an_ambiguous_name(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    for i, sub in enumerate(("", "te1", "te2")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), float(i)), f"only{i}": torch.zeros(2)},
                  str(folder / sub / "model.safetensors"))
    bundle = pack(tmp_path / "b.tdd", {"m": folder})
    loaded = tdedup.load(bundle, device="cpu")
    with tdedup.open_bundle(bundle) as b:
        for key, t in loaded["m"].items():  # every key load gives, the same bytes
            assert bytes(memoryview(b.read_tensor("m", key))) == \
                t.contiguous().view(torch.uint8).numpy().tobytes(), key
        assert np.frombuffer(b.read_tensor("m", "te2/w"), np.float32).tolist() == [2.0] * 4
        assert np.frombuffer(b.read_tensor("m", "w"), np.float32).tolist() == [0.0] * 4
        assert len(b.read_tensor("m", "only1")) == 8  # a bare name in one file only
    # No root file: the bare name is in two files.
    shutil.rmtree(tmp_path / "m2", ignore_errors=True)
    shutil.copytree(folder, tmp_path / "m2")
    (tmp_path / "m2" / "model.safetensors").unlink()
    bundle2 = pack(tmp_path / "b2.tdd", {"m2": tmp_path / "m2"})
    with tdedup.open_bundle(bundle2) as b:
        with pytest.raises(AmbiguousNameError, match="2 tensors named 'w'") as e:
            b.read_tensor("m2", "w")
        assert e.value.candidates == ("te1/w", "te2/w")
        assert "te2/w" in str(e.value) and "read_tensor" in e.value.hint
        with pytest.raises(ModelNotFoundError, match="no tensor"):
            b.read_tensor("m2", "te3/w")


def test_read_tensor_of_two_gguf_files_in_one_folder(tmp_path, gguf_family):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("f32", "q8_0"):
        shutil.copy(gguf_family[name], folder / f"{name}.gguf")
    bundle = pack(tmp_path / "b.tdd", {"two": folder})
    import gguf

    want = {t.name: t.data.tobytes() for t in gguf.GGUFReader(folder / "q8_0.gguf").tensors}
    with tdedup.open_bundle(bundle) as b:
        got = b.read_tensor("two", "q8_0.gguf:blk.0.attn_q.weight")
        assert bytes(memoryview(got)) == want["blk.0.attn_q.weight"]
        with pytest.raises(AmbiguousNameError) as e:
            b.read_tensor("two", "blk.0.attn_q.weight")
        assert set(e.value.candidates) == {"f32.gguf:blk.0.attn_q.weight",
                                           "q8_0.gguf:blk.0.attn_q.weight"}

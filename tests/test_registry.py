"""``tdedup.Registry``: models added and dropped in one process, each distinct blob resident
once across bundles, on the corpus MiniLM family (CPU)."""

from __future__ import annotations

import gc
import hashlib
import threading
import weakref
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import tdedup  # noqa: E402
from tdedup.errors import UsageError  # noqa: E402
from tdedup.loaders import placement  # noqa: E402

pytestmark = pytest.mark.corpus


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    """Tensor name -> (sha256 of its bytes, length), read with safetensors alone."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            raw = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy()
            out[name] = (hashlib.sha256(raw.tobytes()).hexdigest(), raw.nbytes)
    return out


def distinct(*models: dict) -> int:
    """Bytes of the distinct tensor contents of ``models`` together."""
    return sum(dict(v for m in models for v in m.values()).values())


def assert_bit_exact(state: dict, folder: Path) -> None:
    from safetensors.torch import load_file

    for name, want in load_file(str(folder / "model.safetensors")).items():
        got = state[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(torch.uint8) if got.dtype.is_floating_point
                           else got, want.view(torch.uint8)
                           if want.dtype.is_floating_point else want), name


@pytest.fixture(scope="module")
def family(corpus, tmp_path_factory):
    """Two bundles sharing base: (base, ft-freeze) and (base, ft-lora-merged)."""
    root = corpus / "minilm"
    tmp = tmp_path_factory.mktemp("registry")
    a, b = tmp / "freeze.tdd", tmp / "lora.tdd"
    tdedup.pack([f"base={root / 'base'}", f"ft-freeze={root / 'ft-freeze'}"], a)
    tdedup.pack([f"base={root / 'base'}", f"ft-lora-merged={root / 'ft-lora-merged'}"], b)
    folders = {m: root / m for m in ("base", "ft-freeze", "ft-lora-merged")}
    return a, b, folders, {m: digests(p) for m, p in folders.items()}


def test_resident_set_grows_by_distinct_bytes_and_shrinks_by_unique(family):
    a, b, folders, d = family
    reg = tdedup.Registry(device="cpu")
    states = reg.load(a)
    assert set(states) == {"base", "ft-freeze"} and "base" in reg and len(reg) == 2
    assert reg.stats.resident_bytes == distinct(d["base"], d["ft-freeze"])

    # A second bundle that also holds base: only the LoRA model's new bytes are added.
    before = reg.stats.resident_bytes
    second = reg.load(b)
    assert reg.stats.resident_bytes - before == (
        distinct(d["base"], d["ft-freeze"], d["ft-lora-merged"])
        - distinct(d["base"], d["ft-freeze"]))
    for key, t in second["base"].items():  # the same storage as the first bundle's
        assert t.data_ptr() == states["base"][key].data_ptr()
    lora = reg["ft-lora-merged"]
    for key, (h, _) in d["ft-lora-merged"].items():
        if d["base"].get(key, (None,))[0] == h:
            assert lora[key].data_ptr() == states["base"][key].data_ptr()
    for m, folder in folders.items():
        assert_bit_exact(reg[m], folder)
    assert sorted(reg) == ["base", "ft-freeze", "ft-lora-merged"]

    # Unloading ft-freeze frees exactly the bytes only it holds.
    only = distinct(d["base"], d["ft-freeze"], d["ft-lora-merged"]) - distinct(
        d["base"], d["ft-lora-merged"])
    assert reg.stats.models["ft-freeze"].unique_bytes == only
    unique_key = next(k for k, (h, _) in d["ft-freeze"].items()
                      if h not in {v[0] for m in ("base", "ft-lora-merged")
                                   for v in d[m].values()})
    gone = weakref.ref(reg["ft-freeze"][unique_key])
    before = reg.stats.resident_bytes
    del states, second, lora
    assert reg.unload("ft-freeze") == only
    gc.collect()
    assert gone() is None  # its storage is released: nothing else refers to it
    assert before - reg.stats.resident_bytes == only and "ft-freeze" not in reg

    # Reloading it costs those bytes again, nothing more, and decodes only them.
    placed = []
    original = placement.Placer.place_one_host

    def counting(self, rec):
        placed.append(rec.hash)
        return original(self, rec)

    placement.Placer.place_one_host = counting
    try:
        again = reg.place(a, ["ft-freeze"])
    finally:
        placement.Placer.place_one_host = original
    assert again.stats.device_bytes == only == reg.stats.resident_bytes - before + only
    assert len(placed) == len(set(placed))
    assert_bit_exact(reg["ft-freeze"], folders["ft-freeze"])
    assert reg.place(a).stats.device_bytes == 0  # every blob resident: nothing placed

    with pytest.raises(KeyError, match="not resident"):
        reg["nope"]


def test_a_different_model_under_a_resident_name_is_refused(family, tmp_path, corpus):
    a, _, folders, _ = family
    other = tmp_path / "other.tdd"
    tdedup.pack([f"base={folders['ft-freeze']}"], other)
    reg = tdedup.Registry(device="cpu")
    reg.load(a, ["base"])
    with pytest.raises(UsageError, match="unload it first"):
        reg.load(other)
    reg.unload("base")
    assert reg.stats.resident_bytes == 0
    reg.load(other)
    assert_bit_exact(reg["base"], folders["ft-freeze"])
    pytest.importorskip("transformers")
    from tdedup.loaders.transformers import from_bundle

    model = from_bundle(reg, "base")  # a registry serves the builders as a LoadedBundle does
    resident = {t.data_ptr() for t in reg["base"].values()}
    assert all(p.data_ptr() in resident for p in model.parameters())


def test_two_threads_loading_overlapping_models_place_each_blob_once(family, monkeypatch):
    a, b, folders, d = family
    placed: list[str] = []
    original = placement.Placer.place_one_host

    def counting(self, rec):
        placed.append(rec.hash)
        return original(self, rec)

    monkeypatch.setattr(placement.Placer, "place_one_host", counting)
    reg = tdedup.Registry(device="cpu")
    errors = []

    def run(bundle):
        try:
            reg.load(bundle)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(placed) == len(set(placed))
    assert reg.stats.resident_bytes == distinct(*d.values())
    for m, folder in folders.items():
        assert_bit_exact(reg[m], folder)

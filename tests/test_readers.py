"""Checkpoint readers on files written by the real libraries: safetensors files, sharded
and Diffusers folders, split GGUF, and the errors malformed files must raise."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers.factory import make_gguf, make_safetensors, make_split_gguf, random_tensors, shard_index
from tdedup.errors import (CheckpointFormatError, InputError, UnsupportedFormatError,
                           UsageError)
from tdedup.format.checkpoints.sources import (ModelArg, assign_names, open_models,
                                        parse_model_arg, sniff_kind)
from tdedup.format.checkpoints.records import FileKind
from tdedup.format.checkpoints.safetensors import read_safetensors

NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
             "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {f"t.{st}": rng.standard_normal((3, 5)).astype(dt) if st.startswith("F")
           else rng.integers(0, 2 if st == "BOOL" else 100, (7,)).astype(dt)
           for st, dt in NP_DTYPES.items()}
    out["scalar"] = np.array(2.5, np.float32)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


def test_safetensors_reader_locates_every_tensor(tmp_path):
    from safetensors import safe_open

    tensors = _mixed_tensors()
    path = make_safetensors(tmp_path / "m.safetensors", tensors, {"format": "np"})
    f = read_safetensors(path, model="m")
    raw = path.read_bytes()
    assert f.kind is FileKind.SAFETENSORS and f.size == len(raw)
    assert f.info == {"metadata": {"format": "np"}}
    assert [t.offset for t in f.tensors] == sorted(t.offset for t in f.tensors)
    with safe_open(path, "np") as st:
        assert {t.name for t in f.tensors} == set(st.keys())
        for t in f.tensors:
            want = st.get_tensor(t.name)
            assert (t.model, t.file) == ("m", "m.safetensors")
            assert t.shape == want.shape and t.length == want.nbytes
            assert NP_DTYPES.get(t.dtype, np.float32) == want.dtype.type
            assert raw[t.offset:t.end] == want.tobytes()


def test_safetensors_bf16_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"x": x}, str(tmp_path / "b.safetensors"))
    (t,) = read_safetensors(tmp_path / "b.safetensors").tensors
    assert (t.dtype, t.shape, t.length) == ("BF16", (4, 6), 48)
    raw = (tmp_path / "b.safetensors").read_bytes()
    assert raw[t.offset:t.end] == x.view(torch.int16).numpy().tobytes()


# -- malformed safetensors: each a real file, then damaged ------------------------------


def _real_file(tmp_path):
    # The metadata leaves room for the edits below, which keep the header's length.
    return make_safetensors(tmp_path / "w.safetensors",
                            random_tensors(0, {"a": (8, 4), "b": (16,)}), {"pad": "x" * 64})


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    new = json.dumps(edit(header), separators=(",", ":")).encode().ljust(n)
    assert len(new) == n, "edit must not grow the header"
    path.write_bytes(raw[:8] + new + raw[8 + n:])


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "no header length"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "past the end of the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + p.read_bytes()[8:]), "over the"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"[" + p.read_bytes()[9:]),
     "malformed safetensors header"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "dtype": "Q9"}}),
     "unknown dtype"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "dtype": ["F32"]}}),
     "unknown dtype"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "shape": [8, 5]}}),
     "needs 160"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "shape": [8, -4]}}),
     "shape must be"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "data_offsets": [4, 1]}}),
     "bad data_offsets"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": {**h["a"], "dtype": "F16",
                                                        "shape": [16, 4]}} |
                               {"b": {**h["b"], "data_offsets": [0, 64]}}), "overlap"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "__metadata__": {"k": 1}}),
     "__metadata__"),
    (lambda p: _rewrite_header(p, lambda h: {**h, "a": 3}), "not an object"),
])
def test_malformed_safetensors(tmp_path, damage, message):
    path = _real_file(tmp_path)
    damage(path)
    with pytest.raises(CheckpointFormatError, match=message) as e:
        read_safetensors(path)
    assert e.value.path == str(path)


def test_duplicate_and_deeply_nested_header_keys(tmp_path):
    path = tmp_path / "d.safetensors"
    header = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
             b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
    with pytest.raises(CheckpointFormatError, match="duplicate key"):
        read_safetensors(path)
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CheckpointFormatError, match="malformed"):
        read_safetensors(path)


# -- model sources ----------------------------------------------------------------------


def test_sniff_by_content_when_suffix_is_odd(tmp_path):
    st = make_safetensors(tmp_path / "a.safetensors", random_tensors(0, {"x": (2,)}))
    gg = make_gguf(tmp_path / "b.gguf", random_tensors(0, {"x": (32,)}))
    assert sniff_kind(st.rename(tmp_path / "a.bin")) is FileKind.SAFETENSORS
    assert sniff_kind(gg.rename(tmp_path / "b.weights")) is FileKind.GGUF
    (tmp_path / "c.txt").write_text("hello, world")
    with pytest.raises(UnsupportedFormatError, match="neither a safetensors nor a GGUF"):
        sniff_kind(tmp_path / "c.txt")


def test_sharded_transformers_folder(bert_family):
    (m,) = open_models([str(bert_family["sharded"])])
    assert m.layout == "sharded"
    weight_map = shard_index(bert_family["sharded"])
    assert len(m.weight_files) == len(set(weight_map.values())) > 1
    assert {(t.name, t.file) for t in m.tensors} == set(weight_map.items())
    assert any(f.rel_path == "model.safetensors.index.json" and f.kind is FileKind.OTHER
               for f in m.files)


def test_sharded_folder_with_a_missing_shard(bert_family, tmp_path):
    import shutil

    folder = shutil.copytree(bert_family["sharded"], tmp_path / "s")
    shard = sorted(set(shard_index(folder).values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(InputError, match=f"shard '{shard}'.*missing"):
        open_models([str(folder)])


def test_diffusers_pipeline_folder(diffusers_pipeline):
    from safetensors import safe_open

    (m,) = open_models([f"ddpm={diffusers_pipeline}"])
    assert (m.name, m.layout) == ("ddpm", "diffusers")
    rel = {f.rel_path: f for f in m.files}
    assert {"model_index.json", "unet/config.json",
            "scheduler/scheduler_config.json"} <= set(rel)
    unet = rel["unet/diffusion_pytorch_model.safetensors"]
    with safe_open(unet.abs_path, "np") as st:
        assert {t.name for t in unet.tensors} == set(st.keys())
    assert all(t.file == "unet/diffusion_pytorch_model.safetensors" for t in m.tensors)


def test_split_gguf_by_any_part(tmp_path):
    tensors = random_tensors(1, {f"blk.{i}.w": (32, 4) for i in range(5)})
    parts = make_split_gguf(tmp_path / "m.gguf", tensors, max_tensors=2)
    (m,) = open_models([str(parts[1])])
    assert m.layout == "gguf-split" and [f.rel_path for f in m.files] == [p.name for p in parts]
    assert sorted(t.name for t in m.tensors) == sorted(tensors)
    assert m.name == "m"
    parts[2].unlink()
    with pytest.raises(InputError, match="missing part"):
        open_models([str(parts[0])])


def test_folder_walk_skips_hidden_and_survives_link_cycles(tmp_path):
    make_safetensors(tmp_path / "m" / "sub" / "w.safetensors", random_tensors(0, {"x": (4,)}))
    make_safetensors(tmp_path / "m" / ".cache" / "junk.safetensors",
                     random_tensors(1, {"x": (4,)}))
    os.symlink(tmp_path / "m", tmp_path / "m" / "sub" / "loop")
    (m,) = open_models([str(tmp_path / "m")])
    assert [f.rel_path for f in m.files] == ["sub/w.safetensors"]


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedFormatError, match="no .safetensors or .gguf"):
        open_models([str(tmp_path)])


def test_missing_path():
    with pytest.raises(InputError, match="no such file or folder"):
        open_models(["/nonexistent/model.safetensors"])


def test_names(tmp_path):
    assert parse_model_arg("base=/x/y") == ModelArg("base", __import__("pathlib").Path("/x/y"))
    with pytest.raises(UsageError):
        parse_model_arg("bad name=/x")
    args = [ModelArg(None, tmp_path / "a" / "f16.safetensors"),
            ModelArg(None, tmp_path / "b" / "f16.gguf"), ModelArg(None, tmp_path / "c")]
    for a in args[:2]:
        a.path.parent.mkdir()
        a.path.touch()
    names = assign_names(args)
    assert names[2] == "c" and len(set(names)) == 3 and names[0].endswith("a-f16")
    with pytest.raises(UsageError, match="given twice"):
        assign_names([ModelArg("x", tmp_path), ModelArg("x", tmp_path)])


def test_a_link_names_the_model_not_its_target(tmp_path):
    """A hub snapshot's file links to a blob named by its hash; a renamed quantization
    links to another file: the name comes from the path given."""
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.touch()
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    (tmp_path / "q4.gguf").symlink_to(blob)
    (tmp_path / "ft").symlink_to(snap, target_is_directory=True)
    names = assign_names([ModelArg(None, snap / "model.safetensors"),
                          ModelArg(None, tmp_path / "q4.gguf"), ModelArg(None, tmp_path / "ft")])
    assert names == ["model", "q4", "ft"]


# -- links out of the model folder, empty weight files --------------------------------

def _linked_model(tmp_path):
    """``m`` with links that stay inside it and links that leave it; ``sibling`` next to
    it, and a weight file in a shared store outside it."""
    make_safetensors(tmp_path / "m" / "w.safetensors", random_tensors(0, {"x": (4,)}))
    make_safetensors(tmp_path / "m" / "sub" / "v.safetensors", random_tensors(1, {"y": (3,)}))
    make_safetensors(tmp_path / "sibling" / "s.safetensors", random_tensors(2, {"z": (5,)}))
    (tmp_path / "outside.txt").write_text("not the model's")
    m = tmp_path / "m"
    os.symlink("..", m / "loop")  # would reach every sibling model
    os.symlink(tmp_path / "outside.txt", m / "link")  # a file: followed wherever it is
    make_safetensors(tmp_path / "store" / "big.safetensors", random_tensors(3, {"q": (6,)}))
    os.symlink(tmp_path / "store" / "big.safetensors", m / "model.safetensors")
    os.symlink("../../sibling", m / "sub" / "up")
    os.symlink("w.safetensors", m / "inner.safetensors")  # inside: followed
    os.symlink("../w.safetensors", m / "sub" / "w2.safetensors")  # inside, up a level
    return m


FILES = ["inner.safetensors", "link", "model.safetensors", "w.safetensors",
         "sub/v.safetensors", "sub/w2.safetensors"]


def test_folder_links_out_of_the_model_folder_are_skipped_and_said(tmp_path):
    """A folder link out of the model (``loop -> ..``) would pack every sibling model; a
    file link anywhere is the model's file (weights in a shared store)."""
    m = _linked_model(tmp_path)
    (src,) = open_models([f"m={m}"])
    assert [f.rel_path for f in src.files] == FILES
    assert sorted(src.skipped) == ["loop/ (link out of the model folder)",
                                   "sub/up/ (link out of the model folder)"]
    assert src.files[0].tensors[0].name == "x"  # an inside link's content is stored


def test_a_model_given_as_a_link_to_a_folder(tmp_path):
    m = _linked_model(tmp_path)
    os.symlink(m, tmp_path / "alias")
    (src,) = open_models([f"m={tmp_path / 'alias'}"])
    assert [f.rel_path for f in src.files] == FILES
    assert len(src.skipped) == 2


def test_links_out_of_the_model_folder_warn_at_pack(tmp_path):
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    m = _linked_model(tmp_path)
    res = CliRunner().invoke(app, ["pack", "--json", f"m={m}", "-o", str(tmp_path / "x.tdd")])
    assert res.exit_code == 0, res.output
    assert "loop/ (link out of the model folder)" in json.loads(res.stdout)["skipped"]["m"]
    assert "warning: m: skipped" in res.stderr and "link out of the model folder" in res.stderr
    import tdedup

    with tdedup.open_bundle(tmp_path / "x.tdd") as b:
        paths = [f.path for f in b.model("m").files]
    assert not any(p.startswith(("loop/", "sub/up/")) for p in paths)
    assert "model.safetensors" in paths  # the weights in the shared store


def test_a_hub_snapshot_given_as_a_folder_follows_its_blob_links(tmp_path):
    """Snapshot files are links into ../../blobs (and hub's blobs may link on into the
    cache's shared store): those are the model; a link out of the cache is not."""
    from helpers.hub_helpers import add_revision

    src = tmp_path / "src"
    make_safetensors(src / "model.safetensors", random_tensors(0, {"x": (4,)}))
    make_safetensors(src / "unet" / "u.safetensors", random_tensors(1, {"u": (4,)}))
    (src / "config.json").write_text("{}")
    cache = tmp_path / "hub"
    snap = add_revision(cache, "org/m", "c" * 40, src, ("main",))
    # huggingface_hub's shared store: a repo blob links to <cache>/blobs/<xx>/<hash>.
    blob = Path(os.path.realpath(snap / "config.json"))
    store = cache / "blobs" / "ab" / ("ab" * 32)
    store.parent.mkdir(parents=True)
    blob.rename(store)
    os.symlink(os.path.relpath(store, blob.parent), blob)
    os.symlink("../../..", snap / "escape")
    (m,) = open_models([f"m={snap}"])
    assert [f.rel_path for f in m.files] == ["config.json", "model.safetensors",
                                             "unet/u.safetensors"]
    assert m.skipped == ["escape/ (link out of the model folder)"]
    (unet,) = open_models([f"u={snap / 'unet'}"])  # a folder within a snapshot
    assert [f.rel_path for f in unet.files] == ["u.safetensors"]


def test_an_empty_safetensors_file_in_a_folder_is_kept_as_a_plain_file(tmp_path):
    import tdedup

    make_safetensors(tmp_path / "m" / "w.safetensors", random_tensors(0, {"x": (4,)}))
    (tmp_path / "m" / "zero.safetensors").touch()
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "empty.gguf").touch()
    (m,) = open_models([f"m={tmp_path / 'm'}"])
    kinds = {f.rel_path: (f.kind, f.size) for f in m.files}
    assert kinds["zero.safetensors"] == (FileKind.OTHER, 0)
    assert kinds["sub/empty.gguf"] == (FileKind.OTHER, 0)
    tdedup.pack([f"m={tmp_path / 'm'}"], tmp_path / "b.tdd")
    tdedup.unpack(tmp_path / "b.tdd", tmp_path / "out")
    for rel in ("w.safetensors", "zero.safetensors", "sub/empty.gguf"):
        assert (tmp_path / "out" / "m" / rel).read_bytes() == (tmp_path / "m" / rel).read_bytes()
    with pytest.raises(CheckpointFormatError, match="truncated"):  # given as the model itself
        open_models([str(tmp_path / "m" / "zero.safetensors")])

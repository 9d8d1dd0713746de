"""Inputs that used to end in a traceback (issue 14, causes 6, 8, 9, 11, 13, 14, 15, 20),
each written as the attack: exit 2, one line naming the file and the problem, nothing
left behind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import hostile_helpers as hh
from typer.testing import CliRunner

import tdedup
from tdedup.cli.app import app

from helpers.cli_checks import one_line  # noqa: E402

runner = CliRunner()



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return hh.pack_tiny_family(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def sharded(tmp_path) -> Path:
    from safetensors.numpy import save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": np.ones(4, np.float32)}, str(folder / "model-00001-of-00001.safetensors"))
    return folder


# -- cause 6 ------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [
    {"weight_map": {"w": 5, "v": "model-00001-of-00001.safetensors"}},
    {"weight_map": {"w": ["model-00001-of-00001.safetensors"]}},
    {"weight_map": {"w": {"x": 1}}},
    {"weight_map": "nested"},
])
def test_a_shard_index_of_the_wrong_shape_is_one_line(sharded, index):
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for cmd in ("analyze", "pack"):
        args = [cmd, str(sharded)] + (["-o", str(sharded.parent / "b.tdd")] if cmd == "pack"
                                      else [])
        one_line(runner.invoke(app, args), "model.safetensors.index.json", "shard index")


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_json_is_one_line(sharded, depth):
    (sharded / "model.safetensors.index.json").write_text("[" * depth + "]" * depth)
    one_line(runner.invoke(app, ["analyze", str(sharded)]), "nested")


# -- cause 8 ------------------------------------------------------------------------------

def test_a_ggml_type_gguf_py_cannot_dequantize_is_one_line(tmp_path):
    pytest.importorskip("torch")
    import gguf

    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(path, "llama")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((2, size), np.uint8)
    w.add_tensor("w", raw, raw_shape=(2, size), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bundle = tmp_path / "b.tdd"
    tdedup.pack([str(path)], bundle)
    one_line(runner.invoke(app, ["load", "--dequantize", "--device", "cpu", str(bundle)]),
             str(bundle), "Q8_1")


# -- causes 9, 13, 14, 15: manifests -------------------------------------------------------------

def _edited(tiny: Path, tmp_path: Path, edit) -> Path:
    return hh.rewrite_manifest(tiny, tmp_path / "bad.tdd", edit)


def test_a_manifest_path_with_a_lone_surrogate_is_refused(tiny, tmp_path):
    def edit(doc, offsets):
        doc["models"][0]["files"][0]["path"] = "x\ud800/config.json"
        doc["models"][1]["layout"] = "\udcff"
    bad = hh.rewrite_manifest(tiny, tmp_path / "bad.tdd", edit)
    assert b"\\ud800" in bad.read_bytes() or True  # (the manifest is compressed)
    dest = tmp_path / "dest"
    for cmd in (["unpack", str(bad), str(dest)], ["inspect", str(bad)], ["verify", str(bad)]):
        one_line(runner.invoke(app, cmd), str(bad), "surrogate")
    assert not dest.exists()


def test_a_model_name_ending_in_a_newline_is_refused(tiny, tmp_path):
    def edit(doc, offsets):
        doc["models"][0]["name"] = doc["models"][0]["name"] + "\n"
    bad = _edited(tiny, tmp_path, edit)
    one_line(runner.invoke(app, ["unpack", str(bad), str(tmp_path / "d")]), "unsafe model name")
    assert not (tmp_path / "d").exists()
    src = hh.make_tiny_family(tmp_path / "src")
    one_line(runner.invoke(app, ["pack", f"a\n={src['base']}", "-o", str(tmp_path / "b.tdd")]))


def test_non_finite_gguf_metadata_keeps_the_manifest_strict_json(tmp_path):
    import gguf

    path = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_float32("llama.rope.freq_base", math.nan)
    w.add_float32("x.pos", math.inf)
    w.add_float64("x.neg", -math.inf)
    w.add_tensor("w", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bundle = tmp_path / "b.tdd"
    r = runner.invoke(app, ["pack", str(path), "-o", str(bundle)])
    assert r.exit_code == 0, r.output

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    r = runner.invoke(app, ["inspect", "--json", str(bundle)])
    assert r.exit_code == 0, r.output
    strict(r.stdout)
    tdedup.verify(bundle)


def _frame_without_size(tiny: Path, tmp_path: Path) -> Path:
    import zstandard

    data = b"\1" * 64
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    stored = cobj.compress(data) + cobj.flush()
    assert zstandard.frame_content_size(stored) == -1

    def edit(doc, offsets):
        digest = hh.digest(data)
        doc["blobs"].append({"hash": digest, "encoding": 1, "offset": offsets[0],
                             "stored_length": len(stored), "decoded_length": len(data),
                             "checksum": hh.digest(stored)})
        f = doc["models"][0]["files"][0]
        f["tensors"].append({"name": "extra", "dtype": "U8", "shape": [len(data)],
                             "offset": f["size"], "length": len(data), "hash": digest})
        f["size"] += len(data)
    return hh.rewrite_manifest(tiny, tmp_path / "nosize.tdd", edit, append=[stored])


@pytest.mark.parametrize("cmd", ["verify", "unpack", "load"])
def test_a_zstd_frame_without_a_content_size_names_the_bundle(tiny, tmp_path, cmd):
    if cmd == "load":
        pytest.importorskip("torch")
    bad = _frame_without_size(tiny, tmp_path)
    args = {"verify": [str(bad)], "unpack": [str(bad), str(tmp_path / "d")],
            "load": ["--device", "cpu", str(bad)]}[cmd]
    one_line(runner.invoke(app, [cmd, *args]), str(bad), "content size")


# -- cause 11 ----------------------------------------------------------------------------------

def test_an_empty_tensor_whose_shape_overflows_is_refused_at_pack(tmp_path):
    header = {"big": {"dtype": "F32", "shape": [2**62, 4, 0], "data_offsets": [0, 0]},
              "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    one_line(runner.invoke(app, ["pack", str(path), "-o", str(tmp_path / "b.tdd")]),
             str(path), "too large")
    assert not (tmp_path / "b.tdd").exists()


def test_a_manifest_shape_that_overflows_is_refused_by_load(tmp_path):
    """Shapes are descriptive for unpack (files restore without them); load refuses an
    empty tensor whose other dimensions overflow instead of a torch traceback."""
    pytest.importorskip("torch")
    tiny = hh.pack_tiny_family(tmp_path / "src", empty=True)

    def edit(doc, offsets):
        for m in doc["models"]:
            for f in m["files"]:
                for t in f["tensors"]:
                    if t["length"] == 0:
                        t["shape"] = [2**62, 4, 0]
    bad = _edited(tiny, tmp_path, edit)
    one_line(runner.invoke(app, ["load", "--device", "cpu", str(bad)]), str(bad),
             "does not fit")
    tdedup.unpack(bad, tmp_path / "out")


# -- cause 20: what a folder scan leaves out is said -------------------------------------------

def test_hidden_folders_fifos_and_dangling_links_are_reported(tmp_path):
    src = hh.make_tiny_family(tmp_path / "src")["base"]
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    os.mkfifo(src / "pipe")
    (src / "gone.json").symlink_to(src / "missing.json")
    want = {".git/ (hidden folder)", "pipe (not a regular file)", "gone.json (dangling link)"}
    r = runner.invoke(app, ["pack", "--json", f"m={src}", "-o", str(tmp_path / "b.tdd")])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["skipped"]["m"]) == want
    assert all(w.split(" (")[0] in r.stderr for w in want) and "warning: m: skipped" in r.stderr
    r = runner.invoke(app, ["analyze", "--json", f"m={src}"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["skipped"]["m"]) == want
    assert "warning: m: skipped" in r.stderr

"""The must-refuse vectors of spec/vectors/refuse/ (issue 14, cause 21): each is refused
by verify, inspect and unpack with one line naming it, nothing written; the generator
still makes such cases on today's writer; and a reader ignores manifest keys it does not know
(§6, §11) while a writer never writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tdedup
from helpers import hostile_helpers as hh
from helpers import refuse_vectors
from tdedup.cli.app import app
from tdedup.errors import TdedupError

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "refuse"
INDEX = json.loads((VECTORS / "index.json").read_text())
runner = CliRunner()


@pytest.mark.parametrize("name", sorted(INDEX))
def test_a_conforming_reader_refuses(name, tmp_path):
    path = VECTORS / name
    with pytest.raises(TdedupError) as e:
        tdedup.verify(path)
    assert INDEX[name] in e.value.message and e.value.path == str(path)
    # inspect decodes nothing: it refuses what the structure shows, not a blob's contents
    decoded = name.startswith("lowrank-")
    for args in (["verify", str(path)], *([] if decoded else [["inspect", str(path)]]),
                 ["unpack", str(path), str(tmp_path / "d")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        lines = [x for x in r.stderr.splitlines() if not x.startswith("hint:")]
        assert len(lines) == 1 and str(path) in lines[0] and INDEX[name] in lines[0], r.stderr
    assert not (tmp_path / "d").exists()


def test_the_generator_still_makes_vectors_a_reader_refuses(tmp_path):
    """The committed files are fixed (a reader must refuse them whatever writes bundles
    later); the generator, run on today's writer, makes the same cases, refused alike."""
    built = refuse_vectors.build(tmp_path / "out", tmp_path / "scratch")
    assert built == INDEX
    for name, words in built.items():
        with pytest.raises(TdedupError, match=words):
            tdedup.verify(tmp_path / "out" / name)


def test_unknown_manifest_keys_are_ignored(tmp_path):
    src = hh.pack_tiny_family(tmp_path / "src")

    def edit(doc, offsets):
        doc["x_future"] = {"any": [1, 2, {"nested": True}]}
        doc["blobs"][0]["x_future"] = 1
        doc["models"][0]["x_future"] = "a"
        doc["models"][0]["files"][0]["x_future"] = None
        for t in doc["models"][0]["files"][0]["tensors"][:1]:
            t["x_future"] = [0]
    bundle = hh.rewrite_manifest(src, tmp_path / "future.tdd", edit)
    tdedup.verify(bundle)
    tdedup.unpack(bundle, tmp_path / "out")

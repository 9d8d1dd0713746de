"""Split GGUF inputs after the third QA pass: two parts of one split given as two inputs
are one input (refused as given twice, not analyzed as two models sharing everything),
and a split whose parts disagree (a part replaced by another GGUF, renumbered, from a
split of another size, or repeating a tensor of another part) is refused, naming the
part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.factory import make_gguf, make_split_gguf, random_tensors
from tdedup.errors import CheckpointFormatError
from tdedup.format.checkpoints.sources import open_models
from helpers.cli_checks import analyze, one_line

runner = CliRunner()


def test_two_parts_of_one_split_are_the_same_input(tmp_path):
    parts = make_split_gguf(tmp_path / "split.gguf",
                            random_tensors(0, {"x": (32,), "y": (32,), "z": (64,)}), 2)
    one_line(analyze(*parts[:2]), "the same input is given twice")
    one_line(analyze(parts[0], parts[0].parent / ".." / parts[0].parent.name / parts[1].name),
                   "the same input is given twice")
    result = analyze("--json", "-q", parts[1])
    assert [m["name"] for m in json.loads(result.stdout)["models"]] == ["split"]


def _part(path: Path, tensors: dict, keys: dict[str, int] | None) -> Path:
    return make_gguf(path, tensors, uint16=keys)


def test_inconsistent_splits_are_refused(tmp_path):
    t = random_tensors(0, {"x": (32,), "y": (32,)})
    cases = {
        # part 2 replaced by a plain GGUF: no split keys
        "plain": ({"split.no": 0, "split.count": 2}, None, "no split.count/split.no"),
        # part 2 says it is part 1
        "renum": ({"split.no": 0, "split.count": 2}, {"split.no": 0, "split.count": 2},
                  "its name makes it part 2 of 2"),
        # part 2 belongs to a 3-part split
        "count": ({"split.no": 0, "split.count": 2}, {"split.no": 1, "split.count": 3},
                  "its name makes it part 2 of 2"),
    }
    for stem, (k1, k2, problem) in cases.items():
        first = _part(tmp_path / f"{stem}-00001-of-00002.gguf", {"x": t["x"]}, k1)
        _part(tmp_path / f"{stem}-00002-of-00002.gguf", {"y": t["y"]}, k2)
        with pytest.raises(CheckpointFormatError, match=problem) as e:
            open_models([str(first)])
        assert e.value.path is not None and e.value.path.endswith(f"{stem}-00002-of-00002.gguf")
    first = _part(tmp_path / "dup-00001-of-00002.gguf", {"x": t["x"]},
                  {"split.no": 0, "split.count": 2})
    _part(tmp_path / "dup-00002-of-00002.gguf", {"x": t["y"]}, {"split.no": 1, "split.count": 2})
    line = one_line(analyze(first), "dup-00002-of-00002.gguf", "'x'",
                          "dup-00001-of-00002.gguf")
    assert "also in" in line


def test_a_split_written_by_gguf_py_is_accepted(tmp_path):
    parts = make_split_gguf(tmp_path / "m.gguf", random_tensors(1, {f"t{i}": (8,)
                                                                    for i in range(5)}), 2)
    (m,) = open_models([str(parts[2])])
    assert len(m.tensors) == 5 and [f.info["split.no"] for f in m.files] == [0, 1, 2]


def test_same_bytes_still_counted_once_per_model(tmp_path):
    """Sanity: a split given once still counts its tensors once."""
    parts = make_split_gguf(tmp_path / "s.gguf", {"a": np.ones(32, np.float32),
                                                  "b": np.zeros(32, np.float32)}, 1)
    result = analyze("--json", "-q", parts[0])
    assert json.loads(result.stdout)["models"][0]["tensors"] == 2

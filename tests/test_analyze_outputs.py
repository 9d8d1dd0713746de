"""``tdedup analyze``'s outputs after the third QA pass: the Markdown file never replaces an
input and is written atomically; ``--min-dedup-ratio`` compares and prints the ratio JSON
reports."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.factory import make_safetensors, make_split_gguf, random_tensors
from tdedup.cli.analyze_render import exact_number
from tdedup.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["analyze", *map(str, args)],
                         env={"NO_COLOR": "1", "COLUMNS": "200"})


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines
    assert all(n in lines[0] for n in needles), lines
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    t = random_tensors(0, {"a": (64, 32), "b": (32,)})
    return (make_safetensors(tmp_path / "victim.safetensors", t),
            make_safetensors(tmp_path / "v2.safetensors", t))


# -- 1: --markdown never replaces an input ---------------------------------------------


def test_markdown_onto_an_input_file_is_refused_before_hashing(pair, monkeypatch):
    victim, other = pair
    before = victim.read_bytes()
    from tdedup.analyzers import scan

    def no_hashing(*a, **k):
        raise AssertionError("hashed before refusing")

    monkeypatch.setattr(scan, "hash_models", no_hashing)
    one_error_line(run(victim, other, "-q", "--markdown", victim), "the output is the input")
    assert victim.read_bytes() == before


def test_markdown_inside_an_input_folder_a_split_part_or_a_bundle_is_refused(tmp_path, pair):
    folder = tmp_path / "folder"
    inside = make_safetensors(folder / "model.safetensors", random_tensors(1, {"x": (8,)}))
    before = inside.read_bytes()
    one_error_line(run(folder, pair[1], "-q", "--markdown", inside), "inside the input folder")
    one_error_line(run(folder, pair[1], "-q", "--markdown", folder / "new.md"),
                   "inside the input folder")
    assert inside.read_bytes() == before and not (folder / "new.md").exists()
    # Any part of a split GGUF given by another part.
    parts = make_split_gguf(tmp_path / "s.gguf", random_tensors(2, {"p": (32,), "q": (32,)}), 1)
    second = parts[1].read_bytes()
    one_error_line(run(parts[0], "-q", "--markdown", parts[1]), "the output is the input")
    assert parts[1].read_bytes() == second
    bundle = tmp_path / "b.tdd"
    assert runner.invoke(app, ["pack", str(pair[1]), "-o", str(bundle), "-q"]).exit_code == 0
    one_error_line(run(bundle, "-q", "--markdown", bundle), "the output is the input")
    one_error_line(run(pair[1], "-q", "--markdown", tmp_path), "must be a file name")


def test_markdown_is_written_atomically(pair, tmp_path, monkeypatch):
    """A temporary name beside the target, renamed over it: a failed write leaves the old
    report whole and no temporary file."""
    target = tmp_path / "report.md"
    target.write_text("old report\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    one_error_line(run(*pair, "-q", "--markdown", target), "report.md",
                   "No space left on device")
    assert target.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.md", "victim.safetensors", "v2.safetensors"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert run(*pair, "-q", "--markdown", target).exit_code == 0
    assert target.read_text().startswith("## tdedup analyze")


# -- 2: --min-dedup-ratio compares what JSON reports ------------------------------------


@pytest.fixture
def almost_two(tmp_path):
    """Two models whose ratio is just below 2: 1.999955 in the JSON report."""
    a = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    return (make_safetensors(tmp_path / "r1.safetensors", {"a": a}),
            make_safetensors(tmp_path / "r2.safetensors",
                             {"a": a, "e": np.ones(5, np.float32)}))


def test_threshold_compares_the_reported_ratio(almost_two, tmp_path):
    result = run(*almost_two, "--json", "-q")
    ratio = json.loads(result.stdout)["dedup_ratio"]
    assert 1.9999 < ratio < 2
    text = repr(ratio)
    assert run(*almost_two, "-q", "--json", "--min-dedup-ratio", text).exit_code == 0
    md = tmp_path / "s.md"
    result = run(*almost_two, "-q", "--json", "--min-dedup-ratio", "2", "--markdown", md)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line == f"tdedup: dedup ratio {text} is below --min-dedup-ratio 2"
    assert f"**Failed**: dedup ratio {text}x < required 2x" in md.read_text()
    run(*almost_two, "-q", "--min-dedup-ratio", text, "--markdown", md)
    assert f"**Passed**: dedup ratio {text}x >= required {text}x" in md.read_text()


def test_exact_number_keeps_every_digit():
    assert exact_number(2.0) == "2" and exact_number(1.999955) == "1.999955"
    assert exact_number(1.9999551) == "1.9999551" and exact_number(0.5) == "0.5"

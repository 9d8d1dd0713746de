"""``tdedup analyze``'s outputs after the third QA pass: the Markdown file never replaces an
input and is written atomically; ``--min-dedup-ratio`` compares and prints the ratio JSON
reports; Markdown and terminal output neutralise links and bidirectional controls; one
percent convention; Markdown headings and the skipped entries."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.factory import make_gguf, make_safetensors, make_split_gguf, random_tensors
from tdedup.analyzers.derivation import DerivableModel
from tdedup.cli.analyze_render import (
    derived_markdown,
    derived_table,
    exact_number,
    md_escape,
    share,
)
from tdedup.cli.app import app
from tdedup.cli.common import clean
from helpers.cli_checks import analyze, one_line

runner = CliRunner()


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
    one_line(analyze(victim, other, "-q", "--markdown", victim), "the output is the input")
    assert victim.read_bytes() == before


def test_markdown_inside_an_input_folder_a_split_part_or_a_bundle_is_refused(tmp_path, pair):
    folder = tmp_path / "folder"
    inside = make_safetensors(folder / "model.safetensors", random_tensors(1, {"x": (8,)}))
    before = inside.read_bytes()
    one_line(analyze(folder, pair[1], "-q", "--markdown", inside), "inside the input folder")
    one_line(analyze(folder, pair[1], "-q", "--markdown", folder / "new.md"),
                   "inside the input folder")
    assert inside.read_bytes() == before and not (folder / "new.md").exists()
    # Any part of a split GGUF given by another part.
    parts = make_split_gguf(tmp_path / "s.gguf", random_tensors(2, {"p": (32,), "q": (32,)}), 1)
    second = parts[1].read_bytes()
    one_line(analyze(parts[0], "-q", "--markdown", parts[1]), "the output is the input")
    assert parts[1].read_bytes() == second
    bundle = tmp_path / "b.tdd"
    assert runner.invoke(app, ["pack", str(pair[1]), "-o", str(bundle), "-q"]).exit_code == 0
    one_line(analyze(bundle, "-q", "--markdown", bundle), "the output is the input")
    one_line(analyze(pair[1], "-q", "--markdown", tmp_path), "must be a file name")


def test_markdown_is_written_atomically(pair, tmp_path, monkeypatch):
    """A temporary name beside the target, renamed over it: a failed write leaves the old
    report whole and no temporary file."""
    target = tmp_path / "report.md"
    target.write_text("old report\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    one_line(analyze(*pair, "-q", "--markdown", target), "report.md",
                   "No space left on device")
    assert target.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.md", "victim.safetensors", "v2.safetensors"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert analyze(*pair, "-q", "--markdown", target).exit_code == 0
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
    result = analyze(*almost_two, "--json", "-q")
    ratio = json.loads(result.stdout)["dedup_ratio"]
    assert 1.9999 < ratio < 2
    text = repr(ratio)
    assert analyze(*almost_two, "-q", "--json", "--min-dedup-ratio", text).exit_code == 0
    md = tmp_path / "s.md"
    result = analyze(*almost_two, "-q", "--json", "--min-dedup-ratio", "2", "--markdown", md)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line == f"tdedup: dedup ratio {text} is below --min-dedup-ratio 2"
    assert f"**Failed**: dedup ratio {text}x < required 2x" in md.read_text()
    analyze(*almost_two, "-q", "--min-dedup-ratio", text, "--markdown", md)
    assert f"**Passed**: dedup ratio {text}x >= required {text}x" in md.read_text()


def test_exact_number_keeps_every_digit():
    assert exact_number(2.0) == "2" and exact_number(1.999955) == "1.999955"
    assert exact_number(1.9999551) == "1.9999551" and exact_number(0.5) == "0.5"


# -- 6: Markdown and terminal escaping; headings; skipped -------------------------------

LINK = "[link](https://evil.example)"
BIDI = "good\u202egnp.exe"


def test_markdown_escapes_links_references_and_bidi_controls():
    assert md_escape(LINK) == "\\[link\\](https://evil.example)"
    assert md_escape("![img](x)").startswith("!\\[img\\]")
    assert md_escape("&#x202e;") == "\\&#x202e;"
    assert md_escape(BIDI) == "good\\\\u202egnp.exe"  # rendered as the text \u202e
    for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u2028":
        assert ch not in md_escape(f"a{ch}b") and ch not in clean(f"a{ch}b")
    assert clean("a\x1bb\u202ec") == "a\\x1bb\\u202ec"  # clean()'s escapes, extended
    assert clean("naïve ü 模型") == "naïve ü 模型"  # letters are left alone


def test_hostile_tensor_names_in_markdown_and_tables(tmp_path):
    shared = random_tensors(0, {"x": (16, 16)})["x"]
    names = {LINK: shared, BIDI: shared * 2}
    a = make_safetensors(tmp_path / "a.safetensors", names)
    b = make_safetensors(tmp_path / "b.safetensors", names)
    md = tmp_path / "r.md"
    result = analyze(a, b, "-q", "--markdown", md)
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "[link](" not in text and "\\[link\\](https://evil.example)" in text
    assert "\u202e" not in text and "\u202e" not in result.stdout
    assert "good\\u202egnp.exe" in result.stdout.replace("\n", "")


def test_markdown_section_levels_and_skipped_entries(tmp_path):
    base = make_safetensors(tmp_path / "m" / "model.safetensors",
                            random_tensors(0, {"x": (8, 8)}))
    (tmp_path / "m" / ".git").mkdir()
    make_safetensors(tmp_path / "n" / "model.safetensors",
                     {"x": random_tensors(0, {"x": (8, 8)})["x"] * 1.0001})
    md = tmp_path / "r.md"
    result = analyze(f"a={base.parent}", f"b={tmp_path / 'n'}", "-q", "--drift", "--markdown", md)
    assert result.exit_code == 0, result.output
    lines = md.read_text().splitlines()
    headings = [h for h in lines if h.startswith("#")]
    assert headings[0] == "## tdedup analyze"
    assert all(h.startswith("### ") for h in headings[1:]), headings
    assert "### Drift of differing tensors, by layer" in headings
    assert "### Skipped (not read)" in headings
    assert "| a | .git/ (hidden folder) |" in lines


# -- 7: one percent convention ----------------------------------------------------------


def test_one_percent_convention():
    assert share(0.999893) == ">99%" and share(0.999893, 1) == ">99.9%"
    assert share(0.00001) == "<1%" and share(0.0004, 1) == "<0.1%"
    assert share(1.0) == "100%" and share(0.0) == "0%" and share(0.5, 1) == "50.0%"
    d = DerivableModel("q8", 1_000_000, 999_893, "f32", "Q8_0 quantization")
    assert "| >99% |" in derived_markdown([d])
    from rich.console import Console

    console = Console(width=200, record=True, no_color=True)
    console.print(derived_table([d]))
    assert ">99%" in console.export_text() and "100.0%" not in console.export_text()
    assert derived_markdown([d]).lstrip().startswith("### Derivable")


def test_gguf_model_name_in_markdown(tmp_path):
    """A model whose name comes from a GGUF path is escaped like any other string."""
    g = make_gguf(tmp_path / "a_b.gguf", random_tensors(0, {"x": (32,)}))
    result = analyze(g, "-q", "--markdown", "-")
    assert result.exit_code == 0 and "| a\\_b |" in result.stdout

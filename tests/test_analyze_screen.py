"""The screen before full hashing (analyzers/screen.py): analyze hashes in full only what
its length and three sampled places cannot set apart, and reports exactly what hashing
everything would.

The property: over models whose tensors recur whole, differ in one byte (at a sampled
place or not), share lengths or not, and are small, empty or large, the screened scan
partitions tensors exactly as the full digests do, and the overlap and derivation reports
are the same.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.factory import make_safetensors
from tdedup.analyzers.derivation import derivation_report
from tdedup.analyzers.overlap import compute_overlap
from tdedup.analyzers.scan import ScannedModels, hash_models, index_models, screen_models
from tdedup.analyzers.screen import DISTINCT_PREFIX, SAMPLE_BYTES, SAMPLED_FROM
from tdedup.errors import InputError


def _partition(scanned: ScannedModels) -> list[list[tuple[str, str]]]:
    """The classes of equal tensors, as sorted lists of (model, tensor name)."""
    classes: dict[tuple[str, int], list[tuple[str, str]]] = defaultdict(list)
    for m in scanned.models:
        for h in scanned.hashed[m.name]:
            classes[h.key].append((m.name, h.record.name))
    return sorted(sorted(c) for c in classes.values())


def _both(models):
    full = hash_models(models)
    screened = hash_models(models, screen=screen_models(models))
    return full, screened


# A tensor: (content id, size in float32 elements, where a variant differs: None for the
# content itself, else a byte position as a fraction of the tensor).
_size = st.sampled_from([0, 1, 5, 3000, SAMPLED_FROM // 4 - 1, SAMPLED_FROM // 4, 300_000])
_where = st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9999]),
                   st.floats(0.0, 0.9999))
_tensor = st.tuples(st.integers(0, 4), _size, _where)
_models = st.lists(st.lists(_tensor, min_size=1, max_size=6), min_size=1, max_size=4)


def _write(root: Path, spec) -> list[str]:
    args = []
    for i, tensors in enumerate(spec):
        arrays = {}
        for j, (cid, size, where) in enumerate(tensors):
            a = np.random.default_rng(cid * 100 + size).standard_normal(size).astype(np.float32)
            if where is not None and size:
                b = a.view(np.uint8)
                b[min(int(where * b.size), b.size - 1)] ^= 0x40
            arrays[f"t{j}"] = a
        args.append(f"m{i}={make_safetensors(root / f'm{i}.safetensors', arrays)}")
    return args


@settings(max_examples=60, deadline=None)
@given(_models)
def test_screened_scan_partitions_like_full_hashes(spec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = index_models(_write(Path(tmp), spec))
        full, screened = _both(models)
        assert _partition(screened) == _partition(full)
        assert (compute_overlap(screened.models, screened.hashed).to_dict()
                == compute_overlap(full.models, full.hashed).to_dict())
        # A digest that is not a placeholder is the true one.
        for m in models:
            for a, b in zip(full.hashed[m.name], screened.hashed[m.name]):
                assert b.digest.startswith(DISTINCT_PREFIX) or b.digest == a.digest


def test_only_undecided_tensors_are_read_in_full(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(SAMPLED_FROM // 4).astype(np.float32)
    tuned = shared.copy()
    tuned[shared.size // 2 + SAMPLE_BYTES] += 1.0  # between the sampled places: hashed to tell
    small = np.ones(77, np.float32)  # shares its length: too small to sample, hashed
    a = make_safetensors(tmp_path / "a.safetensors", {"w": shared, "small": small,
                                                      "lone": np.ones(99, np.float32),
                                                      "ft": tuned + 1.0})
    b = make_safetensors(tmp_path / "b.safetensors", {"w": shared, "small": small + 1,
                                                      "lone2": np.ones(1234, np.float32),
                                                      "ft": tuned + 2.0})
    c = make_safetensors(tmp_path / "c.safetensors", {"w": tuned})
    models = index_models([f"a={a}", f"b={b}", f"c={c}"])
    full, screened = _both(models)
    assert _partition(screened) == _partition(full)
    counts = screened.counts
    # a/w, b/w and c/w share their samples; a/ft and b/ft differ at their start.
    assert counts.hashed_bytes == 3 * shared.nbytes + 2 * small.nbytes
    assert counts.screened_bytes == screened.tensor_bytes - counts.hashed_bytes
    groups = compute_overlap(screened.models, screened.hashed).groups
    assert [(g.count, g.models) for g in groups] == [(2, ["a", "b"])]


def test_reports_match_full_hashing_on_the_corpus(corpus, corpus_facts) -> None:
    """The whole corpus (casts, quantizations, fine-tunes, GGUF ladders): same overlap
    and derivation reports from a screened scan as from full digests."""
    from tdedup.cli.analyze import analyze_paths
    args = [f"{e.replace('/', '-')}={corpus / e}" for e in corpus_facts["models"]]
    screened, report = analyze_paths(args, quiet=True)
    full = hash_models(screened.models)
    assert screened.counts.screened_bytes > 0
    assert report.to_dict() == compute_overlap(full.models, full.hashed).to_dict()
    assert ([d.to_dict() for d in derivation_report(screened)]
            == [d.to_dict() for d in derivation_report(full)])


def test_a_file_truncated_before_the_screen_is_one_error(tmp_path: Path) -> None:
    w = np.arange(SAMPLED_FROM // 4, dtype=np.float32)
    a = make_safetensors(tmp_path / "a.safetensors", {"w": w})
    b = make_safetensors(tmp_path / "b.safetensors", {"w": w})
    models = index_models([f"a={a}", f"b={b}"])
    with open(b, "r+b") as f:
        f.truncate(b.stat().st_size - 100)
    with pytest.raises(InputError, match="shrank"):
        screen_models(models)


def test_one_file_given_twice_is_read_once(tmp_path: Path) -> None:
    """Hub cache revisions that share a blob, or a model given under two names: their
    bytes are one file's, hashed once, whatever name or link leads to it."""
    rng = np.random.default_rng(1)
    a = make_safetensors(tmp_path / "a.safetensors",
                         {"w": rng.standard_normal(SAMPLED_FROM).astype(np.float32),
                          "b": rng.standard_normal(10).astype(np.float32)})
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    alone = hash_models(index_models([f"x={a}"]))
    models = index_models([f"x={a}", f"y={link}", f"z={a}"])
    for screen in (None, screen_models(models)):
        scanned = hash_models(models, screen=screen)
        assert scanned.counts.hashed_bytes == alone.tensor_bytes
        assert scanned.counts.same_file_bytes == 2 * alone.tensor_bytes
        assert scanned.counts.hashed_files == 3  # `--index` says "0 of 3 weight files"
        for name in "xyz":
            assert ([h.digest for h in scanned.hashed[name]]
                    == [h.digest for h in alone.hashed["x"]])


def _analyze_after_screen(monkeypatch, args: list[str], then) -> object:
    """``tdedup analyze --json ARGS`` with ``then()`` run right after the screen."""
    from typer.testing import CliRunner

    import tdedup.analyzers.scan as scan
    from tdedup.cli.app import app

    screen = scan.screen_models

    def screen_then(models):
        got = screen(models)
        then()
        return got

    monkeypatch.setattr(scan, "screen_models", screen_then)
    return CliRunner().invoke(app, ["analyze", "--json", *args])


@pytest.mark.parametrize("shared", [True, False])
def test_a_file_rewritten_after_the_screen_is_told(tmp_path: Path, monkeypatch,
                                                   shared: bool) -> None:
    """The screen's decisions are of the bytes it saw: a file rewritten in place after it
    (same size, same inode) is reported as changed, whether the hash pass reads it
    (``shared``: a tensor of it is undecided) or the screen decided all of it."""
    rng = np.random.default_rng(2)
    x, y, z, w = (rng.standard_normal(SAMPLED_FROM // 4).astype(np.float32) for _ in range(4))
    a = make_safetensors(tmp_path / "a.safetensors", {"t1": x, "t2": y})
    b = make_safetensors(tmp_path / "b.safetensors", {"t1": x if shared else z, "t2": z})
    new = make_safetensors(tmp_path / "new.safetensors", {"t1": w, "t2": y}).read_bytes()

    def rewrite() -> None:
        with open(b, "r+b") as f:
            f.write(new)

    res = _analyze_after_screen(monkeypatch, [str(a), str(b)], rewrite)
    assert res.exit_code == 0, res.output
    assert f"{b}: changed while it was hashed" in res.stderr


def test_a_file_cut_short_after_indexing_is_one_error(tmp_path: Path, monkeypatch) -> None:
    """A tensor the screen sets apart is never read; the file holding it, truncated after
    its header was read, is still one error, as the read would have been."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SAMPLED_FROM // 4).astype(np.float32)
    a = make_safetensors(tmp_path / "a.safetensors", {"t1": x})
    b = make_safetensors(tmp_path / "b.safetensors",
                         {"t1": x, "zz": rng.standard_normal(77_777).astype(np.float32)})
    res = _analyze_after_screen(monkeypatch, [str(a), str(b)],
                                lambda: os.truncate(b, b.stat().st_size - 100_000))
    assert res.exit_code == 2
    assert "shrank" in res.stderr and str(b) in res.stderr

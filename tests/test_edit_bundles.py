"""``add``, ``remove`` and bundles as inputs: a bundle changes without re-encoding what it
holds, and the result matches a fresh pack (within 2%) and unpacks byte for byte.

Time is measured by bench/add_vs_pack.py, not here; these tests show the work that makes
``add`` cheap: every blob of the old bundle is carried over with its stored bytes (same
checksum), and only the new models' contents are encoded.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tdedup
from helpers.delta_helpers import shared_family
from tdedup.cli.app import app
from tdedup.format.bundle.reader import Bundle

pytest.importorskip("torch")
runner = CliRunner()


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    return shared_family(tmp_path_factory)


def _restored_equal(bundle: Path, dest: Path, sources: dict[str, Path]) -> None:
    tdedup.unpack(bundle, dest)
    for name, src in sources.items():
        assert filecmp.cmp(dest / name / src.name, src, shallow=False), name


def test_add_fine_tunes_to_a_bundle_of_their_base(fam, tmp_path):
    base = tmp_path / "base.tdd"
    tdedup.pack([f"base={fam['base']}"], base)
    with Bundle(base) as b:
        old = {h: (r.checksum, r.stored_length) for h, r in b.manifest.blobs.items()}
    fresh = tdedup.pack([f"base={fam['base']}", f"ft={fam['ft']}", f"lora={fam['lora']}"],
                        tmp_path / "fresh.tdd")
    r = tdedup.add(base, [f"ft={fam['ft']}", f"lora={fam['lora']}"])
    assert r.models == ["base", "ft", "lora"]
    assert r.copied_blobs == len(old)  # nothing the bundle held was re-encoded
    with Bundle(base) as b:
        for h, (checksum, stored) in old.items():
            assert (b.blob(h).checksum, b.blob(h).stored_length) == (checksum, stored)
        assert any(rec.base in old for rec in b.manifest.blobs.values())  # deltas vs base
    assert r.bundle_bytes <= fresh.bundle_bytes * 1.02
    tdedup.verify(base)
    _restored_equal(base, tmp_path / "out", {n: fam[n] for n in ("base", "ft", "lora")})


def test_remove_then_add_round_trips(fam, tmp_path):
    bundle = tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}", f"ft={fam['ft']}", f"lora={fam['lora']}"], bundle)
    first = bundle.stat().st_size
    r = tdedup.remove(bundle, ["ft"])
    assert r.models == ["base", "lora"] and r.new_blobs == 0
    assert bundle.stat().st_size < first
    tdedup.add(bundle, [f"ft={fam['ft']}"])
    assert abs(bundle.stat().st_size - first) <= first * 0.02
    with Bundle(bundle) as b:
        assert sorted(b.model_names) == ["base", "ft", "lora"]
    _restored_equal(bundle, tmp_path / "out", {n: fam[n] for n in ("base", "ft", "lora")})


def test_merged_bundle_equals_a_fresh_pack(fam, tmp_path):
    a, b = tmp_path / "a.tdd", tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}", f"copy={fam['copy']}"], a)
    tdedup.pack([f"ft={fam['ft']}", f"lora={fam['lora']}"], b)
    fresh = tdedup.pack([f"{n}={fam[n]}" for n in ("base", "copy", "ft", "lora")],
                        tmp_path / "fresh.tdd")
    merged = tmp_path / "merged.tdd"
    res = runner.invoke(app, ["pack", str(a), str(b), "-o", str(merged), "-q"])
    assert res.exit_code == 0, res.output
    assert merged.stat().st_size <= fresh.bundle_bytes * 1.02
    assert not list(tmp_path.glob(".tdedup-stage-*"))  # the staging folder is gone
    _restored_equal(merged, tmp_path / "out", {n: fam[n] for n in ("base", "copy", "ft", "lora")})


def test_merge_in_python_and_a_bundle_given_to_pack(fam, tmp_path):
    """``tdedup.merge`` is the CLI's merge for Python callers; ``tdedup.pack`` given a
    bundle says what it is and where merging lives (it said "neither a safetensors nor a
    GGUF file")."""
    a = tmp_path / "a.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    r = tdedup.merge([str(a), f"ft={fam['ft']}"], tmp_path / "m.tdd")
    assert r.models == ["base", "ft"]
    _restored_equal(r.path, tmp_path / "out", {n: fam[n] for n in ("base", "ft")})
    with pytest.raises(tdedup.TdedupError, match="a tdedup bundle") as e:
        tdedup.pack([str(a)], tmp_path / "x.tdd")
    assert "tdedup.merge" in (e.value.hint or "")


def test_analyze_reads_a_bundle_like_its_models(fam, tmp_path):
    bundle = tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}", f"ft={fam['ft']}"], bundle)
    from_bundle = runner.invoke(app, ["analyze", str(bundle), "--json", "-q"])
    from_files = runner.invoke(app, ["analyze", f"base={fam['base']}", f"ft={fam['ft']}",
                                     "--json", "-q"])
    assert from_bundle.exit_code == 0, from_bundle.output
    a, b = json.loads(from_bundle.stdout), json.loads(from_files.stdout)
    for key in ("total_tensor_bytes", "distinct_tensor_bytes", "total_tensors", "pairs"):
        assert a[key] == b[key], key


def test_add_cli_refusals_change_nothing(fam, tmp_path):
    bundle = tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}"], bundle)
    before = bundle.read_bytes()
    cases = [
        ["add", str(bundle), f"base={fam['ft']}"],  # the name is taken
        ["add", str(bundle), str(tmp_path / "missing.safetensors")],
        ["add", str(bundle), str(fam["ft"]), str(fam["ft"])],  # the same input twice
        ["add", str(bundle), str(fam["ft"]), "-o", str(fam["ft"])],  # output is an input
        ["remove", str(bundle), "nope"],
        ["remove", str(bundle), "base"],  # nothing would be left
    ]
    for args in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert len(res.stderr.strip().splitlines()) <= 2, res.stderr  # error (+ hint)
        assert res.stderr.startswith("error: ")
        assert bundle.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tdd"]


def test_add_takes_a_bundle_of_models(fam, tmp_path):
    a, b = tmp_path / "a.tdd", tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    tdedup.pack([f"ft={fam['ft']}", f"lora={fam['lora']}"], b)
    res = runner.invoke(app, ["add", str(a), str(b), "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["base", "ft", "lora"]
    dry = runner.invoke(app, ["pack", str(b), "-o", str(tmp_path / "x.tdd"), "--dry-run",
                              "--json"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["model_names"] == ["ft", "lora"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tdd", "b.tdd"]


def test_add_keeps_a_serving_bundle_serving(fam, tmp_path):
    from tdedup.format.bundle.constants import BlobEncoding

    bundle = tmp_path / "s.tdd"
    tdedup.pack([f"base={fam['base']}"], bundle, layout="serving")
    tdedup.add(bundle, [f"ft={fam['ft']}", f"copy={fam['copy']}"])
    with Bundle(bundle) as b:
        assert b.manifest.summary["layout"] == "serving"
        assert all(r.encoding is BlobEncoding.RAW
                   for r in b.manifest.blobs.values() if r.base is None)
    _restored_equal(bundle, tmp_path / "out", {n: fam[n] for n in ("base", "ft", "copy")})


def _tensor_blobs(bundle: Path) -> dict:
    with Bundle(bundle, mapped=False) as b:
        return {t.hash: b.blob(t.hash) for m in b.manifest.models for f in m.files
                for t in f.tensors}


def test_merge_honours_layout(fam, tmp_path):
    """``pack A.tdd B.tdd --layout serving`` writes a serving bundle (it used to keep the
    first bundle's compact layout and exit 0); without --layout the first one's is kept."""
    from tdedup.format.bundle.constants import BlobEncoding

    a, b = tmp_path / "a.tdd", tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}", f"copy={fam['copy']}"], a)
    tdedup.pack([f"ft={fam['ft']}", f"lora={fam['lora']}"], b)
    sources = {n: fam[n] for n in ("base", "copy", "ft", "lora")}
    for i, (args, layout) in enumerate([
            (["--layout", "serving"], "serving"), ([], "compact"),
            (["--layout", "compact"], "compact")]):
        out = tmp_path / f"m{i}.tdd"
        res = runner.invoke(app, ["pack", str(a), str(b), "-o", str(out), "-q", *args])
        assert res.exit_code == 0, res.output
        assert f"({layout} layout)" in " ".join(res.stdout.split())
        insp = runner.invoke(app, ["inspect", str(out), "--json"])
        assert json.loads(insp.stdout)["layout"] == layout
        blobs = _tensor_blobs(out)
        if layout == "serving":
            assert all(r.encoding is BlobEncoding.RAW for r in blobs.values() if r.base is None)
            assert any(r.base is not None for r in blobs.values())  # the deltas are kept
        tdedup.verify(out)
        _restored_equal(out, tmp_path / f"out{i}", sources)
    # A serving first bundle stays serving unless told; a lone bundle is re-laid too.
    res = runner.invoke(app, ["pack", str(tmp_path / "m0.tdd"), "-o", str(tmp_path / "s.tdd"),
                              "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["layout"] == "serving"
    res = runner.invoke(app, ["pack", str(tmp_path / "m0.tdd"), "-o", str(tmp_path / "c.tdd"),
                              "--layout", "compact", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["layout"] == "compact"
    assert (tmp_path / "c.tdd").stat().st_size < (tmp_path / "s.tdd").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    _restored_equal(tmp_path / "c.tdd", tmp_path / "out-c", sources)


def test_merge_dry_run_estimates_the_merge(fam, tmp_path):
    a, b = tmp_path / "a.tdd", tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    tdedup.pack([f"ft={fam['ft']}", f"copy={fam['copy']}"], b)
    for layout in ("compact", "serving"):
        out = tmp_path / f"m-{layout}.tdd"
        args = ["pack", str(a), str(b), "-o", str(out), "--layout", layout]
        dry = runner.invoke(app, [*args, "--dry-run", "--json"])
        assert dry.exit_code == 0, dry.output
        e = json.loads(dry.stdout)
        assert not out.exists()
        assert e["merge"] is True and e["layout"] == layout
        assert e["copied_blobs"] == len(_tensor_blobs(a)) and e["derived_blobs"] == 0
        assert runner.invoke(app, [*args, "-q"]).exit_code == 0
        stored = sum(r.stored_length for r in _tensor_blobs(out).values())
        assert abs(e["estimated_bytes"] - stored) <= 0.05 * stored, (layout, e, stored)
    text = runner.invoke(app, ["pack", str(a), str(b), "-o", str(tmp_path / "x.tdd"),
                               "--dry-run"]).stdout
    assert "kept from" in text and "against them" in " ".join(text.split())


def _refused(args: list[str], *, names: Path, hint: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {names}: "), res.stderr
    assert lines[1].startswith("hint: ") and hint in lines[1], res.stderr
    return lines[1]


def test_merge_name_clash_names_its_bundle_and_the_hint_works(fam, tmp_path):
    """Two bundles that both hold ``base``: the error names the second (the clash comes
    from it, not from the first), and what the hint says works."""
    a, b, c = tmp_path / "a.tdd", tmp_path / "b.tdd", tmp_path / "c.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    tdedup.pack([f"base={fam['ft']}"], b)
    tdedup.pack([f"base={fam['lora']}", f"copy={fam['copy']}"], c)
    both = tmp_path / "both.tdd"
    for args in (["pack", str(a), str(b), "-o", str(both)],
                 ["pack", str(a), str(b), "-o", str(both), "--dry-run"],
                 ["add", str(a), str(b)]):
        _refused(args, names=b, hint=f"NEWNAME={b}")
    assert not both.exists()
    res = runner.invoke(app, ["pack", str(a), f"ft={b}", "-o", str(both), "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["base", "ft"]
    _restored_equal(both, tmp_path / "out", {"base": fam["base"], "ft": fam["ft"]})
    # The first bundle may be renamed too; `add` takes NAME=BUNDLE alike.
    res = runner.invoke(app, ["pack", f"orig={a}", str(b), "-o", str(tmp_path / "r.tdd"),
                              "--json", "-q"])
    assert res.exit_code == 0 and json.loads(res.stdout)["models"] == ["orig", "base"]
    res = runner.invoke(app, ["add", str(a), f"ft={b}", "-o", str(tmp_path / "add.tdd"),
                              "--json", "-q"])
    assert res.exit_code == 0 and json.loads(res.stdout)["models"] == ["base", "ft"]
    # A bundle of several models takes no NAME=; the hint's two commands work.
    hint = _refused(["pack", str(a), str(c), "-o", str(both), "--force"], names=c,
                    hint=f"tdedup remove {c} base")
    assert f"tdedup unpack {c} DIR -m base" in hint
    _refused(["pack", str(a), f"x={c}", "-o", str(both), "--force"], names=f"x={c}",
             hint="tdedup unpack")
    rest = tmp_path / "rest.tdd"
    assert runner.invoke(app, ["remove", str(c), "base", "-o", str(rest)]).exit_code == 0
    assert runner.invoke(app, ["unpack", str(c), str(tmp_path / "DIR"), "-m", "base"]
                         ).exit_code == 0
    res = runner.invoke(app, ["pack", str(a), str(rest), f"lora={tmp_path / 'DIR' / 'base'}",
                              "-o", str(both), "--force", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["base", "copy", "lora"]
    _restored_equal(both, tmp_path / "out2", {n: fam[n] for n in ("base", "copy", "lora")})


def test_a_path_whose_name_is_taken_is_named_in_the_error(fam, tmp_path):
    a = tmp_path / "a.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    _refused(["pack", str(a), f"base={fam['ft']}", "-o", str(tmp_path / "x.tdd")],
             names=fam["ft"], hint="NAME=PATH")
    _refused(["add", str(a), f"base={fam['ft']}"], names=fam["ft"], hint="NAME=PATH")


def _words(res) -> str:
    return " ".join(res.stdout.split())  # the console wraps long lines


def test_counts_take_the_right_number(fam, tmp_path):
    one = tmp_path / "one.tdd"
    res = runner.invoke(app, ["pack", f"base={fam['base']}", "-o", str(one)])
    assert res.exit_code == 0 and "packed 1 model into" in _words(res), res.stdout
    res = runner.invoke(app, ["add", str(one), f"ft={fam['ft']}"])
    assert "added 1 model: " in _words(res) and "now holds 2 models" in _words(res), res.stdout
    res = runner.invoke(app, ["remove", str(one), "ft"])
    assert "removed 1 model: " in _words(res) and "now holds 1 model," in _words(res), res.stdout
    res = runner.invoke(app, ["pack", str(one), "-o", str(tmp_path / "m.tdd")])
    assert "merged 1 model into" in _words(res), res.stdout
    res = runner.invoke(app, ["pack", f"base={fam['base']}", "-o", str(tmp_path / "x.tdd"),
                              "--dry-run"])
    assert "for 1 model," in _words(res), res.stdout


def test_an_edit_in_place_follows_a_link_and_keeps_the_mode(fam, tmp_path):
    """``add``/``remove`` over a link replace the file it names (the link stays a link),
    with its permissions (a private bundle stayed world-readable: 0600 became 0644)."""
    import os
    import stat

    target = tmp_path / "target.tdd"
    tdedup.pack([f"base={fam['base']}"], target)
    target.chmod(0o600)
    alias = tmp_path / "alias.tdd"
    alias.symlink_to(target.name)
    tdedup.add(alias, [f"ft={fam['ft']}"])
    assert alias.is_symlink() and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    with Bundle(target) as b:
        assert b.model_names == ["base", "ft"]
    tdedup.remove(alias, ["ft"])
    assert alias.is_symlink() and stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_two_edits_at_once_never_drop_one(fam, tmp_path):
    """A second ``add`` while one holds the bundle is refused at once; a bundle replaced
    while an edit ran (by a tool that takes no lock) makes the edit fail, not publish a
    bundle without the other's change."""
    import fcntl
    import shutil

    from tdedup.errors import OutputError

    b = tmp_path / "b.tdd"
    tdedup.pack([f"base={fam['base']}"], b)
    with open(b, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="another tdedup is changing"):
            tdedup.add(b, [f"ft={fam['ft']}"])
    other = tmp_path / "other.tdd"
    tdedup.pack([f"base={fam['base']}", f"copy={fam['copy']}"], other)

    def replace_midway(phase, n, total, done=[]):
        if phase == "hashing" and not done:
            done.append(1)
            shutil.copy(other, tmp_path / "swap.tdd")
            (tmp_path / "swap.tdd").replace(b)
    with pytest.raises(OutputError, match="changed by another process"):
        tdedup.add(b, [f"ft={fam['ft']}"], progress=replace_midway)
    with Bundle(b) as bb:
        assert bb.model_names == ["base", "copy"]  # the other writer's bundle, intact


def test_pack_never_replaces_an_output_that_appears_unless_forced(fam, tmp_path):
    from tdedup.errors import OutputExistsError

    out = tmp_path / "out.tdd"

    def appear(phase, n, total, done=[]):
        if phase == "packing" and not done:
            done.append(1)
            out.write_bytes(b"someone else's file")
    with pytest.raises(OutputExistsError, match="appeared"):
        tdedup.pack([f"base={fam['base']}"], out, force=False, progress=appear)
    assert out.read_bytes() == b"someone else's file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary
    tdedup.pack([f"base={fam['base']}"], out)  # the library default replaces
    with Bundle(out) as b:
        assert b.model_names == ["base"]


def test_summary_encodings_count_tensor_blobs_whoever_wrote_the_bundle(fam, tmp_path):
    """``summary.encodings`` counts tensor blobs (spec §6.1); a bundle written by ``add``
    counted every blob, layouts included."""
    fresh, a = tmp_path / "fresh.tdd", tmp_path / "a.tdd"
    tdedup.pack([f"base={fam['base']}", f"ft={fam['ft']}"], fresh)
    tdedup.pack([f"base={fam['base']}"], a)
    tdedup.add(a, [f"ft={fam['ft']}"])
    for path in (fresh, a):
        with Bundle(path) as b:
            tensors = {t.hash for m in b.manifest.models for f in m.files for t in f.tensors}
            assert sum(b.manifest.summary["encodings"].values()) == len(tensors), path


@pytest.mark.parametrize("layout", ["compact", "serving"])
def test_a_merge_that_renames_a_model_to_free_its_name(tmp_path, layout):
    """``pack old=A.tdd B.tdd`` where A's and B's model are both ``x``: the new ``x`` and
    the bundle's ``x`` (renamed ``old``) were one model to the planners, which read the
    new tensors' offsets out of the bundle: a corrupt bundle, and exit 0."""
    from helpers.factory import make_safetensors

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)  # 16 KB: raw in serving
    d1 = make_safetensors(tmp_path / "d1" / "model.safetensors", {"w": w, "b": w[0].copy()})
    d2 = make_safetensors(tmp_path / "d2" / "model.safetensors",
                          {"w": w + np.float32(1e-3), "b": w[0] * np.float32(2)})
    a, b, out = tmp_path / "a.tdd", tmp_path / "b.tdd", tmp_path / "o.tdd"
    tdedup.pack([f"x={d1}"], a, layout=layout)
    tdedup.pack([f"x={d2}"], b, layout=layout)
    res = runner.invoke(app, ["pack", f"old={a}", str(b), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    tdedup.verify(out)
    tdedup.unpack(out, tmp_path / "out")
    assert (tmp_path / "out" / "x" / "model.safetensors").read_bytes() == d2.read_bytes()
    assert (tmp_path / "out" / "old" / "model.safetensors").read_bytes() == d1.read_bytes()


def test_a_killed_merges_relaid_copy_is_removed_by_the_next(fam, tmp_path):
    """A merge into another layout copies its first bundle beside the output first; a
    merge killed then left that copy (a whole bundle) for good."""
    import subprocess
    import sys

    a, out = tmp_path / "a.tdd", tmp_path / "out.tdd"
    tdedup.pack([f"base={fam['base']}"], a)
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                    "from tdedup._fs import open_temp; "
                    "open_temp(Path(sys.argv[1]))[1].write(b'x' * 100); os._exit(9)",
                    str(out.with_name(out.name + ".relaid"))], check=False)
    assert [p for p in tmp_path.iterdir() if ".relaid" in p.name]
    tdedup.merge([str(a), f"ft={fam['ft']}"], out, layout="serving")
    assert not [p for p in tmp_path.iterdir() if ".relaid" in p.name]


def test_no_clobber_publishing_without_hard_links(fam, tmp_path, monkeypatch):
    """File systems without hard links (vfat, exFAT, some network mounts) refuse
    ``os.link``: the bundle is still published, never over a file that is there."""
    import errno
    import os

    from tdedup.errors import OutputExistsError

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "v.tdd"
    tdedup.pack([f"base={fam['base']}"], out, force=False)
    tdedup.verify(out)

    def appear(phase, n, total, done=[]):
        if phase == "packing" and not done:
            done.append(1)
            (tmp_path / "w.tdd").write_bytes(b"theirs")
    with pytest.raises(OutputExistsError):
        tdedup.pack([f"base={fam['base']}"], tmp_path / "w.tdd", force=False, progress=appear)
    assert (tmp_path / "w.tdd").read_bytes() == b"theirs"


def test_a_dangling_link_as_output_is_refused_before_packing(fam, tmp_path):
    (tmp_path / "dang.tdd").symlink_to(tmp_path / "missing" / "x.tdd")
    res = runner.invoke(app, ["pack", str(fam["base"]), "-o", str(tmp_path / "dang.tdd")])
    assert res.exit_code == 2 and "a link to a missing file" in res.stderr, res.output

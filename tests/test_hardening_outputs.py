"""Where outputs go (issue 14, causes 2, 3, 4, 12, 16, 18), each test the attack:

- a folder of the destination swapped for a symbolic link while unpack runs (before the
  folders are made, and after they are opened): nothing is written outside DEST;
- ``pack -o`` an input file or into an input folder, ``unpack --force`` over the bundle
  being read: refused with one line, the input untouched;
- ``pack -o ""``, ``-o .``, ``-o /``: one line, not a ValueError;
- a file name at the file system's limit packs *and* unpacks (the temporary name fits);
- a failed unpack whose cleanup meets a step that fails still removes the rest;
- two files with one sha256 but different blobs: verify and unpack both call it
  corruption.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import hostile_helpers as hh
from helpers.bundle_helpers import tree
from typer.testing import CliRunner

import tdedup
from tdedup.cli.app import app
from tdedup.errors import (
    IntegrityError,
    TdedupError,
    UnsafePathError,
)

from helpers.cli_checks import one_line  # noqa: E402

runner = CliRunner()


def everything(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# -- cause 2: a folder swapped for a link at any moment -------------------------------

def _swap_for_link(folder: Path, outside: Path) -> None:
    if folder.exists():
        folder.rename(folder.with_name(folder.name + ".moved"))
    folder.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("phase,where", [("checking", "base"), ("restoring", "base"),
                                         ("restoring", "base/sub")])
def test_a_link_swapped_in_during_unpack_never_redirects_a_write(nested_bundle, tmp_path, phase,
                                                                   where):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    done = []

    def progress(p, n, total):
        if p == phase and not done:
            done.append(p)
            (dest / where).parent.mkdir(parents=True, exist_ok=True)
            _swap_for_link(dest / where, outside)

    try:
        tdedup.unpack(nested_bundle, dest, progress=progress, workers=1)
    except UnsafePathError as e:
        assert e.path == str(dest) and "symbolic link" in e.message
    assert done
    assert everything(outside) == []  # nothing landed where the link points


def test_a_link_swapped_in_before_the_folders_are_made_is_one_line(nested_bundle, tmp_path,
                                                                   monkeypatch):
    from contextlib import contextmanager

    from tdedup.cli import bundle_commands

    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()

    @contextmanager
    def racing(quiet=False):
        def progress(p, n, total):
            if p == "checking" and not (dest / "base").is_symlink():
                _swap_for_link(dest / "base", outside)
        yield progress

    monkeypatch.setattr(bundle_commands, "phased_progress", racing)
    one_line(runner.invoke(app, ["unpack", str(nested_bundle), str(dest)]), "symbolic link")
    assert everything(outside) == [] and everything(dest) == ["base"]


# -- cause 3: an output that is an input ----------------------------------------------

def test_pack_refuses_to_overwrite_its_input(nested_family, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(nested_family["base"], src)
    weights = src / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, src / "b.tdd", src / "sub" / "b.tdd"):
        r = runner.invoke(app, ["pack", str(src), "-o", str(out)])
        one_line(r, str(out), "input")
    link = tmp_path / "link.safetensors"
    link.symlink_to(weights)
    one_line(runner.invoke(app, ["pack", str(weights), "-o", str(link)]), "input")
    os.link(weights, tmp_path / "hard.safetensors")
    one_line(runner.invoke(app, ["pack", str(weights), "-o", str(tmp_path / "hard.safetensors")]),
             "input")
    assert weights.read_bytes() == before
    assert not (src / "b.tdd").exists() and not [p for p in src.rglob(".*tdedup*")]


def test_unpack_force_refuses_to_overwrite_the_bundle_it_reads(nested_bundle, tmp_path):
    dest = tmp_path / "dest"
    tdedup.unpack(nested_bundle, dest)
    victim = dest / "base" / "config.json"
    victim.unlink()
    shutil.copy(nested_bundle, victim)
    before = victim.read_bytes()
    one_line(runner.invoke(app, ["unpack", "--force", str(victim), str(dest)]), "input")
    assert victim.read_bytes() == before


# -- cause 18: outputs that are no file name ----------------------------------------------

@pytest.mark.parametrize("out", ["", ".", "/", ".."])
def test_pack_output_that_is_no_file_is_one_line(nested_family, out):
    one_line(runner.invoke(app, ["pack", str(nested_family["base"]), "-o", out]), "file name")


# -- cause 4: names at the file system's limit ---------------------------------------------

def test_a_name_at_the_limit_packs_and_unpacks(nested_family, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    src = tmp_path / "m"
    shutil.copytree(nested_family["base"], src)
    long = "n" * (limit - len(".json")) + ".json"
    (src / long).write_text("{}")
    out = tmp_path / ("b" * (limit - 4) + ".tdd")
    tdedup.pack([f"m={src}"], out)
    dest = tmp_path / "dest"
    tdedup.unpack(out, dest)
    assert tree(dest / "m") == tree(src)
    assert [p for p in tmp_path.rglob(".*.tmp")] == []


# -- cause 12: cleanup goes on past a failed step --------------------------------------------

def test_a_failed_unpack_removes_its_folders_even_if_one_step_fails(nested_bundle, tmp_path,
                                                                     monkeypatch):
    def edit(d, o):
        d["models"][-1]["files"][-1]["sha256"] = "0" * 64
    bad = hh.rewrite_manifest(nested_bundle, tmp_path / "bad.tdd", edit)
    dest = tmp_path / "dest"
    real_unlink = os.unlink
    calls = []

    def flaky_unlink(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", flaky_unlink)
    with pytest.raises(TdedupError, match="sha256"):
        tdedup.unpack(bad, dest, workers=1)
    monkeypatch.undo()
    left = everything(dest) if dest.exists() else []
    # The one file whose removal failed stays (and its folders); nothing else does.
    assert len([p for p in left if (dest / p).is_file()]) <= 1, left


# -- cause 16: one sha256, two sets of blobs --------------------------------------------------

def test_same_sha256_with_other_blobs_is_corruption_for_verify_and_unpack(nested_bundle, tmp_path):
    def edit(d, o):
        base = next(m for m in d["models"] if m["name"] == "base")
        tuned = next(m for m in d["models"] if m["name"] == "tuned")
        fb = next(f for f in base["files"] if f["path"] == "model.safetensors")
        ft = next(f for f in tuned["files"] if f["path"] == "model.safetensors")
        ft["sha256"] = fb["sha256"]  # same sha256, but tuned's blobs restore other bytes
    bad = hh.rewrite_manifest(nested_bundle, tmp_path / "bad.tdd", edit)
    with pytest.raises(IntegrityError, match="sha256"):
        tdedup.verify(bad)
    with pytest.raises(IntegrityError, match="sha256"):
        tdedup.unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or everything(tmp_path / "dest") == []

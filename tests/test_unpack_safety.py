"""``unpack`` into folders that already hold files, or links.

- a non-empty destination is refused unless ``--force``;
- with ``--force`` only the bundle's own files are replaced (by their verified contents),
  never a file that is not part of the bundle, and never the target of a hard link;
- a destination, model folder, intermediate folder or file that is a symbolic link (or a
  path that resolves outside the destination) is refused before anything is written;
- a run that fails part-way leaves what was there before, and nothing of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import hostile_helpers as hh
import tdedup
from helpers.bundle_helpers import tree
from tdedup.cli.app import app
from tdedup.errors import OutputError, OutputExistsError, TdedupError, UnsafePathError

runner = CliRunner()


@pytest.fixture(scope="module")
def want(nested_family) -> dict[str, bytes]:
    return {f"{m}/{rel}": data for m in ("base", "tuned")
            for rel, data in tree(nested_family[m]).items()}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder``: (kind, bytes or link target, inode, mtime)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[p.relative_to(folder).as_posix()] = ("link", os.readlink(p))
        elif p.is_file():
            out[p.relative_to(folder).as_posix()] = ("file", p.read_bytes(), st.st_ino,
                                                     st.st_mtime_ns)
        else:
            out[p.relative_to(folder).as_posix()] = ("dir",)
    return out


def cli_error(args: list[str]) -> list[str]:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, result.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), result.stderr
    return lines


def test_a_non_empty_destination_needs_force(nested_bundle, tmp_path, want):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError):
        tdedup.unpack(nested_bundle, dest)
    lines = cli_error(["unpack", str(nested_bundle), str(dest)])
    assert "not empty" in lines[0] and "--force" in lines[-1]
    assert snapshot(tmp_path) == before


def test_an_empty_destination_needs_no_force(nested_bundle, tmp_path, want):
    dest = tmp_path / "dest"
    dest.mkdir()
    tdedup.unpack(nested_bundle, dest)
    assert tree(dest) == want


def test_force_replaces_only_the_bundles_own_files(nested_bundle, tmp_path, want):
    dest = tmp_path / "dest"
    tdedup.unpack(nested_bundle, dest)
    (dest / "base" / "config.json").write_text("edited")  # a bundle file, changed
    (dest / "base" / "model.safetensors").unlink()  # a bundle file, missing
    (dest / "base" / "notes.txt").write_text("mine")  # not in the bundle
    (dest / "base" / "sub" / "mine.bin").write_bytes(b"\0\1")
    (dest / "elsewhere").mkdir()
    (dest / "elsewhere" / "x").write_text("mine too")
    others = {k: v for k, v in snapshot(dest).items()
              if k in ("base/notes.txt", "base/sub/mine.bin", "elsewhere", "elsewhere/x")}
    result = runner.invoke(app, ["unpack", "--force", str(nested_bundle), str(dest)])
    assert result.exit_code == 0, result.output
    got = tree(dest)
    assert {k: got[k] for k in want} == want
    after = snapshot(dest)
    assert {k: after[k] for k in others} == others  # same bytes, inode and mtime
    assert set(got) - set(want) == {"base/notes.txt", "base/sub/mine.bin", "elsewhere/x"}


def test_force_never_writes_through_a_hard_link(nested_bundle, tmp_path, want):
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    dest = tmp_path / "dest"
    (dest / "base").mkdir(parents=True)
    os.link(outside, dest / "base" / "config.json")
    tdedup.unpack(nested_bundle, dest, force=True)
    assert outside.read_text() == "precious"
    assert (dest / "base" / "config.json").read_bytes() == want["base/config.json"]


def test_a_folder_where_a_file_goes_is_refused(nested_bundle, tmp_path):
    dest = tmp_path / "dest"
    (dest / "base" / "config.json").mkdir(parents=True)
    (dest / "base" / "config.json" / "inside").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="not a file"):
        tdedup.unpack(nested_bundle, dest, force=True)
    assert snapshot(tmp_path) == before


# -- symbolic links -------------------------------------------------------------------------

def links(tmp_path: Path) -> dict[str, callable]:
    """Ways a destination can lead outside itself; each makes its link and returns DEST."""
    outside = tmp_path / "outside"

    def dest_is_a_link():
        (tmp_path / "real").mkdir()
        (tmp_path / "dest").symlink_to(tmp_path / "real")
        return tmp_path / "dest"

    def model_folder():
        (tmp_path / "dest").mkdir()
        (tmp_path / "dest" / "base").symlink_to(outside)
        return tmp_path / "dest"

    def intermediate_folder():
        (tmp_path / "dest" / "base").mkdir(parents=True)
        (tmp_path / "dest" / "base" / "sub").symlink_to(outside)
        return tmp_path / "dest"

    def file_to_outside():
        (tmp_path / "dest" / "base").mkdir(parents=True)
        (tmp_path / "dest" / "base" / "config.json").symlink_to(outside / "victim.json")
        return tmp_path / "dest"

    def dangling_file_link():
        (tmp_path / "dest" / "base").mkdir(parents=True)
        (tmp_path / "dest" / "base" / "config.json").symlink_to(outside / "new.json")
        return tmp_path / "dest"

    def relative_escape():
        (tmp_path / "dest" / "tuned").mkdir(parents=True)
        (tmp_path / "dest" / "tuned" / "model.safetensors").symlink_to(
            "../../outside/victim.json")
        return tmp_path / "dest"

    return {f.__name__: f for f in (dest_is_a_link, model_folder, intermediate_folder,
                                    file_to_outside, dangling_file_link, relative_escape)}


@pytest.mark.parametrize("how", sorted(links(Path("/")).keys()))
def test_links_out_of_the_destination_are_refused_before_writing(nested_bundle, tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.json").write_text("precious")
    dest = links(tmp_path)[how]()
    before = snapshot(tmp_path)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        tdedup.unpack(nested_bundle, dest, force=True)
    lines = cli_error(["unpack", "--force", str(nested_bundle), str(dest)])
    assert "symbolic link" in lines[0]
    assert snapshot(tmp_path) == before  # nothing written, outside or in


def test_a_link_inside_the_destination_is_refused_too(nested_bundle, tmp_path):
    """Even a link that stays inside DEST is refused: its target could change between the
    check and the write; only real folders and files are written through."""
    dest = tmp_path / "dest"
    (dest / "real").mkdir(parents=True)
    (dest / "base").symlink_to(dest / "real")
    before = snapshot(tmp_path)
    with pytest.raises(UnsafePathError):
        tdedup.unpack(nested_bundle, dest, force=True)
    assert snapshot(tmp_path) == before


# -- failures part-way -----------------------------------------------------------------------

def test_a_failed_run_leaves_what_was_there_and_nothing_of_its_own(nested_bundle, tmp_path, want):
    """A hostile manifest whose last file fails its sha256: the files restored before it
    are removed again, files that were there stay (or hold their verified contents)."""
    def edit(d, o):
        d["models"][-1]["files"][-1]["sha256"] = "0" * 64
    bad = hh.rewrite_manifest(nested_bundle, tmp_path / "bad.tdd", edit)
    dest = tmp_path / "dest"
    (dest / "base").mkdir(parents=True)
    (dest / "base" / "config.json").write_text("old")
    (dest / "base" / "notes.txt").write_text("mine")
    before = tree(dest)
    with pytest.raises(TdedupError, match="sha256"):
        tdedup.unpack(bad, dest, force=True)
    after = tree(dest)
    assert sorted(after) == sorted(before), sorted(after)
    assert after["base/notes.txt"] == b"mine"
    assert after["base/config.json"] in (b"old", want["base/config.json"])
    assert sorted(p.name for p in dest.iterdir()) == ["base"]


def test_one_model_only(nested_bundle, tmp_path, want):
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["unpack", "--model", "tuned", str(nested_bundle), str(dest)])
    assert result.exit_code == 0, result.output
    assert tree(dest) == {k: v for k, v in want.items() if k.startswith("tuned/")}

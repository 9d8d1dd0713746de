"""Fuzz the two classes of issue 14 that the byte-level fuzzers do not reach.

- **Strings**: every hostile string of :data:`HOSTILE_STRINGS` (rich markup that closes
  an unopened tag or would be eaten, emoji codes, terminal escapes, C1 controls, a lone
  surrogate, bidi overrides, newlines, very long text) put in every field the CLI prints:
  manifest fields (``tool_version``, layouts, file paths, tensor names and dtypes, file
  ``info`` and ``summary`` values), and checkpoint fields (tensor names, metadata). Every
  command that prints them must exit 0 or 2 with one line, never a traceback, never pass
  a raw escape byte to the terminal.
- **Races**: an input file replaced, rewritten, truncated or removed at the k-th progress
  event of ``pack`` (every k); a bundle truncated at the k-th event of ``verify`` and
  ``unpack``; a destination folder swapped for a link at the k-th event of ``unpack``.
  pack either refuses with a :class:`TdedupError` and leaves nothing, or its bundle
  verifies; nothing is ever written outside the destination; no SIGBUS.

CI runs every string in every field with ``inspect``/``verify`` (and ``unpack`` for
paths), and every race point of the tiny family; ``bench/fuzz.py`` adds every command
and more seeds (bench/RESULTS.md ## fuzz).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tdedup
from helpers import hostile_helpers as hh
from tdedup.cli.app import app
from tdedup.errors import TdedupError

runner = CliRunner()

HOSTILE_STRINGS = [
    "[/i]", "[red]eaten[/red]", "[bold]x", "[link=file:///etc/passwd]x[/link]", "\\[x]",
    ":smile::thumbs_up:", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "\x9b31m", "\r\x08\x7f",
    "line\nbreak", "tab\there", "\u202eevil\u202c", "\udcff", "\ud800x", "%s%n{0}",
    "x" * 5000, "",
]

#: Manifest fields the CLI prints, as (label, edit(doc, value)).
def _set_layout(doc, v):
    doc["models"][0]["layout"] = v


def _set_tool(doc, v):
    doc["tool_version"] = v


def _set_path(doc, v):
    f = doc["models"][0]["files"][-1]
    f["path"] = f"sub{v}/{f['path']}" if v else f["path"]


def _set_tensor_name(doc, v):
    for f in doc["models"][0]["files"]:
        for t in f["tensors"]:
            t["name"] = v
            return


def _set_dtype(doc, v):
    for f in doc["models"][0]["files"]:
        for t in f["tensors"]:
            t["dtype"] = v
            return


def _set_info(doc, v):
    doc["models"][0]["files"][0]["info"] = {v: v}


def _set_summary(doc, v):
    doc["summary"] = {v: v, "encodings": {v: 1}}


MANIFEST_FIELDS: list[tuple[str, Callable]] = [
    ("layout", _set_layout), ("tool_version", _set_tool), ("file path", _set_path),
    ("tensor name", _set_tensor_name), ("tensor dtype", _set_dtype), ("file info", _set_info),
    ("summary", _set_summary)]


def check_cli(args: list[str], case: str, tally: hh.Tally | None = None) -> int:
    """Run a command: exit 0, or exit 2 with one ``error:`` line; never a traceback, an
    exception escaping, or a raw control byte on the terminal."""
    r = runner.invoke(app, args)
    out = r.stdout + r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), (case, r.exception)
    assert "Traceback" not in out, (case, out)
    assert not any(c in out for c in "\x1b\x07\x9b\x08\x7f\r"), (case, repr(out[:300]))
    assert r.exit_code in (0, 2), (case, r.exit_code, out)
    if r.exit_code == 2:
        lines = [x for x in r.stderr.splitlines() if not x.startswith("hint: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, r.stderr)
    if tally is not None:
        tally.cases += 1
        if r.exit_code == 2:
            tally.refused += 1
        else:
            tally.accepted += 1
    return r.exit_code


def manifest_string_cases(seed: Path, case: Path, commands: list[str],
                          tally: hh.Tally | None = None) -> int:
    """Every hostile string in every printed manifest field, through ``commands``."""
    n = 0
    for label, setter in MANIFEST_FIELDS:
        for v in HOSTILE_STRINGS:
            hh.rewrite_manifest(seed, case, lambda d, o, setter=setter, v=v: setter(d, v))
            for cmd in commands:
                args = [cmd, str(case)] + ([str(case.parent / "dest")] if cmd == "unpack"
                                           else [])
                if cmd == "unpack":
                    shutil.rmtree(case.parent / "dest", ignore_errors=True)
                check_cli(args, f"{cmd}: {label} = {v[:40]!r}", tally)
                n += 1
    return n


def checkpoint_string_cases(root: Path, commands: list[str],
                            tally: hh.Tally | None = None) -> int:
    """Every hostile string as a tensor name and a metadata value of a safetensors file
    (and, where the file system takes it, in the file's folder name)."""
    from safetensors.numpy import save_file

    n = 0
    for i, v in enumerate(HOSTILE_STRINGS):
        folder = root / f"s{i}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            save_file({v or "empty": np.ones(4, np.float32), "w": np.zeros(2, np.float32)},
                      str(folder / "model.safetensors"), metadata={"note": v})
        except Exception:  # noqa: BLE001 - safetensors refuses some names: nothing to test
            continue
        for cmd in commands:
            args = {"analyze": ["analyze", str(folder)],
                    "pack": ["pack", str(folder), "-o", str(root / f"s{i}.tdd")]}[cmd]
            check_cli(args, f"{cmd}: tensor name/metadata {v[:40]!r}", tally)
            n += 1
    return n


# -- races -------------------------------------------------------------------------------------

def _replace(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    new = p.with_name(p.name + ".new")
    new.write_bytes(bytes(data))
    os.replace(new, p)


def _rewrite(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    with open(p, "r+b") as f:
        f.write(data)


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _remove(p: Path) -> None:
    p.unlink()


RACE_ATTACKS = {"replaced": _replace, "rewritten": _rewrite, "truncated": _truncate,
                "removed": _remove}


def _events(fn) -> int:
    n = [0]
    fn(lambda phase, k, total: n.__setitem__(0, n[0] + 1))
    return n[0]


def pack_race_cases(src_root: Path, work: Path, tally: hh.Tally | None = None) -> int:
    """Every attack at every progress event of pack on the tiny family's base model."""
    cases = 0
    work.mkdir(parents=True, exist_ok=True)
    fresh = hh.make_tiny_family(src_root)
    n = _events(lambda cb: tdedup.pack([f"b={fresh['base']}", f"t={fresh['tuned']}"],
                                       work / "probe.tdd", progress=cb, workers=1))
    for how, attack in RACE_ATTACKS.items():
        for k in range(n + 1):
            case_dir = work / f"{how}-{k}"
            fam = {m: case_dir / m for m in ("base", "tuned")}
            for m in fam:
                shutil.copytree(fresh[m], fam[m])
            target = fam["base"] / "model.safetensors"
            seen = [0]

            def progress(phase, adv, total):
                seen[0] += 1
                if seen[0] == k:
                    attack(target)
            out = case_dir / "out" / "b.tdd"
            out.parent.mkdir()
            label = f"pack, input {how} at event {k}"
            try:
                tdedup.pack([f"b={fam['base']}", f"t={fam['tuned']}"], out, progress=progress,
                            workers=1)
            except TdedupError as e:
                assert "\n" not in e.message, (label, e.message)
                assert list(out.parent.iterdir()) == [], (label, list(out.parent.iterdir()))
                if tally is not None:
                    tally.refused += 1
            else:
                assert 0 < k <= n or k == 0, label
                tdedup.verify(out)  # a published bundle always verifies
                if tally is not None:
                    tally.accepted += 1
            cases += 1
            if tally is not None:
                tally.cases += 1
            shutil.rmtree(case_dir)
    return cases


def bundle_race_cases(bundle: Path, work: Path, tally: hh.Tally | None = None) -> int:
    """A bundle truncated at every event of verify and unpack, and the destination's
    model folder swapped for a link at every event of unpack."""
    cases = 0
    n_verify = _events(lambda cb: tdedup.verify(bundle, progress=cb))
    n_unpack = _events(lambda cb: tdedup.unpack(bundle, work / "probe", progress=cb))
    shutil.rmtree(work / "probe")
    for op, n in (("verify", n_verify), ("unpack", n_unpack), ("link", n_unpack)):
        for k in range(1, n + 1):
            case_dir = work / f"{op}-{k}"
            case_dir.mkdir()
            copy = case_dir / "b.tdd"
            shutil.copyfile(bundle, copy)
            outside = case_dir / "outside"
            outside.mkdir()
            dest = case_dir / "dest"
            dest.mkdir()
            seen = [0]

            def progress(phase, adv, total, op=op, k=k):
                seen[0] += 1
                if seen[0] != k:
                    return
                if op == "link":
                    base = dest / "base"
                    if base.exists():
                        base.rename(dest / "moved")
                    base.symlink_to(outside, target_is_directory=True)
                else:
                    _truncate(copy)
            label = f"{op}, attacked at event {k}"
            try:
                if op == "verify":
                    tdedup.verify(copy, progress=progress)
                else:
                    tdedup.unpack(copy, dest, progress=progress)
            except TdedupError as e:
                assert "\n" not in e.message, (label, e.message)
                if op == "unpack":
                    assert [p for p in dest.rglob("*")] == [], (label, list(dest.rglob("*")))
                if tally is not None:
                    tally.refused += 1
            else:
                if tally is not None:
                    tally.accepted += 1
            assert list(outside.iterdir()) == [], label  # never written through a link
            cases += 1
            if tally is not None:
                tally.cases += 1
            shutil.rmtree(case_dir)
    return cases


# -- the CI part -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    return hh.pack_tiny_family(tmp_path_factory.mktemp("seed"))


def test_hostile_strings_in_every_printed_manifest_field(seed, tmp_path):
    n = manifest_string_cases(seed, tmp_path / "case.tdd", ["inspect"])
    assert n == len(MANIFEST_FIELDS) * len(HOSTILE_STRINGS)


def test_hostile_strings_in_paths_reach_unpack_and_verify(seed, tmp_path):
    for v in HOSTILE_STRINGS:
        hh.rewrite_manifest(seed, tmp_path / "case.tdd", lambda d, o, v=v: _set_path(d, v))
        shutil.rmtree(tmp_path / "dest", ignore_errors=True)
        check_cli(["unpack", str(tmp_path / "case.tdd"), str(tmp_path / "dest")], repr(v))
        check_cli(["verify", str(tmp_path / "case.tdd")], repr(v))


def test_hostile_strings_in_checkpoints(tmp_path):
    assert checkpoint_string_cases(tmp_path, ["analyze", "pack"]) > 0


def test_every_race_point_of_pack(tmp_path):
    assert pack_race_cases(tmp_path / "src", tmp_path / "work") > 0


def test_every_race_point_of_verify_and_unpack(seed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert bundle_race_cases(seed, work) > 0

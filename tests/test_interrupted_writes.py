"""Interrupted writes never leave a file at the target path, never damage an existing one,
and never stop a later run.

- ``tdedup pack`` and ``tdedup unpack`` subprocesses are killed with SIGKILL at random
  points, many times: no file appears at the target path (an existing bundle there is
  either untouched or wholly replaced), every restored file is complete or absent, and a
  later run succeeds and removes the temporary files the killed runs left.
- Running out of space (``RLIMIT_FSIZE`` in the child) gives one clear line, exit 2, and
  leaves nothing behind: no bundle, no restored file, no temporary file.
- The stale-temporary cleanup removes only files of dead writers whose lock is free.

CI kills each command 6 times (~25 s); the ``slow`` run 40 times each.
"""

from __future__ import annotations

import fcntl
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tdedup
from tdedup._fs import TEMP_NAME_RE, remove_stale_temps

from helpers import hostile_helpers as hh
from helpers.bundle_helpers import tree

KILLS_CI, KILLS_SLOW = 6, 40


def tdedup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tdedup", *args]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Two ~12 MB safetensors models sharing half their tensors, and a config each: big
    enough that hashing, encoding and writing take a noticeable part of a run."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("family")
    rng = np.random.default_rng(1)
    shared = {f"layer{i}.weight": rng.standard_normal((384, 1024)).astype(np.float32)
              for i in range(4)}
    out = {}
    for name in ("a", "b"):
        own = {f"head{i}.weight": rng.standard_normal((384, 1024)).astype(np.float32)
               for i in range(4)}
        folder = root / name
        folder.mkdir()
        save_file(shared | own, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(f'{{"name": "{name}"}}\n')
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def packed(family, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("packed") / "family.tdd"
    tdedup.pack([f"{k}={v}" for k, v in family.items()], bundle)
    return bundle


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_NAME_RE.match(p.name)]


def kill_at_random(cmd: list[str], delay: float, watch: Path) -> tuple[bool, bool]:
    """Start ``cmd``, SIGKILL it after ``delay`` s. Returns (finished before the kill,
    a temporary file existed under ``watch`` just before the kill)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    had_temp = bool(temps(watch))
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if finished:
        assert proc.returncode == 0, proc.stderr.read().decode()
    proc.stderr.close()
    return finished, had_temp


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t0


def run_pack_kills(family, folder: Path, kills: int, existing: bytes | None) -> dict:
    target = folder / "out.tdd"
    args = tdedup_cmd("pack", "-q", "--force", *[f"{k}={v}" for k, v in family.items()],
                      "-o", str(target))
    if existing is not None:
        target.write_bytes(existing)
    full = timed(args)  # also the reference result
    reference = target.read_bytes()
    rng = random.Random(kills)
    seen = {"killed": 0, "finished": 0, "temp_at_kill": 0}
    for _ in range(kills):
        if existing is not None:
            target.write_bytes(existing)
        else:
            target.unlink(missing_ok=True)
        finished, had_temp = kill_at_random(args, rng.uniform(0.05, full * 1.05), folder)
        seen["finished" if finished else "killed"] += 1
        seen["temp_at_kill"] += had_temp and not finished
        if target.exists():
            got = target.read_bytes()
            # Untouched, or wholly replaced by the complete new bundle (a kill after the
            # rename); never a part of one.
            assert got == existing or got == reference, (len(got), finished)
            seen["replaced"] = seen.get("replaced", 0) + (got == reference)
        else:
            assert existing is None and not finished
    # A later run succeeds and clears the temporary files the killed runs left.
    subprocess.run(args, check=True, capture_output=True)
    assert target.read_bytes() == reference
    assert temps(folder) == []
    tdedup.verify(target)
    return seen


@pytest.mark.parametrize("over_existing", [False, True], ids=["fresh", "over-existing"])
def test_killed_pack_leaves_no_bundle_and_a_later_run_succeeds(family, packed, tmp_path,
                                                             over_existing):
    old = packed.read_bytes()[:-1] + b"x" if over_existing else None  # any old bytes
    seen = run_pack_kills(family, tmp_path, KILLS_CI, old)
    assert seen["killed"] >= KILLS_CI // 2, seen


def run_unpack_kills(packed: Path, family, folder: Path, kills: int) -> dict:
    dest = folder / "dest"
    args = tdedup_cmd("unpack", "-q", "--force", str(packed), str(dest))
    full = timed(args)
    want = {f"{m}/{rel}": data for m, src in family.items() for rel, data in tree(src).items()}
    assert tree(dest) == want
    rng = random.Random(kills + 1)
    seen = {"killed": 0, "finished": 0, "temp_at_kill": 0}
    for _ in range(kills):
        for p in dest.rglob("*"):  # start each run from a partly restored folder
            if p.is_file() and rng.random() < 0.5:
                p.unlink()
        finished, had_temp = kill_at_random(args, rng.uniform(0.05, full * 1.05), dest)
        seen["finished" if finished else "killed"] += 1
        seen["temp_at_kill"] += had_temp and not finished
        for rel, data in tree(dest).items():
            if TEMP_NAME_RE.match(rel.rsplit("/", 1)[-1]):
                continue  # the killed run's temporary file, cleared by the next run
            assert data == want[rel], f"{rel} is in place but not complete"
    subprocess.run(args, check=True, capture_output=True)
    assert tree(dest) == want and temps(dest) == []
    return seen


def test_killed_unpack_leaves_only_complete_files_and_a_later_run_succeeds(packed, family,
                                                                         tmp_path):
    seen = run_unpack_kills(packed, family, tmp_path, KILLS_CI)
    assert seen["killed"] >= KILLS_CI // 2, seen


@hh.slow
def test_many_kills(family, packed, tmp_path):
    for sub in ("p", "q", "u"):
        (tmp_path / sub).mkdir()
    seen = [run_pack_kills(family, tmp_path / "p", KILLS_SLOW, None),
            run_pack_kills(family, tmp_path / "q", KILLS_SLOW, packed.read_bytes()),
            run_unpack_kills(packed, family, tmp_path / "u", KILLS_SLOW)]
    print("\n", seen)
    assert all(s["temp_at_kill"] > 0 for s in seen), seen


# -- out of space -------------------------------------------------------------------------

def limited(nbytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


def test_pack_out_of_space_is_one_line_and_leaves_nothing(family, tmp_path):
    target = tmp_path / "out.tdd"
    result = subprocess.run(tdedup_cmd("pack", *[f"{k}={v}" for k, v in family.items()], "-o",
                                       str(target)),
                            capture_output=True, text=True, preexec_fn=limited(1 << 20))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "out.tdd" in lines[0] and "too large" in lines[0].lower(), lines
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_pack_over_an_existing_bundle_out_of_space_leaves_it_untouched(family, packed,
                                                                       tmp_path):
    target = tmp_path / "out.tdd"
    target.write_bytes(packed.read_bytes())
    result = subprocess.run(tdedup_cmd("pack", f"x={family['a']}", "-o", str(target), "--force"),
                            capture_output=True, text=True, preexec_fn=limited(1 << 20))
    assert result.returncode == 2
    assert target.read_bytes() == packed.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tdd"]


def test_unpack_out_of_space_is_one_line_and_leaves_nothing(packed, tmp_path):
    dest = tmp_path / "dest"
    result = subprocess.run(tdedup_cmd("unpack", str(packed), str(dest)),
                            capture_output=True, text=True, preexec_fn=limited(4 << 20))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "model.safetensors" in lines[0] and "too large" in lines[0].lower(), lines
    assert not dest.exists(), tree(dest) if dest.exists() else None


def test_unpack_out_of_space_into_a_folder_keeps_what_was_there(packed, tmp_path):
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "config.json").write_text("old")
    (dest / "notes.txt").write_text("mine")
    before = tree(dest)
    result = subprocess.run(tdedup_cmd("unpack", "--force", str(packed), str(dest)),
                            capture_output=True, text=True, preexec_fn=limited(4 << 20))
    assert result.returncode == 2, result.stderr
    after = tree(dest)
    assert after["notes.txt"] == b"mine"
    # The config is either untouched or restored (verified); nothing else is left.
    assert after["a/config.json"] in (b"old", b'{"name": "a"}\n')
    assert sorted(after) == sorted(before)


# -- stale temporary files ---------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_writers_are_removed_and_others_kept(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".out.tdd.tdedup-{dead}-0123abcd.tmp"
    live = tmp_path / f".out.tdd.tdedup-{os.getppid()}-0123abcd.tmp"  # a live process
    locked = tmp_path / f".out.tdd.tdedup-{dead}-fedc4321.tmp"  # another host's writer
    other = tmp_path / f".other.tdd.tdedup-{dead}-0123abcd.tmp"  # another target
    mine = tmp_path / ".out.tdd.tmp"  # not a name tdedup makes
    for p in (stale, live, locked, other, mine):
        p.write_bytes(b"partial")
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        removed = remove_stale_temps(tmp_path, {"out.tdd"})
    assert removed == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, locked, other, mine))


def test_pack_and_unpack_clear_stale_temps_beside_their_targets(family, packed, tmp_path):
    dead = dead_pid()
    stale_bundle = tmp_path / f".out.tdd.tdedup-{dead}-00000000.tmp"
    stale_bundle.write_bytes(b"partial")
    tdedup.pack([f"a={family['a']}"], tmp_path / "out.tdd")
    assert not stale_bundle.exists()
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    stale_file = dest / "a" / f".config.json.tdedup-{dead}-00000000.tmp"
    stale_file.write_bytes(b"partial")
    tdedup.unpack(packed, dest, force=True)
    assert not stale_file.exists()
    assert temps(tmp_path) == []

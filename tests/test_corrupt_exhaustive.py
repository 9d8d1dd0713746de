"""Exhaustive single-byte corruption of a small real bundle.

The bundle (~11 KB) packs a tiny family: two safetensors folders sharing tensors, and a
GGUF with F32 and Q8_0 tensors; it holds raw, zstd and byte-plane blobs, padding, the
manifest and the footer. Every one of its bytes is flipped in turn (XOR 0xFF), and each
time ``verify``, ``unpack`` (before it writes anything) and ``tdedup.load(verify=True)``
must refuse it with a :class:`TdedupError`. The ``slow`` run flips every *bit* for verify.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import hostile_helpers as hh
import tdedup
from tdedup.cli.app import app
from tdedup.errors import TdedupError

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    bundle = hh.pack_tiny_family(tmp_path_factory.mktemp("tiny"))
    assert 8192 < bundle.stat().st_size < 12_000, bundle.stat().st_size
    tdedup.verify(bundle)
    return bundle


@contextmanager
def damaged(path: Path):
    """Yields ``flip(offset, mask)``, which changes one byte of ``path`` in place (the
    previous flip undone first); the file is whole again afterwards."""
    data = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    last = []

    def flip(off: int, mask: int = 0xFF) -> None:
        while last:
            o = last.pop()
            os.pwrite(fd, data[o:o + 1], o)
        os.pwrite(fd, bytes([data[off] ^ mask]), off)
        last.append(off)
    try:
        yield flip, len(data)
    finally:
        for o in last:
            os.pwrite(fd, data[o:o + 1], o)
        os.close(fd)
    assert path.read_bytes() == data


def misses(path: Path, fn, masks=(0xFF,)) -> list[tuple[int, int]]:
    """(offset, mask) pairs whose flip ``fn(path)`` did not refuse."""
    out = []
    with damaged(path) as (flip, n):
        for off in range(n):
            for mask in masks:
                flip(off, mask)
                try:
                    fn(path)
                except TdedupError:
                    continue
                out.append((off, mask))
    return out


@pytest.fixture
def copy_of(tiny, tmp_path) -> Path:
    path = tmp_path / "bundle.tdd"
    path.write_bytes(tiny.read_bytes())
    return path


def test_verify_finds_every_flipped_byte(copy_of):
    assert misses(copy_of, tdedup.verify) == []


def test_unpack_finds_every_flipped_byte_before_writing(copy_of, tmp_path):
    dest = tmp_path / "out"
    written = []

    def unpack(path):
        try:
            tdedup.unpack(path, dest)
        finally:
            if dest.exists():
                written.append(sorted(p.name for p in dest.rglob("*")))
    assert misses(copy_of, unpack) == []
    assert written == []  # not even the destination folder was created


@pytest.mark.skipif(importlib.util.find_spec("torch") is None
                    or importlib.util.find_spec("tdedup.loaders.torch") is None,
                    reason="needs torch and tdedup.loaders.torch")
def test_load_with_verify_finds_every_flipped_byte(copy_of):
    assert misses(copy_of, lambda p: tdedup.load(p, "cpu", verify=True)) == []


def test_cli_answers_each_flip_with_one_line(copy_of, tmp_path):
    with damaged(copy_of) as (flip, n):
        for off in range(0, n, 97):
            flip(off)
            for args in (["verify", str(copy_of)], ["inspect", str(copy_of)],
                         ["unpack", str(copy_of), str(tmp_path / "out")]):
                result = runner.invoke(app, args)
                assert result.exit_code == 2, (off, args, result.output)
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (off, result.stderr)
                assert not (tmp_path / "out").exists()


@hh.slow
def test_verify_finds_every_flipped_bit(copy_of):
    assert misses(copy_of, tdedup.verify, masks=[1 << k for k in range(8)]) == []

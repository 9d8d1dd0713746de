"""A damaged or hostile bundle gives one clear line and exit code 2 from verify, unpack
and inspect, never a traceback; unpack writes nothing when it finds the damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard
from typer.testing import CliRunner

from helpers import factory
import tdedup
from helpers.bundle_helpers import flip
from tdedup.cli.app import app
from tdedup.errors import (BundleFormatError, DecompressionBombError, IntegrityError,
                           TdedupError, UnsafePathError)
from tdedup.format.bundle.constants import (FOOTER_SIZE, HEADER_FIELDS_SIZE, HEADER_SIZE,
                                            MAX_DELTA_DEPTH, BlobEncoding)
from tdedup.format.bundle.writer import BundleWriter
from tdedup.format.bundle.manifest import FileEntry, Manifest, ModelEntry, TensorEntry

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small bundle with byte-plane, zstd and raw tensor blobs, a zstd layout blob and
    padding both before raw blobs and before the manifest."""
    tmp = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    model = tmp / "model"
    factory.make_safetensors(model / "model.safetensors", {
        "w": (rng.standard_normal((128, 128)) * 0.02).astype(np.float32),  # rotated by 3
        "h": rng.standard_normal((40, 40)).astype(np.float16),       # rotated by 1
        "d": rng.standard_normal((20, 20)),                          # byte planes (F64)
        "ids": np.arange(200, dtype=np.int64) % 7,                    # zstd
        "noise": rng.integers(0, 256, 6000, dtype=np.uint8),  # raw: incompressible, >= 4 KiB
        "empty": np.zeros(0, np.float32)})
    (model / "config.json").write_text('{"hidden_size": 40, "layers": ["a", "b", "c"]}' * 5)
    bundle = tmp / "good.tdd"
    tdedup.pack([f"m={model}"], bundle)
    return bundle


def regions(bundle: Path) -> dict[str, int]:
    """An offset inside each part of the bundle a flipped byte can hit."""
    with tdedup.open_bundle(bundle) as b:
        blobs = sorted(b.manifest.blobs.values(), key=lambda r: r.offset)
        layout = next(f.layout for f in b.model("m").files if not f.tensors)
        by_enc = {}
        for r in blobs:
            if r.stored_length and r.hash != layout:
                by_enc.setdefault(r.encoding, r)
        out = {f"blob_{e.name.lower()}": r.offset + r.stored_length // 2
               for e, r in by_enc.items()}
        lrec = b.manifest.blobs[layout]
        out["blob_layout"] = lrec.offset + lrec.stored_length - 1
        spans = [(r.offset, r.offset + r.stored_length) for r in blobs if r.stored_length]
        gaps = [(e0, s1) for (_, e0), (s1, _) in zip(spans, spans[1:]) if s1 > e0]
        assert gaps, "expected padding between blobs"
        out["padding_between_blobs"] = gaps[-1][0]
        last_end = max(e for _, e in spans)
        if b.manifest_offset > last_end:
            out["padding_before_manifest"] = b.manifest_offset - 1
        m_off, size = b.manifest_offset, b.size
    assert {"blob_byteplane_zstd", "blob_rotated_byteplane_zstd", "blob_zstd",
            "blob_rotatedn_byteplane_zstd", "blob_raw"} <= set(out)
    foot = size - FOOTER_SIZE
    out |= {
        "header_magic": 3, "header_major": 8, "header_minor": 10, "header_alignment": 13,
        "header_reserved": HEADER_FIELDS_SIZE + 5, "header_last_reserved": HEADER_SIZE - 1,
        "manifest_first": m_off, "manifest_middle": (m_off + foot) // 2,
        "manifest_last": foot - 1,
        "footer_magic": foot, "footer_major": foot + 8, "footer_minor": foot + 10,
        "footer_encoding": foot + 12, "footer_manifest_offset": foot + 16,
        "footer_stored_length": foot + 24, "footer_decoded_length": foot + 32,
        "footer_checksum": foot + 40, "footer_reserved": foot + 72, "footer_check": foot + 88,
        "footer_last": size - 1,
    }
    return out


def damaged_copies(good: Path, tmp: Path):
    """(case, path) for a flipped byte in every region and for truncations."""
    size = good.stat().st_size
    for case, offset in regions(good).items():
        path = tmp / f"{case}.tdd"
        shutil.copyfile(good, path)
        flip(path, offset)
        yield case, path
    for case, keep in (("truncated_1", size - 1), ("truncated_footer", size - FOOTER_SIZE),
                       ("truncated_half", size // 2), ("truncated_10", 10), ("empty", 0)):
        path = tmp / f"{case}.tdd"
        path.write_bytes(good.read_bytes()[:keep])
        yield case, path


def assert_one_line_error(result, case: str) -> None:
    assert result.exit_code == 2, (case, result.exit_code, result.output)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), (case, result.stderr)
    assert "Traceback" not in result.output
    assert result.stdout == "", (case, result.stdout)


@pytest.mark.parametrize("command", ["verify", "unpack", "inspect", "inspect --json"])
def test_every_damage_is_one_clear_line(good, tmp_path, command):
    seen = []
    for case, path in damaged_copies(good, tmp_path):
        dest = tmp_path / f"out-{case}"
        args = [*command.split(), str(path)] + ([str(dest)] if command == "unpack" else [])
        result = runner.invoke(app, args)
        assert_one_line_error(result, case)
        assert path.name in result.stderr, (case, result.stderr)  # names the bundle
        assert not dest.exists(), f"{case}: unpack wrote {list(dest.rglob('*'))}"
        seen.append(case)
    assert len(seen) > 30


def test_the_good_bundle_is_good(good, tmp_path):
    for args in (["verify", str(good)], ["inspect", str(good)],
                 ["unpack", str(good), str(tmp_path / "out")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output


def test_messages_say_what_is_wrong(good, tmp_path):
    damaged = dict(damaged_copies(good, tmp_path))
    expect = {"blob_raw": "checksum", "blob_zstd": "checksum", "blob_byteplane_zstd": "checksum",
              "blob_layout": "checksum", "manifest_middle": "manifest checksum",
              "footer_checksum": "footer checksum", "footer_magic": "truncated",
              "padding_between_blobs": "padding", "header_reserved": "reserved header",
              "header_minor": "corrupted header", "header_major": "corrupted header",
              "truncated_1": "truncated", "empty": "truncated"}
    for case, word in expect.items():
        result = runner.invoke(app, ["verify", str(damaged[case])])
        assert word in result.stderr, (case, result.stderr)


def test_unpack_into_existing_files_changes_nothing(good, tmp_path):
    dest = tmp_path / "dest"
    tdedup.unpack(good, dest)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.tdd"
    shutil.copyfile(good, bad)
    flip(bad, regions(good)["blob_raw"])
    result = runner.invoke(app, ["unpack", "--force", str(bad), str(dest)])
    assert_one_line_error(result, "blob_raw")
    after = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes, no temporary files left


def test_every_flipped_byte_is_found(good, tmp_path):
    """Library level: a flipped bit anywhere (header and footer whole, the rest sampled)."""
    data = good.read_bytes()
    n = len(data)
    offsets = sorted({*range(HEADER_SIZE), *range(n - FOOTER_SIZE, n), *range(0, n, 29)})
    path = tmp_path / "x.tdd"
    for off in offsets:
        d = bytearray(data)
        d[off] ^= 0x10
        path.write_bytes(d)
        with pytest.raises((IntegrityError, BundleFormatError)):
            tdedup.verify(path)


def test_verify_names_the_first_damaged_blob_whatever_the_threads(good, tmp_path):
    """Blobs are checked side by side; with two damaged, the error is the one a single
    thread meets first (the manifest's order), every time."""
    bad = tmp_path / "two.tdd"
    shutil.copyfile(good, bad)
    with tdedup.open_bundle(good) as b:
        order = [r for r in b.manifest.blobs.values() if r.stored_length]
    first, second = order[0], order[-1]
    for rec in (first, second):
        flip(bad, rec.offset + rec.stored_length // 2)
    for workers in (1, 2, 4, 4, 4):
        with pytest.raises(IntegrityError) as e:
            tdedup.verify(bad, workers=workers)
        assert e.value.blob == first.hash, workers


# -- hostile bundles (spec/FORMAT.md, Security considerations) --------------------------

def craft(path: Path, blobs: list[tuple], files: list[tuple], name: str = "m") -> Path:
    """Write a bundle by hand. ``blobs``: (digest, encoding, stored, decoded_length, base);
    ``files``: (path, size, layout digest, [TensorEntry])."""
    with BundleWriter(path) as w:
        for digest, enc, stored, n, base in blobs:
            w.add_blob(digest, enc, stored, n, base=base)
        entries = [FileEntry(p, size, "0" * 64, "other" if not ts else "safetensors", layout,
                             ts) for p, size, layout, ts in files]
        w.finish(Manifest([ModelEntry(name, "folder", entries)], {}))
    return path


def h(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def raw_file(rel: str, data: bytes = b"hello") -> tuple[list, list]:
    return [(h(data), BlobEncoding.RAW, data, len(data), None)], [(rel, len(data), h(data), [])]


@pytest.mark.parametrize("rel", ["../evil", "/etc/evil", "a/../../evil", "a\\..\\evil",
                                 "./a", "a//b", "C:/evil", ""])
def test_unsafe_paths_are_refused(tmp_path, rel):
    bundle = craft(tmp_path / "b.tdd", *raw_file(rel))
    for cmd in (["verify", str(bundle)], ["unpack", str(bundle), str(tmp_path / "out")],
                ["inspect", str(bundle)]):
        result = runner.invoke(app, cmd)
        assert_one_line_error(result, rel)
        assert "unsafe path" in result.stderr
    with pytest.raises(UnsafePathError):
        tdedup.open_bundle(bundle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_unsafe_model_name_is_refused(tmp_path):
    bundle = craft(tmp_path / "b.tdd", *raw_file("a.txt"), name="..")
    with pytest.raises(UnsafePathError):
        tdedup.open_bundle(bundle)


def test_file_below_a_file_is_refused(tmp_path):
    blobs, files = raw_file("a")
    bundle = craft(tmp_path / "b.tdd", blobs, files + [("a/b", 5, files[0][2], [])])
    with pytest.raises(UnsafePathError):
        tdedup.open_bundle(bundle)


def test_unpack_never_writes_through_a_symlink(tmp_path):
    bundle = craft(tmp_path / "b.tdd", *raw_file("a.txt"))
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "m").symlink_to(outside)
    result = runner.invoke(app, ["unpack", "--force", str(bundle), str(dest)])
    assert_one_line_error(result, "symlink")
    assert "symbolic link" in result.stderr
    assert list(outside.iterdir()) == []


def _delta_blobs(links: dict[str, str | None], n: int = 8) -> list[tuple]:
    """Blobs named by ``links`` (name -> base name); bases of None are raw."""
    digest = {k: h(k.encode()) for k in links}
    out = []
    for k, base in links.items():
        if base is None:
            out.append((digest[k], BlobEncoding.RAW, b"\0" * n, n, None))
        else:
            out.append((digest[k], BlobEncoding.XOR_BYTEPLANE_ZSTD, b"\1" * 16, n, digest[base]))
    return out


def test_delta_cycle_is_refused(tmp_path):
    blobs = _delta_blobs({"a": "b", "b": "a"})
    layout = [(h(b""), BlobEncoding.RAW, b"", 0, None)]
    t = TensorEntry("t", "U8", [8], 0, 8, blobs[0][0])
    bundle = craft(tmp_path / "b.tdd", layout + blobs, [("w.safetensors", 8, h(b""), [t])])
    with pytest.raises(BundleFormatError, match="cycle"):
        tdedup.open_bundle(bundle)
    assert_one_line_error(runner.invoke(app, ["inspect", str(bundle)]), "cycle")


def test_delta_chain_deeper_than_the_limit_is_refused(tmp_path):
    names = [f"b{i}" for i in range(MAX_DELTA_DEPTH + 2)]
    links = {names[0]: None} | {names[i]: names[i - 1] for i in range(1, len(names))}
    layout = [(h(b""), BlobEncoding.RAW, b"", 0, None)]
    bundle = craft(tmp_path / "b.tdd", layout + _delta_blobs(links), [("x", 0, h(b""), [])])
    with pytest.raises(BundleFormatError, match="deep"):
        tdedup.open_bundle(bundle)
    # One link less is structurally fine (the manifest parses).
    del links[names[-1]]
    ok = craft(tmp_path / "ok.tdd", layout + _delta_blobs(links), [("x", 0, h(b""), [])])
    tdedup.open_bundle(ok).close()


def test_decompression_bomb_is_refused_before_allocation(tmp_path):
    big = b"\0" * (64 << 20)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(big)
    assert len(frame) < 1 << 16
    digest = h(b"\0" * 16)
    blobs = [(digest, BlobEncoding.ZSTD, frame, 16, None)]
    bundle = craft(tmp_path / "b.tdd", blobs, [("bomb.bin", 16, digest, [])])
    with pytest.raises(DecompressionBombError):
        tdedup.verify(bundle)
    result = runner.invoke(app, ["unpack", str(bundle), str(tmp_path / "out")])
    assert_one_line_error(result, "bomb")
    # Checksums pass (the bundle is hostile, not damaged), so unpack has started: the
    # bomb is caught while decoding, and no file (not even a temporary one) is left.
    assert not [p for p in (tmp_path / "out").rglob("*") if not p.is_dir()]


def test_zstd_frame_without_content_size_is_refused(tmp_path):
    data = b"abc" * 100
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    blobs = [(h(data), BlobEncoding.ZSTD, frame, len(data), None)]
    bundle = craft(tmp_path / "b.tdd", blobs, [("f.bin", len(data), h(data), [])])
    with pytest.raises(BundleFormatError, match="content size"):
        tdedup.verify(bundle)


def test_blob_outside_the_blob_area_is_refused(tmp_path):
    with BundleWriter(tmp_path / "far.tdd") as w:
        rec = w.add_blob(h(b"hello"), BlobEncoding.RAW, b"hello", 5)
        rec.offset = 1 << 40  # the manifest says: far past the end of the file
        w.finish(Manifest([ModelEntry("m", "folder", [
            FileEntry("a.txt", 5, "0" * 64, "other", rec.hash, [])])], {}))
    with pytest.raises(BundleFormatError, match="outside the blob area"):
        tdedup.open_bundle(tmp_path / "far.tdd")
    assert_one_line_error(runner.invoke(app, ["verify", str(tmp_path / "far.tdd")]), "far")


def test_errors_are_tdedup_errors(good, tmp_path):
    for case, path in damaged_copies(good, tmp_path):
        for fn in (tdedup.verify, lambda p: tdedup.unpack(p, tmp_path / f"o-{case}")):
            with pytest.raises(TdedupError):
                fn(path)
        assert not (tmp_path / f"o-{case}").exists()

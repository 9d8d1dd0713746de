"""Hostile bundles: real bundles whose manifest was rewritten (with a correct checksum and
footer, see ``hostile_helpers.rewrite_manifest``), so that only the structural checks of
spec/FORMAT.md §9 and §12 stand between them and the file system or the allocator.

- model names and file paths that are absolute, hold ``..`` or other escapes are refused
  before anything is written (paths through symbolic links: tests/test_unpack_safety.py);
- declared sizes that no stored bytes could fill are refused when the manifest is read,
  before anything is allocated;
- decompression bombs are refused as soon as the excess appears (memory stays bounded);
- delta chains with cycles, dangling bases or beyond MAX_DELTA_DEPTH are refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from helpers import hostile_helpers as hh
import tdedup
from tdedup.cli.app import app
from tdedup.errors import (BundleFormatError, DecompressionBombError, IntegrityError,
                           OutputError, TdedupError, UnsafePathError)
from tdedup.format.bundle.constants import FOOTER_SIZE, MAX_DELTA_DEPTH, BlobEncoding
from tdedup.format.bundle.reader import Bundle
from tdedup.format.bundle.writer import BundleWriter
from tdedup.format.bundle.manifest import MAX_ZSTD_RATIO, FileEntry, Manifest, ModelEntry

runner = CliRunner()
HAVE_LOADER = (importlib.util.find_spec("torch") is not None
               and importlib.util.find_spec("tdedup.loaders.torch") is not None)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    return hh.pack_tiny_family(tmp_path_factory.mktemp("seed"))


@pytest.fixture(scope="module")
def doc(seed) -> dict:
    return hh.read_parts(seed).manifest


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert result.stdout == ""
    return lines[0]


def refused_everywhere(bundle: Path, tmp_path: Path, error: type = TdedupError,
                       words: str = "") -> None:
    """open, verify, unpack, inspect and load all refuse; unpack writes nothing."""
    with pytest.raises(error, match=words):
        Bundle(bundle).close()
    dest = tmp_path / "dest"
    for args in (["verify", str(bundle)], ["inspect", str(bundle)],
                 ["unpack", str(bundle), str(dest)]):
        assert words in one_line_error(args)
    assert not dest.exists()
    if HAVE_LOADER:
        with pytest.raises(error, match=words):
            tdedup.load(bundle, "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.name]


# -- paths ------------------------------------------------------------------------------

UNSAFE_PATHS = ["/etc/passwd", "../evil", "a/../../evil", "..", ".", "a/./b", "a//b", "a/",
                "C:/evil", "c:evil", "a\\..\\evil", "\\\\server\\share", "a\x00b", ""]


@pytest.mark.parametrize("bad", UNSAFE_PATHS)
def test_unsafe_file_paths_are_refused_before_anything_is_written(seed, tmp_path, bad):
    def edit(d, o):
        d["models"][0]["files"][-1]["path"] = bad
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit)
    refused_everywhere(bundle, tmp_path, UnsafePathError, "unsafe path")


# Hub ids (org/name@rev) and any NFC letters are names; what could leave DEST is not.
@pytest.mark.parametrize("bad", ["..", ".", "", "/abs", "a/b/c", "a//b", "a/../b", "a\\b",
                                 "-x", "a" * 201, "e\u0301", "a b", "a\n", "a/", "C:"])
def test_unsafe_model_names_are_refused(seed, tmp_path, bad):
    def edit(d, o):
        d["models"][1]["name"] = bad
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit)
    refused_everywhere(bundle, tmp_path, UnsafePathError, "unsafe model name")


def test_a_file_below_another_file_is_refused(seed, tmp_path):
    def edit(d, o):
        files = d["models"][0]["files"]
        files[1]["path"] = files[0]["path"] + "/inner"
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit)
    refused_everywhere(bundle, tmp_path, UnsafePathError, "lies below the file")


def test_the_same_path_or_name_twice_is_refused(seed, tmp_path):
    def same_path(d, o):
        files = d["models"][0]["files"]
        files[1]["path"] = files[0]["path"]

    def same_name(d, o):
        d["models"][1]["name"] = d["models"][0]["name"]
    for edit, words in ((same_path, "lists a file twice"), (same_name, "used twice")):
        folder = tmp_path / words.replace(" ", "_")
        folder.mkdir()
        bundle = hh.rewrite_manifest(seed, folder / "b.tdd", edit)
        refused_everywhere(bundle, folder, BundleFormatError, words)


# -- declared sizes -----------------------------------------------------------------------

def grown(doc: dict, size: int):
    """An edit: the first zstd blob and every tensor and file using it declare ``size``
    decoded bytes, consistently, so only the bound on what its stored bytes could decode
    to can refuse it."""
    i = next(i for i, b in enumerate(doc["blobs"]) if b["encoding"] == BlobEncoding.ZSTD
             and b["decoded_length"])

    def edit(d, o):
        b = d["blobs"][i]
        extra = size - b["decoded_length"]
        b["decoded_length"] = size
        for m in d["models"]:
            for f in m["files"]:
                for t in f["tensors"]:
                    if t["hash"] == b["hash"]:
                        t["length"] += extra
                        t["shape"] = [t["length"]]
                        t["dtype"] = "U8"
                        f["size"] += extra
                if f["layout"] == b["hash"]:
                    f["size"] += extra
    return edit


@pytest.mark.parametrize("size", [2**30, 2**40, 2**47])
def test_sizes_no_stored_bytes_could_fill_are_refused_before_allocation(seed, doc, tmp_path,
                                                                        size):
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", grown(doc, size))
    tracemalloc.start()
    try:
        refused_everywhere(bundle, tmp_path, BundleFormatError, "cannot decode to")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak


def test_the_ratio_bound_admits_the_densest_real_frames():
    """MAX_ZSTD_RATIO is the densest zstd block (RLE: 4 bytes for 128 KiB); real frames of
    zeros at any level stay just under it, so no real bundle is refused by it."""
    n = 1 << 27
    for level in (-7, 1, 3, 19):
        frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(
            bytes(n))
        assert n / len(frame) < MAX_ZSTD_RATIO, (level, len(frame))
        assert n / len(frame) > 0.99 * MAX_ZSTD_RATIO  # the bound is tight, not loose


def test_a_manifest_larger_than_its_frame_could_hold_is_refused(seed, tmp_path):
    data = seed.read_bytes()
    m_len = int.from_bytes(data[-FOOTER_SIZE + 24:-FOOTER_SIZE + 32], "little")
    for m_dec in (MAX_ZSTD_RATIO * m_len + 1, 2**30, 2**30 + 1, 2**63):
        bundle = tmp_path / "b.tdd"
        bundle.write_bytes(hh.with_footer(data, m_dec=m_dec))
        with pytest.raises(BundleFormatError, match="limit|cannot decode"):
            Bundle(bundle)


def test_blob_ranges_past_the_blob_area_are_refused(seed, doc, tmp_path):
    raw = next(i for i, b in enumerate(doc["blobs"]) if b["encoding"] == 0
               and b["stored_length"])
    for offset, length in ((2**40, None), (4096, 2**40), (2**64 - 4096, None)):
        def edit(d, o, offset=offset, length=length):
            b = d["blobs"][raw]
            b["offset"] = offset
            if length is not None:
                b["stored_length"] = b["decoded_length"] = length
        bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit)
        with pytest.raises(BundleFormatError):
            Bundle(bundle)


# -- decompression bombs ------------------------------------------------------------------

@pytest.mark.parametrize("case", range(10))
def test_decompression_bombs_are_refused_as_soon_as_the_excess_appears(seed, doc, tmp_path,
                                                                       case):
    cases = list(hh.bomb_edits(doc))
    assert len(cases) == 10
    label, append, edit = cases[case]
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit, append=append, scrub=True)
    Bundle(bundle).close()  # structurally sound: only decoding can tell
    calls = [("verify", lambda: tdedup.verify(bundle)),
             ("unpack", lambda: tdedup.unpack(bundle, tmp_path / "dest"))]
    if HAVE_LOADER:
        calls.append(("load", lambda: tdedup.load(bundle, "cpu")))
    for name, call in calls:
        tracemalloc.start()
        try:
            with pytest.raises((DecompressionBombError, IntegrityError, BundleFormatError),
                               match="zstd|frame|byte-plane|bytes") as info:
                call()
            assert "padding" not in str(info.value) and "checksum" not in str(info.value)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # A 64 MB bomb must not be inflated: memory stays at a few blobs' worth.
        assert peak < 8 << 20, (label, name, peak)
        assert not (tmp_path / "dest").exists(), (label, name)
    assert "error: " in one_line_error(["verify", str(bundle)])


def test_a_frame_that_declares_more_than_the_blob_is_a_bomb(seed, doc, tmp_path):
    label, append, edit = next(c for c in hh.bomb_edits(doc) if "64 MB bomb" in c[0])
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit, append=append, scrub=True)
    with pytest.raises(DecompressionBombError, match="declares"):
        tdedup.verify(bundle)
    assert "declares" in one_line_error(["unpack", str(bundle), str(tmp_path / "o")])


# -- delta chains -------------------------------------------------------------------------

@pytest.mark.parametrize("name,words", [("delta cycle of two", "cycle"),
                                        ("delta blob is its own base", "cycle"),
                                        ("delta base not in the bundle", "not in the bundle"),
                                        ("delta chain deeper than the limit", "deep")])
def test_bad_delta_chains_are_refused_before_decoding(seed, doc, tmp_path, name, words):
    edit = dict(hh.structural_edits(doc))[name]
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit, append=hh.EDIT_ROOM)
    refused_everywhere(bundle, tmp_path, BundleFormatError, words)


def test_a_chain_at_the_depth_limit_passes_the_structure_checks(seed, doc, tmp_path):
    """The same fake chain one link shorter: the manifest is accepted (its blobs are
    zeros, so decoding, not the structure, refuses it)."""
    edit = dict(hh.structural_edits(doc))["delta chain deeper than the limit"]
    short = edit.__defaults__[0] - 1
    assert short == MAX_DELTA_DEPTH

    def at_limit(d, o):
        edit(d, o, depth=short)
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", at_limit, append=hh.EDIT_ROOM)
    Bundle(bundle).close()
    with pytest.raises(TdedupError):
        tdedup.verify(bundle)


# -- the writer never produces what the reader refuses -----------------------------------

def test_pack_refuses_to_write_an_unreadable_bundle(tmp_path):
    target = tmp_path / "b.tdd"
    with BundleWriter(target) as w:
        rec = w.add_blob(hh.digest(b"hi"), BlobEncoding.RAW, b"hi", 2)
        bad = Manifest([ModelEntry("m", "folder", [
            FileEntry("../evil", 2, "0" * 64, "other", rec.hash, [])])], {})
        with pytest.raises(OutputError, match="unreadable bundle"):
            w.finish(bad, validate=True)
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary file


# -- descriptive fields --------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_LOADER, reason="needs torch and tdedup.loaders.torch")
@pytest.mark.parametrize("shape", [[0], [7], [10**9, 10**9], [2**63], [0, 2**64 - 1], []])
def test_load_refuses_a_shape_that_does_not_fit_the_bytes(seed, tmp_path, shape):
    def edit(d, o):
        for m in d["models"]:
            for f in m["files"]:
                for t in f["tensors"]:
                    if t["length"]:
                        t["shape"] = shape
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit)
    with pytest.raises(BundleFormatError, match="does not fit"):
        tdedup.load(bundle, "cpu")
    tdedup.unpack(bundle, tmp_path / "out")  # restoring files does not need shapes


@pytest.mark.skipif(not HAVE_LOADER, reason="needs torch and tdedup.loaders.torch")
def test_load_refuses_two_tensors_of_one_file_with_one_name(seed, doc, tmp_path):
    """Restoring files does not need unique names; a state dict does: no tensor may be
    silently dropped."""
    edit = dict(hh.structural_edits(doc))["duplicate tensor name in a file"]
    bundle = hh.rewrite_manifest(seed, tmp_path / "b.tdd", edit, append=hh.EDIT_ROOM)
    with pytest.raises(BundleFormatError, match="two tensors named"):
        tdedup.load(bundle, "cpu")
    tdedup.unpack(bundle, tmp_path / "out")


# -- spec/FORMAT.md §12: every point has its tests ---------------------------------------

def test_decoded_blobs_are_cached_within_a_byte_bound(seed, doc):
    with Bundle(seed) as b:
        b._cache_limit = 600  # a few small blobs' worth
        for digest in b.manifest.blobs:
            b.read_blob(digest)
            assert b._cache_bytes <= b._cache_limit


#: Each point of §12 (its bold title) and the tests, by module, that check it.
SECURITY_TESTS = {
    "Paths": {"test_hostile_bundles": [
        "test_unsafe_file_paths_are_refused_before_anything_is_written",
        "test_unsafe_model_names_are_refused", "test_a_file_below_another_file_is_refused",
        "test_the_same_path_or_name_twice_is_refused"]},
    "Symbolic links at unpack": {"test_unpack_safety": [
        "test_links_out_of_the_destination_are_refused_before_writing",
        "test_a_link_inside_the_destination_is_refused_too",
        "test_force_never_writes_through_a_hard_link", "test_a_non_empty_destination_needs_force",
        "test_force_replaces_only_the_bundles_own_files"]},
    "Sizes before allocation": {"test_hostile_bundles": [
        "test_sizes_no_stored_bytes_could_fill_are_refused_before_allocation",
        "test_the_ratio_bound_admits_the_densest_real_frames",
        "test_a_manifest_larger_than_its_frame_could_hold_is_refused",
        "test_blob_ranges_past_the_blob_area_are_refused"]},
    "Decompression bombs": {"test_hostile_bundles": [
        "test_decompression_bombs_are_refused_as_soon_as_the_excess_appears",
        "test_a_frame_that_declares_more_than_the_blob_is_a_bomb"]},
    "Delta cycles and depth": {"test_hostile_bundles": [
        "test_bad_delta_chains_are_refused_before_decoding",
        "test_a_chain_at_the_depth_limit_passes_the_structure_checks"]},
    "Descriptive fields": {
        "test_hostile_bundles": ["test_load_refuses_a_shape_that_does_not_fit_the_bytes",
                                 "test_load_refuses_two_tensors_of_one_file_with_one_name"],
        "test_fuzz_bundles": ["test_enumerated_mutations"]},
    "Integrity before output": {
        "test_corrupt_exhaustive": ["test_unpack_finds_every_flipped_byte_before_writing",
                                    "test_load_with_verify_finds_every_flipped_byte"],
        "test_unpack_safety": ["test_a_failed_run_leaves_what_was_there_and_nothing_of_its_own"]},
    "Interrupted writes": {
        "test_interrupted_writes": [
            "test_killed_pack_leaves_no_bundle_and_a_later_run_succeeds",
            "test_killed_unpack_leaves_only_complete_files_and_a_later_run_succeeds",
            "test_pack_out_of_space_is_one_line_and_leaves_nothing",
            "test_unpack_out_of_space_is_one_line_and_leaves_nothing",
            "test_stale_temps_of_dead_writers_are_removed_and_others_kept"],
        "test_hostile_bundles": ["test_pack_refuses_to_write_an_unreadable_bundle"]},
    "Resource use": {"test_fuzz_bundles": ["test_enumerated_mutations"],  # nesting, dup keys
                     "test_hostile_bundles": ["test_decoded_blobs_are_cached_within_a_byte_bound",
                                              "test_manifest_json_limits"],
                     "test_hardening_races": ["test_verify_streams_a_declared_huge_blob",
                                              "test_a_declared_huge_blob_is_refused_before_allocating"],
                     "test_spec_refuse": ["test_a_conforming_reader_refuses"]},
    "Files that are not files": {"test_hardening_races": [
        "test_a_fifo_is_refused_not_waited_on",
        "test_a_bundle_that_shrinks_while_verified_is_one_line",
        "test_a_bundle_that_shrinks_during_unpack_leaves_nothing"]},
    "Writes through swapped links": {"test_hardening_outputs": [
        "test_a_link_swapped_in_during_unpack_never_redirects_a_write",
        "test_a_link_swapped_in_before_the_folders_are_made_is_one_line",
        "test_unpack_force_refuses_to_overwrite_the_bundle_it_reads"],
        "test_fuzz_strings_races": ["test_every_race_point_of_verify_and_unpack"]},
    "Inputs that change while a bundle is written": {
        "test_hardening_races": ["test_pack_never_publishes_a_bundle_from_a_changing_input",
                                 "test_pack_cli_names_the_file_that_changed"],
        "test_fuzz_strings_races": ["test_every_race_point_of_pack"]},
    "Authenticity": {},  # advice to users: nothing a reader can check
}


def test_manifest_json_limits(seed, tmp_path):
    parts = hh.read_parts(seed)
    text = json.dumps(parts.manifest)
    for raw, words in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                       (('{"models": [], ' + text[1:]).encode(), "duplicate key 'models'")):
        bundle = hh.write_bundle(tmp_path / "b.tdd", parts.prefix, raw)
        with pytest.raises(BundleFormatError, match=words):
            Bundle(bundle)


def test_every_security_consideration_has_tests():
    spec = (Path(__file__).parents[1] / "spec" / "FORMAT.md").read_text()
    start = spec.index("## 12. Security considerations")
    section = spec[start:spec.index("\n## ", start + 1)]
    titles = re.findall(r"^- \*\*(.+?)\.\*\*", section, re.M)
    assert titles == list(SECURITY_TESTS), titles
    for title, by_module in SECURITY_TESTS.items():
        for module, names in by_module.items():
            mod = importlib.import_module(module)
            for name in names:
                assert callable(getattr(mod, name, None)), (title, module, name)

"""Fuzz the bundle reader, ``verify``, ``unpack`` and ``load`` with mutated *real* bundles.

The seed is a packed tiny family (safetensors folders, a GGUF with a Q8_0 tensor, an
empty tensor, raw, zstd and byte-plane blobs). Mutations: truncation at every structural
boundary, footer and header fields set to hostile values (with the footer's own check
recomputed), every manifest value replaced by wrong types, negative, huge and
off-by-one values (manifest re-encoded with a correct checksum, so the structure checks
must catch it), named attacks (paths, duplicates, overlaps, delta cycles and depth,
decompression bombs), and malformed manifest JSON text.

Each case must end in a :class:`TdedupError` or succeed; an ``unpack`` that fails leaves
no file behind; a failing ``verify`` means a failing ``unpack``; the CLI answers with one
line and exit 2. Cases per run (CI, ~15 s): 9,148 enumerated and 900 hypothesis
examples; ``bench/fuzz.py`` runs the same generators longer (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import hostile_helpers as hh
import tdedup
from tdedup.cli.app import app
from tdedup.format.bundle.constants import FOOTER_SIZE, MAX_MANIFEST_BYTES
from tdedup.format.bundle.reader import Bundle

runner = CliRunner()
HAVE_LOADER = (importlib.util.find_spec("torch") is not None
               and importlib.util.find_spec("tdedup.loaders.torch") is not None)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    return hh.pack_tiny_family(tmp_path_factory.mktemp("seed"), empty=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = hh.scratch_dir(tmp_path_factory.mktemp("scratch"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def files_below(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def check_bundle(path: Path, case: str, tally: hh.Tally, *, cli: bool = False,
                 load: bool = HAVE_LOADER) -> None:
    """One case through open, verify, unpack and load: TdedupError or success, and an
    unpack that fails leaves no file (not even a temporary one) behind."""
    tally.cases += 1
    err = hh.expect_refusal_or_success(lambda: Bundle(path).close(), case, tally)
    if err is not None:
        if cli:
            result = runner.invoke(app, ["verify", str(path)])
            assert result.exit_code == 2, (case, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
            assert result.stdout == "", (case, result.stdout)
        return
    dest = path.parent / "out"
    shutil.rmtree(dest, ignore_errors=True)
    verify_err = hh.expect_refusal_or_success(lambda: tdedup.verify(path), f"{case} (verify)")
    unpack_err = hh.expect_refusal_or_success(lambda: tdedup.unpack(path, dest),
                                              f"{case} (unpack)")
    if unpack_err is not None:
        assert not files_below(dest), (case, unpack_err, files_below(dest))
    assert verify_err is None or unpack_err is not None, \
        f"{case}: verify refused ({verify_err}) but unpack restored it"
    if load:
        hh.expect_refusal_or_success(lambda: tdedup.load(path, "cpu", verify=True),
                                     f"{case} (load)")
    shutil.rmtree(dest, ignore_errors=True)


def structural_cases(seed: Path):
    """(label, bytes) of truncations, footer and header fields, raw manifest text."""
    data = seed.read_bytes()
    parts = hh.read_parts(seed)
    for cut in hh.bundle_boundaries(data, parts.manifest):
        yield f"truncated at {cut}", data[:cut]
    yield "one byte appended", data + b"\0"
    yield "a whole footer appended", data + data[-FOOTER_SIZE:]
    foot = len(data) - FOOTER_SIZE
    m_off, m_len, m_dec = struct.unpack_from("<QQQ", data, foot + 16)
    for v in (0, 2, 3, 255, 2**32 - 1):
        yield f"manifest encoding {v}", hh.with_footer(data, encoding=v)
    for v in hh.BAD_INTS + [m_off - 64, m_off + 64, m_off - 1, m_off + 1, foot, 63]:
        yield f"manifest offset {v}", hh.with_footer(data, m_off=v % 2**64)
    for v in hh.BAD_INTS + [m_len - 1, m_len + 1, m_len + 64]:
        yield f"manifest stored length {v}", hh.with_footer(data, m_len=v % 2**64)
    for v in hh.BAD_INTS + [m_dec - 1, m_dec + 1, MAX_MANIFEST_BYTES, MAX_MANIFEST_BYTES + 1]:
        yield f"manifest decoded length {v}", hh.with_footer(data, m_dec=v % 2**64)
    for major, minor in ((0, 0), (2, 0), (1, 1), (1, 65535), (65535, 65535)):
        yield f"footer version {major}.{minor}", hh.with_footer(data, major=major, minor=minor)
        b = bytearray(hh.with_footer(data, major=major, minor=minor))
        struct.pack_into("<HH", b, 8, major, minor)
        yield f"header and footer version {major}.{minor}", bytes(b)
    for v in (0, 1, 3, 64, 2048, 8192, 2**31, 2**32 - 1):
        b = bytearray(data)
        struct.pack_into("<I", b, 12, v)
        yield f"header alignment {v}", bytes(b)
    for k in range(8):
        b = bytearray(data)
        b[k] ^= 0x20
        yield f"header magic byte {k}", bytes(b)
    text = json.dumps(parts.manifest)
    prefix = parts.prefix
    for label, raw in (("invalid UTF-8", text.encode()[:-1] + b"\xff}"),
                       ("UTF-16", text.encode("utf-16")),
                       ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
                       ("nested dict 5000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000),
                       ("duplicate key", ('{"models": [], ' + text[1:]).encode()),
                       ("duplicate blob field", text.replace('"offset"', '"offset": 0, "offset"',
                                                             1).encode()),
                       ("NaN", text.replace('"alignment": 4096', '"alignment": NaN').encode()),
                       ("Infinity", text.replace('"alignment": 4096',
                                                 '"alignment": Infinity').encode()),
                       ("float alignment", text.replace('"alignment": 4096',
                                                        '"alignment": 4096.0').encode()),
                       ("huge integer", text.replace('"alignment": 4096',
                                                     '"alignment": ' + "9" * 5000).encode()),
                       ("trailing garbage", text.encode() + b" ]"),
                       ("empty", b""), ("null", b"null"), ("BOM", b"\xef\xbb\xbf" + text.encode())):
        yield f"manifest text: {label}", hh.bundle_bytes(prefix, raw, major=parts.major,
                                                         minor=parts.minor)


def test_enumerated_mutations(seed, scratch):
    tally = hh.Tally()
    case_dir = scratch / "enum"
    case_dir.mkdir()
    path = case_dir / "case.tdd"
    n = 0
    for label, data in structural_cases(seed):
        path.write_bytes(data)
        check_bundle(path, label, tally, cli=n % 7 == 0)
        n += 1
    doc = hh.read_parts(seed).manifest
    for label, edit in hh.manifest_edits(doc):
        hh.rewrite_manifest(seed, path, edit, append=hh.EDIT_ROOM)
        check_bundle(path, label, tally, cli=n % 23 == 0, load=HAVE_LOADER and n % 3 == 0)
        n += 1
    for label, append, edit in hh.bomb_edits(doc):
        hh.rewrite_manifest(seed, path, edit, append=append, scrub=True)
        check_bundle(path, label, tally, cli=True)
    assert [p.name for p in case_dir.iterdir()] == ["case.tdd"]  # nothing written beside
    print(f"\nfuzz bundles: {tally.cases} cases, {tally.refused} refused, "
          f"{tally.accepted} accepted; {tally.by_error}")
    assert tally.cases >= 5000
    assert tally.refused > 0.9 * tally.cases


# -- hypothesis ---------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                        max_size=4),
                    max_leaves=10)


@pytest.fixture(scope="module")
def seed_doc(seed):
    doc = hh.read_parts(seed).manifest
    return doc, [p for p in hh.manifest_paths(doc)]


@FUZZ
@given(st.data())
def test_any_value_anywhere_in_the_manifest(seed, seed_doc, scratch, data):
    doc, paths = seed_doc
    edits = [(data.draw(st.sampled_from(paths)), data.draw(JSON))
             for _ in range(data.draw(st.integers(1, 3)))]

    def edit(d, o):
        for path, value in edits:
            try:
                hh.set_path(d, path, value)
            except (KeyError, IndexError, TypeError):  # an earlier edit removed the parent
                pass
    path = scratch / "h1" / "case.tdd"
    path.parent.mkdir(exist_ok=True)
    hh.rewrite_manifest(seed, path, edit)
    check_bundle(path, f"edits {edits!r}"[:300], hh.Tally(), load=False)


@FUZZ
@given(st.data())
def test_manifest_text_edits(seed, scratch, data):
    """Bytes of the manifest's JSON text changed, re-encoded with a valid checksum."""
    parts = hh.read_parts(seed)
    text = bytearray(json.dumps(parts.manifest).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        off = data.draw(st.integers(0, len(text) - 1))
        text[off] = data.draw(st.sampled_from(b'{}[]",:0129-.e aZ\\\x00\xff'))
    path = scratch / "h2" / "case.tdd"
    path.parent.mkdir(exist_ok=True)
    hh.write_bundle(path, parts.prefix, bytes(text), major=parts.major, minor=parts.minor)
    check_bundle(path, f"text edits of {seed.name}", hh.Tally(), load=False)


@FUZZ
@given(st.data())
def test_random_bytes_and_footer_fields(seed, scratch, data):
    raw = seed.read_bytes()
    if data.draw(st.booleans()):
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 6))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(b)
    else:
        field = data.draw(st.sampled_from(["encoding", "m_off", "m_len", "m_dec", "major",
                                           "minor"]))
        bits = 16 if field in ("major", "minor") else 32 if field == "encoding" else 64
        raw = hh.with_footer(raw, **{field: data.draw(st.integers(0, 2**bits - 1))})
    path = scratch / "h3" / "case.tdd"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    check_bundle(path, "random bytes", hh.Tally(), load=False)

"""spec/FORMAT.md and spec/manifest.schema.json agree with the code and with real bundles.

The spec's Markdown tables are parsed and checked against ``bundle_constants`` and, more
to the point, against the bytes of bundles ``pack`` writes: every header and footer field
is decoded at the offset and with the type the spec gives. Manifests written by ``pack``
validate against the JSON Schema (with a small validator for the keywords it uses, and
with ``jsonschema`` too when that is installed).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard

from helpers import factory
import tdedup
from tdedup.errors import BundleFormatError, UnsafePathError
from tdedup.format.bundle import constants as C
from tdedup.format.bundle.constants import BlobEncoding, ManifestEncoding
from tdedup.format.codecs.byteplane import byteplane_compress
from tdedup.format.bundle.manifest import MAX_ZSTD_RATIO, Manifest, check_relative_path
from tdedup.format.checkpoints.records import FileKind

SPEC = Path(__file__).resolve().parents[1] / "spec"
FORMAT_MD = SPEC / "FORMAT.md"
SCHEMA = json.loads((SPEC / "manifest.schema.json").read_text())


# -- Markdown tables ------------------------------------------------------------------

def parse_tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """Tables by the heading above them: each a list of rows {column: cell}."""
    out: dict[str, list] = {}
    heading, lines = "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif (line.startswith("|") and i + 1 < len(lines)
              and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1])):
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                assert len(cells) == len(cols), f"ragged row under {heading!r}: {lines[i]}"
                rows.append(dict(zip(cols, cells)))
                i += 1
            out.setdefault(heading, []).append(rows)
            continue
        i += 1
    return out


TABLES = parse_tables(FORMAT_MD.read_text())


def table(heading_prefix: str, index: int = 0) -> list[dict[str, str]]:
    matches = [h for h in TABLES if h.startswith(heading_prefix)]
    assert len(matches) == 1, f"{heading_prefix!r} matches headings {matches}"
    return TABLES[matches[0]][index]


def code(cell: str) -> str:
    """The text inside the first backticks of a cell, or the cell."""
    m = re.search(r"`([^`]*)`", cell)
    return m[1] if m else cell


def number(cell: str) -> int:
    return int(re.match(r"^\s*(\d+)", cell)[1])


# -- the document ---------------------------------------------------------------------

def test_spec_is_normative_versioned_and_complete():
    text = FORMAT_MD.read_text()
    first = text.splitlines()[0]
    assert f"version {C.FORMAT_MAJOR}.{C.FORMAT_MINOR}" in first
    assert "RFC 2119" in text and "normative" in text
    for section in ("Constants", "Byte layout", "Header", "Footer", "Blob encodings",
                    "Manifest encodings", "Restoring a file", "Reading", "Invariants",
                    "Versions", "Security considerations", "Changes"):
        assert re.search(rf"^#+ [\d.]* ?{section}\b", text, re.M), section


def test_constants_table():
    rows = {code(r["Name"]): r["Value"] for r in table("2. Constants")}
    for name in ("MAGIC", "FOOTER_MAGIC"):
        assert bytes.fromhex(code(rows.pop(name))) == getattr(C, name), name
    assert number(rows.pop("MAX_DECODED_LENGTH")) == 1 << 48  # checked by the parser below
    for name, value in rows.items():
        assert number(value) == getattr(C, name), name
    assert C.MAX_DELTA_DEPTH == number(
        next(r["Value"] for r in table("2. Constants") if code(r["Name"]) == "MAX_DELTA_DEPTH"))


def test_max_decoded_length_is_what_the_parser_enforces():
    limit = number(next(r["Value"] for r in table("2. Constants")
                        if code(r["Name"]) == "MAX_DECODED_LENGTH"))

    # Enough stored bytes that the size could be real (see MAX_ZSTD_RATIO).
    stored = limit // MAX_ZSTD_RATIO + 1

    def manifest(decoded: int) -> bytes:
        blob = {"hash": "a" * 64, "encoding": 1, "offset": 64, "stored_length": stored,
                "decoded_length": decoded, "checksum": "b" * 64}
        return json.dumps({"format": "tdedup-bundle", "format_version": [1, 0],
                           "alignment": 4096, "models": [], "blobs": [blob]}).encode()

    Manifest.from_json_bytes(manifest(limit), data_end=64 + stored)
    with pytest.raises(BundleFormatError, match="implausible"):
        Manifest.from_json_bytes(manifest(limit + 1), data_end=64 + stored)


def test_enum_tables():
    blob = {number(r["Value"]): code(r["Name"]) for r in table("4.1 Blob encodings")}
    assert blob == {int(e): e.name for e in BlobEncoding}
    kinds = {number(r["Value"]): r["Kind"] for r in table("4.1 Blob encodings")}
    assert all((kinds[int(e)] == "delta") == e.is_delta for e in BlobEncoding)
    man = {number(r["Value"]): code(r["Name"]) for r in table("5. Manifest encodings")}
    assert man == {int(e): e.name for e in ManifestEncoding}
    files = {code(r["Value"]) for r in table("6.4 File", 1)}
    assert files == {k.value for k in FileKind}
    assert SCHEMA["$defs"]["file"]["properties"]["kind"]["enum"] == [k.value for k in FileKind]
    assert SCHEMA["$defs"]["blob"]["properties"]["encoding"]["enum"] == [int(e)
                                                                        for e in BlobEncoding]


# -- header and footer, decoded from a real bundle as the spec says ---------------------

TYPES = {"u16": "<H", "u32": "<I", "u64": "<Q"}


def decode_fields(rows: list[dict[str, str]], data: bytes, total: int) -> dict[str, object]:
    """Decode ``data`` with the (Offset, Size, Type, Field) rows; rows must tile it."""
    out, pos = {}, 0
    for r in rows:
        off, size, typ, field = number(r["Offset"]), number(r["Size"]), r["Type"], code(r["Field"])
        assert off == pos, f"{field} at {off}, expected {pos}"
        if typ in TYPES:
            assert struct.calcsize(TYPES[typ]) == size, field
            (out[field],) = struct.unpack_from(TYPES[typ], data, off)
        else:
            assert typ == f"u8[{size}]", (field, typ)
            out[field] = data[off:off + size]
        pos = off + size
    assert pos == total
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("spec")
    st = factory.make_safetensors(tmp / "m" / "model.safetensors",
                                  factory.random_tensors(0, {"w": (32, 32), "b": (32,)}))
    (tmp / "m" / "config.json").write_text("{}")
    path = tmp / "b.tdd"
    tdedup.pack([str(st.parent)], path)
    return path


def test_header_table_matches_written_bundles(bundle):
    data = bundle.read_bytes()
    rows = table("3.1 Header")
    h = decode_fields(rows, data[:C.HEADER_SIZE], C.HEADER_SIZE)
    assert h == {"magic": C.MAGIC, "major": C.FORMAT_MAJOR, "minor": C.FORMAT_MINOR,
                 "raw_alignment": C.RAW_ALIGNMENT, "reserved": bytes(48)}
    assert data[:C.HEADER_SIZE] == C.HEADER_STRUCT.pack(C.MAGIC, C.FORMAT_MAJOR,
                                                        C.FORMAT_MINOR, C.RAW_ALIGNMENT)
    assert C.HEADER_FIELDS_SIZE == number(rows[-1]["Offset"])  # where "reserved" starts


def test_footer_table_matches_written_bundles(bundle):
    data = bundle.read_bytes()
    size = len(data)
    footer = data[size - C.FOOTER_SIZE:]
    rows = table("3.4 Footer")
    f = decode_fields(rows, footer, C.FOOTER_SIZE)
    check_at = number(next(r["Offset"] for r in rows if code(r["Field"]) == "footer_check"))
    assert f["magic"] == C.FOOTER_MAGIC
    assert (f["major"], f["minor"]) == (C.FORMAT_MAJOR, C.FORMAT_MINOR)
    assert f["footer_check"] == blake3.blake3(footer[:check_at]).digest()[:C.FOOTER_CHECK_SIZE]
    assert check_at == C.FOOTER_BODY_STRUCT.size
    assert f["reserved"] == bytes(16)
    m_off, m_len = f["manifest_offset"], f["manifest_stored_length"]
    assert m_off % C.BLOB_ALIGNMENT == 0 and m_off + m_len == size - C.FOOTER_SIZE
    stored = data[m_off:m_off + m_len]
    assert f["manifest_checksum"] == blake3.blake3(stored).digest()
    enc = ManifestEncoding(f["manifest_encoding"])
    raw = (zstandard.ZstdDecompressor().decompress(stored)
           if enc is ManifestEncoding.ZSTD_JSON else stored)
    assert zstandard.frame_content_size(stored) == f["manifest_decoded_length"] == len(raw)
    doc = json.loads(raw)
    assert doc["format_version"] == [f["major"], f["minor"]]
    # The code's struct agrees field by field.
    body = C.FOOTER_BODY_STRUCT.unpack_from(footer)
    assert body == (f["magic"], f["major"], f["minor"], f["manifest_encoding"], m_off, m_len,
                    f["manifest_decoded_length"], f["manifest_checksum"])
    with tdedup.open_bundle(bundle) as b:
        assert b.manifest_offset == m_off


def test_blob_alignment_and_restore_rules_hold_in_written_bundles(bundle):
    data = bundle.read_bytes()
    with tdedup.open_bundle(bundle) as b:
        for rec in b.manifest.blobs.values():
            align = C.RAW_ALIGNMENT if rec.encoding is BlobEncoding.RAW else C.BLOB_ALIGNMENT
            assert rec.offset % align == 0
            stored = data[rec.offset:rec.offset + rec.stored_length]
            assert blake3.blake3(stored).hexdigest() == rec.checksum
        # §7, step by step, from the spec's algorithm (not the reader's).
        for m in b.manifest.models:
            for f in m.files:
                layout = memoryview(b.read_blob(f.layout)).tobytes()
                assert len(layout) == f.size - sum(t.length for t in f.tensors)
                out, cursor, lpos = [], 0, 0
                for t in f.tensors:
                    if t.length:
                        out.append(layout[lpos:lpos + t.offset - cursor])
                        lpos += t.offset - cursor
                        out.append(memoryview(b.read_blob(t.hash)).tobytes())
                        cursor = t.offset + t.length
                out.append(layout[lpos:])
                restored = b"".join(out)
                import hashlib
                assert len(restored) == f.size
                assert hashlib.sha256(restored).hexdigest() == f.sha256


def test_byteplane_layout_table():
    rows = table("4.3 ")
    assert [code(r["Field"]) for r in rows] == ["width", "frame_lengths", "frames"]
    assert (number(rows[0]["Offset"]), number(rows[0]["Size"]), rows[0]["Type"]) == (0, 4, "u32")
    rng = np.random.default_rng(0)
    data = rng.standard_normal(1000).astype(np.float32).tobytes()
    stored = byteplane_compress(data, 4)
    (w,) = struct.unpack_from("<I", stored, 0)
    lengths = struct.unpack_from(f"<{w}Q", stored, 4)
    pos = 4 + 8 * w
    assert pos + sum(lengths) == len(stored)
    planes = []
    for n in lengths:
        frame = stored[pos:pos + n]
        assert zstandard.frame_content_size(frame) == len(data) // w
        planes.append(zstandard.ZstdDecompressor().decompress(frame))
        pos += n
    elements = np.stack([np.frombuffer(p, np.uint8) for p in planes], axis=1)
    assert elements.tobytes() == data  # plane j, byte i = decoded byte i*w + j


# -- manifest tables, schema and pack agree ---------------------------------------------

def test_manifest_key_tables_match_schema():
    defs = SCHEMA["$defs"]
    for heading, schema in (("6.1 Top level", SCHEMA), ("6.2 Blob", defs["blob"]),
                            ("6.3 Model", defs["model"]), ("6.4 File", defs["file"]),
                            ("6.5 Tensor", defs["tensor"])):
        rows = table(heading)
        keys = {code(r["Key"]) for r in rows}
        required = {code(r["Key"]) for r in rows if r["Required"] == "yes"}
        assert keys == set(schema["properties"]), heading
        assert required == set(schema["required"]), heading


# A validator for the JSON Schema keywords spec/manifest.schema.json uses (draft 2020-12
# semantics); test_validator_knows_every_keyword keeps it from ignoring a new one.
KNOWN = {"$schema", "$id", "title", "description", "$defs", "$ref", "type", "properties",
         "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
         "const", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "if",
         "then", "else", "not"}


def _json_equal(a, b) -> bool:
    return (type(a) is bool) == (type(b) is bool) and a == b


def _is_type(v, t: str) -> bool:
    return {"object": isinstance(v, dict), "array": isinstance(v, list),
            "string": isinstance(v, str), "boolean": type(v) is bool, "null": v is None,
            "integer": type(v) is int,
            "number": type(v) in (int, float)}[t]


def validate(v, s: dict, root: dict = SCHEMA, at: str = "$") -> list[str]:
    """Errors of ``v`` against schema ``s`` (empty when valid)."""
    errs: list[str] = []
    if "$ref" in s:
        target = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        errs += validate(v, target, root, at)
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is_type(v, t) for t in types):
            return errs + [f"{at}: not {s['type']}"]
    if "const" in s and not _json_equal(v, s["const"]):
        errs.append(f"{at}: not {s['const']!r}")
    if "enum" in s and not any(_json_equal(v, e) for e in s["enum"]):
        errs.append(f"{at}: not one of {s['enum']}")
    if isinstance(v, (int, float)) and type(v) is not bool:
        if "minimum" in s and v < s["minimum"]:
            errs.append(f"{at}: below {s['minimum']}")
        if "maximum" in s and v > s["maximum"]:
            errs.append(f"{at}: above {s['maximum']}")
    if isinstance(v, str):
        if "pattern" in s and not re.search(s["pattern"], v):
            errs.append(f"{at}: {v!r} does not match {s['pattern']}")
        if "minLength" in s and len(v) < s["minLength"]:
            errs.append(f"{at}: too short")
        if "maxLength" in s and len(v) > s["maxLength"]:
            errs.append(f"{at}: too long")
    if isinstance(v, list):
        if "minItems" in s and len(v) < s["minItems"]:
            errs.append(f"{at}: too few items")
        if "maxItems" in s and len(v) > s["maxItems"]:
            errs.append(f"{at}: too many items")
        prefix = s.get("prefixItems", [])
        for i, item in enumerate(v):
            sub = prefix[i] if i < len(prefix) else s.get("items")
            if sub is not None:
                errs += validate(item, sub, root, f"{at}[{i}]")
    if isinstance(v, dict):
        errs += [f"{at}: lacks {k!r}" for k in s.get("required", []) if k not in v]
        props = s.get("properties", {})
        for k, item in v.items():
            if k in props:
                errs += validate(item, props[k], root, f"{at}.{k}")
            elif s.get("additionalProperties") is False:
                errs.append(f"{at}: unexpected key {k!r}")
            elif isinstance(s.get("additionalProperties"), dict):
                errs += validate(item, s["additionalProperties"], root, f"{at}.{k}")
    if "if" in s:
        branch = "then" if not validate(v, s["if"], root, at) else "else"
        if branch in s:
            errs += validate(v, s[branch], root, at)
    if "not" in s and not validate(v, s["not"], root, at):
        errs.append(f"{at}: matches a forbidden schema")
    return errs


def test_validator_knows_every_keyword():
    def walk(s):
        if isinstance(s, dict):
            for k, v in s.items():
                if k in ("properties", "$defs"):
                    for sub in v.values():
                        yield from walk(sub)
                else:
                    assert k in KNOWN, f"schema keyword {k!r} unknown to the test validator"
                    yield k
                    if isinstance(v, (dict, list)) and k not in ("enum", "const", "required",
                                                                 "type"):
                        yield from walk(v)
        elif isinstance(s, list):
            for x in s:
                yield from walk(x)
    assert set(walk(SCHEMA)) >= {"$ref", "pattern", "if"}


def stored_manifest(path: Path) -> dict:
    """The decoded manifest, read from the file as §8 says (not through the reader)."""
    data = path.read_bytes()
    body = C.FOOTER_BODY_STRUCT.unpack_from(data, len(data) - C.FOOTER_SIZE)
    _, _, _, enc, off, length, decoded, _ = body
    stored = data[off:off + length]
    raw = zstandard.ZstdDecompressor().decompress(stored) if enc == 1 else stored
    assert len(raw) == decoded
    return json.loads(raw)


@pytest.fixture(scope="module")
def manifests(bundle, gguf_family, diffusers_pipeline, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("schema")
    odd = factory.make_safetensors(tmp / "odd.safetensors", {
        "scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 3), np.float16),
        "ids": np.arange(5, dtype=np.int64)}, metadata={"format": "pt"})
    mixed = tmp / "mixed.tdd"
    tdedup.pack([str(gguf_family["q8_0"]), str(gguf_family["split"]), str(odd),
                 f"ddpm={diffusers_pipeline}"], mixed)
    return [stored_manifest(bundle), stored_manifest(mixed)]


def test_manifests_written_by_pack_validate(manifests):
    for doc in manifests:
        assert validate(doc, SCHEMA) == []
    kinds = {f["kind"] for doc in manifests for m in doc["models"] for f in m["files"]}
    assert kinds == {"safetensors", "gguf", "other"}
    assert any(f["info"] for doc in manifests for m in doc["models"] for f in m["files"])


def test_manifests_validate_with_jsonschema_too(manifests):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed; the "
                                     "built-in validator covered the schema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for doc in manifests:
        jsonschema.Draft202012Validator(SCHEMA).validate(doc)


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["blobs"][0].update(hash="A" * 64), "hash"),
    (lambda d: d["blobs"][0].update(encoding=3), "encoding"),
    (lambda d: d["blobs"][0].update(encoding=16), "base"),
    (lambda d: d["blobs"][0].update(base="0" * 64), "forbidden"),
    (lambda d: d["blobs"][0].update(offset=True), "offset"),
    (lambda d: d["blobs"][0].update(offset=-1), "offset"),
    (lambda d: d["models"][0]["files"][0].update(path="../x"), "path"),
    (lambda d: d["models"][0]["files"][0].update(kind="pickle"), "kind"),
    (lambda d: d["models"][0].update(name="-x"), "name"),
    (lambda d: d.update(format_version=[2, 0]), "format_version"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d["models"][0]["files"][0].pop("sha256"), "sha256"),
])
def test_schema_rejects_bad_manifests(manifests, mutate, where):
    doc = json.loads(json.dumps(manifests[0]))
    mutate(doc)
    errors = validate(doc, SCHEMA)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize("path", ["a", "a/b.json", "unet/x.safetensors", ".hidden", "..a",
                                  "a..", "a b", "é/ü", "../x", "/x", "a/../b", "a/./b", ".",
                                  "..", "a//b", "a/", "C:/x", "c:x", "a\\b", "a\x00b", ""])
def test_schema_path_pattern_agrees_with_the_parser(path):
    pattern = SCHEMA["$defs"]["file"]["properties"]["path"]["pattern"]
    try:
        check_relative_path(path, "test")
        ok = True
    except UnsafePathError:
        ok = False
    assert bool(re.search(pattern, path)) == ok, path

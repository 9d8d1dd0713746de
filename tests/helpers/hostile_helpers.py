"""Helpers of the hardening tests: a tiny real family, bundle surgery, damaged checkpoints.

- :func:`make_tiny_family` writes a few-KB family with the real writers (safetensors
  ``save_file``, ``gguf.GGUFWriter`` with a Q8_0 tensor from ``gguf.quants.quantize``).
- :func:`rewrite_manifest` decodes a real bundle's footer and manifest, lets a test edit
  the manifest JSON (and append stored bytes to the blob area), and writes it back with a
  correct manifest checksum and footer: the structural checks, not the checksums, must
  then catch whatever the edit made hostile.
- :func:`gguf_fields` locates every header field of a GGUF file (via ``gguf.GGUFReader``)
  so that fuzzers can set one to a chosen value.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard

from tdedup.format.bundle.constants import (BLOB_ALIGNMENT, FOOTER_BODY_STRUCT,
                                            FOOTER_CHECK_SIZE, FOOTER_MAGIC, FOOTER_SIZE,
                                            FORMAT_MAJOR, FORMAT_MINOR,
                                            HEADER_SIZE, MAX_DELTA_DEPTH, ManifestEncoding)

#: Long runs: collected under the ``slow`` marker, and run only when it is asked for
#: (``pytest -m slow``), since CI runs plain ``pytest``. bench/fuzz.py runs longer still.
def slow(fn):
    return pytest.mark.slow(pytest.mark.skipif(
        "'slow' not in (config.getoption('markexpr') or '')",
        reason="a long run: pytest -m slow")(fn))


# -- a tiny real family ---------------------------------------------------------------


def make_tiny_family(root: Path, *, seed: int = 0, empty: bool = False) -> dict[str, Path]:
    """A few-KB family: a safetensors folder (config + weights), a fine-tuned copy that
    shares most tensors, and a GGUF with F32 and Q8_0 tensors and a small vocabulary.

    Tensors are tiny and mostly compressible (so that only one 4096-aligned raw blob, and
    its padding, is in the bundle and every byte of it can be flipped in a test): byte
    planes for the F32s, zstd for the I64 and the Q8_0 blocks, raw for the random bytes,
    an empty tensor, and zstd layouts (repetitive metadata and config).
    """
    import gguf
    from gguf.quants import quantize
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    base.mkdir(exist_ok=True)
    tensors = {
        "emb.weight": (np.round(rng.standard_normal((16, 8)) * 4) / 4).astype(np.float32),
        "ln.bias": np.zeros(64, np.float16),
        "pos_ids": np.arange(12, dtype=np.int64),
        "noise": rng.integers(0, 256, 4096, dtype=np.uint8),  # raw from 4 KiB (raw_worth_its_alignment)
    }
    if empty:  # an empty tensor makes an empty raw blob: 4 KB more padding
        tensors["empty"] = np.zeros((0, 4), np.float32)
    meta = {"format": "pt", "note": "tiny test model " * 6}
    config = json.dumps({"hidden": 8, "vocab": 16, "layers": [{"n": 1}] * 8}) + "\n"
    save_file(tensors, str(base / "model.safetensors"), metadata=meta)
    (base / "config.json").write_text(config)
    tuned = root / "tuned"
    tuned.mkdir(exist_ok=True)
    t2 = dict(tensors)
    t2["emb.weight"] = tensors["emb.weight"] + np.float32(0.25)
    save_file(t2, str(tuned / "model.safetensors"), metadata=meta)
    (tuned / "config.json").write_text(config)

    gpath = root / "tiny.gguf"
    w = gguf.GGUFWriter(gpath, "llama")
    w.add_name("tiny")
    w.add_token_list(["<s>", "a", "bc", "\u00e9"])
    w.add_tensor("tok.weight", np.tile(np.arange(32, dtype=np.float32) / 8, (4, 1)))
    q = quantize(np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (2, 1)),
                 gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("out.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"base": base, "tuned": tuned, "gguf": gpath}


def make_nested_family(root: Path) -> dict[str, Path]:
    """The tiny family, its base model with a nested folder (``sub/extra.json``): what
    unpack's output checks need (a folder to make, a file below it)."""
    fam = make_tiny_family(root)
    (fam["base"] / "sub").mkdir()
    (fam["base"] / "sub" / "extra.json").write_text('{"extra": true}\n')
    return fam


def pack_base_tuned(fam: dict[str, Path], path: Path) -> Path:
    """A bundle of the family's ``base`` and ``tuned`` models at ``path``."""
    import tdedup

    tdedup.pack([f"base={fam['base']}", f"tuned={fam['tuned']}"], path)
    return path


def pack_tiny_family(root: Path, bundle: Path | None = None, *, empty: bool = False) -> Path:
    import tdedup

    fam = make_tiny_family(root / "src", empty=empty)
    bundle = bundle or root / "tiny.tdd"
    tdedup.pack([f"{k}={v}" for k, v in fam.items()], bundle)
    return bundle


# -- bundle surgery -------------------------------------------------------------------


@dataclass
class BundleParts:
    """A bundle cut at its manifest: everything before it, the decoded manifest JSON."""

    prefix: bytes  # header + blob area (+ padding), i.e. [0, manifest_offset)
    manifest: dict
    major: int
    minor: int


def read_parts(bundle: Path) -> BundleParts:
    data = bundle.read_bytes()
    foot = len(data) - FOOTER_SIZE
    magic, major, minor, enc, m_off, m_len, m_dec, _ = FOOTER_BODY_STRUCT.unpack_from(data, foot)
    assert magic == FOOTER_MAGIC
    stored = data[m_off:m_off + m_len]
    raw = (zstandard.ZstdDecompressor().decompress(stored)
           if enc == ManifestEncoding.ZSTD_JSON else stored)
    return BundleParts(data[:m_off], json.loads(raw), major, minor)


def bundle_bytes(prefix: bytes, manifest_json: bytes, *, major: int = FORMAT_MAJOR,
                 minor: int = FORMAT_MINOR,
                 encoding: ManifestEncoding = ManifestEncoding.ZSTD_JSON,
                 decoded_length: int | None = None) -> bytes:
    """``prefix`` + the manifest (encoded, checksummed) + a correct footer."""
    prefix = prefix + bytes(-len(prefix) % BLOB_ALIGNMENT)
    stored = (zstandard.ZstdCompressor(write_content_size=True).compress(manifest_json)
              if encoding == ManifestEncoding.ZSTD_JSON else manifest_json)
    body = FOOTER_BODY_STRUCT.pack(FOOTER_MAGIC, major, minor, int(encoding), len(prefix),
                                   len(stored), len(manifest_json) if decoded_length is None
                                   else decoded_length, blake3.blake3(stored).digest())
    return prefix + stored + body + blake3.blake3(body).digest()[:FOOTER_CHECK_SIZE]


def write_bundle(path: Path, prefix: bytes, manifest_json: bytes, **kw) -> Path:
    path.write_bytes(bundle_bytes(prefix, manifest_json, **kw))
    return path


_PARTS_CACHE: dict[tuple, tuple[BundleParts, str]] = {}


def _cached_parts(src: Path) -> tuple[BundleParts, str]:
    st = src.stat()
    key = (str(src), st.st_size, st.st_mtime_ns)
    if key not in _PARTS_CACHE:
        parts = read_parts(src)
        _PARTS_CACHE[key] = (parts, json.dumps(parts.manifest))
    return _PARTS_CACHE[key]


def rewrite_manifest(src: Path, dst: Path, edit: Callable[[dict, list[int]], object] | None = None,
                     *, append: list[bytes] = (), raw: bytes | None = None,
                     scrub: bool = False) -> Path:
    """Copy bundle ``src`` to ``dst`` with its manifest edited.

    ``append``: stored byte strings added to the blob area (each at a 4096-aligned
    offset, so usable as any encoding); ``edit(doc, offsets)`` changes the manifest dict
    in place or returns a new one (``offsets``: where the appended bytes lie). ``raw``
    replaces the manifest's JSON text outright (invalid UTF-8, duplicate keys, ...).
    ``scrub``: zero the bytes of the blob area that no blob of the edited manifest
    covers, so that the padding check cannot be what refuses the bundle.
    """
    parts, text = _cached_parts(src)
    prefix = bytearray(parts.prefix)
    offsets = []
    for stored in append:
        prefix += bytes(-len(prefix) % 4096)
        offsets.append(len(prefix))
        prefix += stored
    doc = json.loads(text)  # a fresh copy, faster than deepcopy
    if edit is not None:
        result = edit(doc, offsets)
        if result is not None:
            doc = result
    out = raw if raw is not None else json.dumps(doc).encode()
    if scrub:
        keep = bytearray(len(prefix))
        for blob in doc["blobs"]:
            keep[blob["offset"]:blob["offset"] + blob["stored_length"]] = \
                b"\1" * len(keep[blob["offset"]:blob["offset"] + blob["stored_length"]])
        for i in range(HEADER_SIZE, len(prefix)):
            if not keep[i]:
                prefix[i] = 0
    return write_bundle(dst, bytes(prefix), out, major=parts.major, minor=parts.minor)


def blob_by_hash(doc: dict, digest: str) -> dict:
    return next(b for b in doc["blobs"] if b["hash"] == digest)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


# -- checkpoint structure ---------------------------------------------------------------

_DELETE = object()  # a mutation that removes a key


def safetensors_parts(data: bytes) -> tuple[int, dict]:
    """``(header_length, header_dict)`` of a well-formed safetensors file's bytes."""
    (n,) = struct.unpack_from("<Q", data, 0)
    return n, json.loads(data[8:8 + n])


def safetensors_with_header(data: bytes, header: dict | bytes, *, pad: bool = True) -> bytes:
    """``data``'s tensor bytes behind a new header (a dict, or raw JSON text)."""
    n, _ = safetensors_parts(data)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def safetensors_boundaries(data: bytes) -> list[int]:
    """Offsets where a safetensors file's structure changes: the length field, header
    start and end, each tensor's first and last byte."""
    n, header = safetensors_parts(data)
    out = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, len(data) - 1}
    for k, v in header.items():
        if k != "__metadata__":
            b, e = v["data_offsets"]
            out |= {8 + n + b, 8 + n + b + 1, 8 + n + e - 1, 8 + n + e}
    return sorted(o for o in out if 0 <= o < len(data))


@dataclass(frozen=True)
class GGUFField:
    """One fixed-size integer of a GGUF header: where it is and what it means."""

    offset: int
    fmt: str  # struct format, little-endian
    what: str  # "tensor_count", "kv_count", "string_len", "value_type", "array_type",
    #           "array_len", "name_len", "n_dims", "dim", "ggml_type", "tensor_offset", "scalar"


def gguf_fields(path: Path) -> tuple[list[GGUFField], int]:
    """Every length, count, type and offset field of a GGUF header, and where the data
    section starts. Found with ``gguf.GGUFReader`` (its parts are views of the file)."""
    import gguf

    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data

    def off(part) -> int:
        return part.ctypes.data - base

    out = [GGUFField(8, "<Q", "tensor_count"), GGUFField(16, "<Q", "kv_count")]
    for fl in r.fields.values():
        if fl.name.startswith("GGUF."):
            continue
        p = fl.parts
        out.append(GGUFField(off(p[0]), "<Q", "string_len"))  # key length
        out.append(GGUFField(off(p[2]), "<I", "value_type"))
        vtype = fl.types[0] if fl.types else None
        if vtype == gguf.GGUFValueType.ARRAY:
            out.append(GGUFField(off(p[3]), "<I", "array_type"))
            out.append(GGUFField(off(p[4]), "<Q", "array_len"))
            if fl.types[-1] == gguf.GGUFValueType.STRING and len(p) > 5:
                out.append(GGUFField(off(p[5]), "<Q", "string_len"))  # first element
        elif vtype == gguf.GGUFValueType.STRING:
            out.append(GGUFField(off(p[3]), "<Q", "string_len"))
        elif len(p) > 3 and p[3].dtype.itemsize in (4, 8):
            out.append(GGUFField(off(p[3]), "<" + p[3].dtype.char, "scalar"))
    for t in r.tensors:
        p = t.field.parts
        out += [GGUFField(off(p[0]), "<Q", "name_len"), GGUFField(off(p[2]), "<I", "n_dims"),
                GGUFField(off(p[3]), "<Q", "dim"), GGUFField(off(p[4]), "<I", "ggml_type"),
                GGUFField(off(p[5]), "<Q", "tensor_offset")]
    return out, int(r.data_offset)


def set_field(data: bytes, field: GGUFField, value: int) -> bytes:
    st = struct.Struct(field.fmt)
    bits = st.size * 8
    value %= 1 << bits  # negative values become their two's complement, as on disk
    if field.fmt[-1] in "bhilq":  # signed
        value = value - (1 << bits) if value >= 1 << (bits - 1) else value
    b = bytearray(data)
    if field.fmt[-1] in "fd":
        return data
    st.pack_into(b, field.offset, value)
    return bytes(b)


# -- running cases ----------------------------------------------------------------------

class Hang(Exception):
    """A case ran past its deadline."""


@contextmanager
def deadline(seconds: float):
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    """How many fuzz cases ran, and how they ended."""

    cases: int = 0
    refused: int = 0  # a TdedupError
    accepted: int = 0  # read fine (a mutation that left a valid file)
    by_error: dict = field(default_factory=dict)

    def add(self, other: "Tally") -> None:
        self.cases += other.cases
        self.refused += other.refused
        self.accepted += other.accepted
        for k, v in other.by_error.items():
            self.by_error[k] = self.by_error.get(k, 0) + v


def expect_refusal_or_success(fn: Callable[[], object], case: str, tally: Tally | None = None,
                              *, seconds: float = 10.0):
    """Run ``fn``: it must return, or raise a :class:`TdedupError`. Anything else (an
    IndexError, MemoryError, struct.error, a hang) fails the test naming ``case``.
    Returns the error, or None when ``fn`` succeeded."""
    from tdedup.errors import TdedupError

    try:
        with deadline(seconds):
            fn()
    except TdedupError as e:
        if tally is not None:
            tally.refused += 1
            name = type(e).__name__
            tally.by_error[name] = tally.by_error.get(name, 0) + 1
        assert str(e) and "\n" not in e.message, (case, e.message)
        return e
    except Exception as e:  # noqa: BLE001 - the point of the fuzz
        raise AssertionError(f"{case}: {type(e).__name__}: {e}") from e
    if tally is not None:
        tally.accepted += 1
    return None


def scratch_dir(fallback: Path) -> Path:
    """A folder on tmpfs when there is one: fuzzers write thousands of small files, and a
    truncating write costs ~1-3 ms on ext4 against ~0.05 ms on tmpfs."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="tdedup-fuzz-", dir=shm))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def write_case(path: Path, data: bytes, size: int | None = None) -> Path:
    """Write ``data``; a larger ``size`` extends the file with zeros (sparse), so that the
    header of a corpus checkpoint can be fuzzed without writing its gigabytes."""
    with open(path, "wb") as f:
        f.write(data)
        if size is not None and size > len(data):
            f.truncate(size)
    return path


# -- checkpoint mutations -----------------------------------------------------------------

#: Values a JSON field of the wrong type or range may take.
BAD_JSON = [None, True, False, 0, -1, -(2**63), 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30,
            1.5, -0.0, 1e308, "", "x", "F32", "../x", "0" * 64, [], [0], [-1], [1, 2, 3],
            [0, 2**64], [[0, 1]], ["0", "1"], [1.0, 2.0], [True, False], {}, {"a": 1}]

#: Interesting values for a binary integer field (negatives are stored two's complement).
BAD_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 2**31 - 1,
            2**31, 2**32 - 1, 2**32, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2, -8,
            -(2**31), -(2**63)]


def safetensors_cases(data: bytes, *, size: int | None = None, every_byte: bool = True,
                      max_tensors: int | None = None):
    """(label, bytes, size) mutations of a real safetensors file: truncations, flipped
    bytes, the header length field, and JSON headers that are valid JSON with wrong types,
    overlapping or out-of-range offsets, duplicate names, unknown dtypes."""
    n, header = safetensors_parts(data)
    head_end = 8 + n
    full = size or len(data)
    # Truncations: at every byte of a small file, else at every structural boundary.
    cuts = range(len(data)) if every_byte and full == len(data) else sorted(
        {*safetensors_boundaries(data), *range(0, min(head_end, 64))})
    for cut in cuts:
        if cut < full:
            yield f"truncated at {cut}", data[:cut], None
    for off in (range(head_end) if every_byte else range(0, head_end, max(1, head_end // 256))):
        yield f"byte {off} flipped", flip(data, off), size
    for v in BAD_INTS + [n - 1, n + 1, n + 8, n - 8, full, full - 8, full + 1, 100_000_001]:
        b = bytearray(data)
        struct.pack_into("<Q", b, 0, v % 2**64)
        yield f"header length {v}", bytes(b), size
    names = [k for k in header if k != "__metadata__"]
    if max_tensors is not None and len(names) > max_tensors:
        names = names[:max_tensors // 2] + names[-(max_tensors - max_tensors // 2):]

    def edited(name, key, value):
        """``header`` with one tensor's entry (or one of its keys) changed: shallow copies."""
        h = dict(header)
        if key is None:
            h[name] = value
        else:
            h[name] = dict(header[name])
            if value is _DELETE:
                del h[name][key]
            else:
                h[name][key] = value
        return safetensors_with_header(data, h)

    for name in names:
        for key in ("dtype", "shape", "data_offsets"):
            for bad in BAD_JSON + [_DELETE]:
                yield f"{name}.{key} = {bad!r}", edited(name, key, bad), size
        for bad in BAD_JSON:
            yield f"{name} = {bad!r}", edited(name, None, bad), size
        for dtype in ("F128", "Q8_0", "f32", "F 32", "I4", "F8", "U128", "\u00e9", "F32\x00"):
            yield f"{name}.dtype = {dtype!r}", edited(name, "dtype", dtype), size
        b, e = header[name]["data_offsets"]
        data_len = full - head_end
        for offs in ([e, b], [b, e + 1], [b + 1, e + 1], [b, data_len + 1],
                     [data_len, data_len + e - b], [2**63, 2**63 + e - b], [b - 1, e - 1],
                     [b, b], [b - 2**64, e]):
            yield f"{name}.data_offsets = {offs}", edited(name, "data_offsets", offs), size
        for other in names:
            if other != name:  # overlapping: two tensors on the same bytes
                entry = dict(header[other])
                yield f"{name} overlaps {other}", edited(name, None, entry), size
    for bad in BAD_JSON + [{"a": 1}, {"a": ["b"]}, {"a": {"b": "c"}}]:
        h = dict(header)
        h["__metadata__"] = bad
        yield f"__metadata__ = {bad!r}", safetensors_with_header(data, h), size
    for bad in BAD_JSON:
        if not isinstance(bad, dict):
            yield f"header = {bad!r}", safetensors_with_header(data, json.dumps(bad).encode()), size
    text = json.dumps(header)
    if names:  # a duplicate tensor name: the same key twice in the JSON text
        first = json.dumps({names[0]: header[names[0]]})[1:-1]
        yield "duplicate tensor name", safetensors_with_header(
            data, ("{" + first + ", " + text[1:]).encode()), size
    for label, raw in (("invalid UTF-8", text.encode()[:-1] + b"\xff}"),
                       ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
                       ("nested dict 5000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000),
                       ("not JSON", b"not json at all"), ("empty header", b""),
                       ("NaN", text.replace("[", "[NaN, ", 1).encode()),
                       ("trailing garbage", text.encode() + b"]]"),
                       ("BOM", b"\xef\xbb\xbf" + text.encode()),
                       ("huge integer", text.replace("[", "[" + "9" * 5000 + ", ", 1).encode())):
        yield label, safetensors_with_header(data, raw, pad=False), size


def gguf_cases(data: bytes, fields: list[GGUFField], data_offset: int, *,
               size: int | None = None, every_byte: bool = True,
               max_fields: int | None = None):
    """(label, bytes, size) mutations of a real GGUF file: truncations at every structural
    boundary, flipped header bytes, every count, length, type and offset field set to
    hostile values, unknown ggml and value types, duplicate tensor names."""
    full = size or len(data)
    if max_fields is not None and len(fields) > max_fields:  # the first and last ones
        fields = fields[:max_fields // 2] + fields[-(max_fields - max_fields // 2):]
    bounds = {0, 4, 8, 16, 24, data_offset - 1, data_offset, data_offset + 1, full - 1}
    for f in fields:
        w = struct.calcsize(f.fmt)
        bounds |= {f.offset, f.offset + 1, f.offset + w - 1, f.offset + w}
    cuts = range(len(data)) if every_byte and full == len(data) else sorted(bounds)
    for cut in cuts:
        if cut < full:
            yield f"truncated at {cut}", data[:cut], None
    step = 1 if every_byte else max(1, data_offset // 256)
    for off in range(0, min(data_offset, len(data)), step):
        yield f"byte {off} flipped", flip(data, off), size
    for v in (0, 1, 2, 4, 2**16 + 3, 2**32 - 1):
        yield f"version {v}", set_field(data, GGUFField(4, "<I", "version"), v), size
    for f in fields:
        values = list(BAD_INTS)
        if f.what == "ggml_type":
            values += list(range(0, 48))
        elif f.what in ("value_type", "array_type"):
            values += list(range(0, 16))
        elif f.what == "tensor_offset":
            values += [full - data_offset, full - data_offset - 1, 1, 31, 32]
        elif f.what == "dim":
            values += [31, 33, 64, 2**40]
        for v in values:
            yield f"{f.what}@{f.offset} = {v}", set_field(data, f, v), size
    # Duplicate tensor names: copy a name over another of the same length.
    names = [(f.offset, struct.unpack_from("<Q", data, f.offset)[0]) for f in fields
             if f.what == "name_len"]
    for (o1, n1), (o2, n2) in zip(names, names[1:]):
        if n1 == n2:
            b = bytearray(data)
            b[o2 + 8:o2 + 8 + n2] = data[o1 + 8:o1 + 8 + n1]
            yield f"duplicate tensor name at {o2}", bytes(b), size


# -- bundle mutations ---------------------------------------------------------------------

def bundle_boundaries(data: bytes, doc: dict) -> list[int]:
    """Offsets where a bundle's structure changes: header fields, each blob's first and
    last byte, the manifest's, every footer field."""
    foot = len(data) - FOOTER_SIZE
    m_off = FOOTER_BODY_STRUCT.unpack_from(data, foot)[4]
    out = {0, 7, 8, 10, 12, 16, 63, 64, 65, m_off - 1, m_off, m_off + 1, foot - 1}
    for b in doc["blobs"]:
        out |= {b["offset"], b["offset"] + 1, b["offset"] + b["stored_length"] - 1,
                b["offset"] + b["stored_length"]}
    out |= {foot + k for k in range(FOOTER_SIZE)}
    return sorted(o for o in out if 0 <= o < len(data))


def with_footer(data: bytes, **changes) -> bytes:
    """``data`` with footer fields changed and the footer's own check recomputed, so
    that the structure checks (not the footer check) have to refuse it."""
    foot = len(data) - FOOTER_SIZE
    names = ("magic", "major", "minor", "encoding", "m_off", "m_len", "m_dec", "m_sum")
    vals = dict(zip(names, FOOTER_BODY_STRUCT.unpack_from(data, foot)))
    vals.update(changes)
    body = FOOTER_BODY_STRUCT.pack(*(vals[k] for k in names))
    return data[:foot] + body + blake3.blake3(body).digest()[:FOOTER_CHECK_SIZE]


def manifest_paths(doc, prefix=()):
    """Every path (tuple of keys and indices) to a value in the manifest, containers too."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from manifest_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*prefix, i)
            yield from manifest_paths(v, (*prefix, i))


def set_path(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    if value is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


def get_path(doc, path):
    for k in path:
        doc = doc[k]
    return doc



def manifest_edits(doc: dict, *, limit_paths: int | None = None):
    """(label, edit) pairs: every manifest value replaced by hostile ones (wrong types,
    negative, huge, off by one), every key deleted, plus named structural attacks.
    ``edit(doc, offsets)`` edits in place; ``offsets`` are those of appended blobs."""
    paths = [p for p in manifest_paths(doc) if p[0] not in ("summary", "tool_version")
             and "info" not in p]
    if limit_paths is not None and len(paths) > limit_paths:
        step = len(paths) / limit_paths
        paths = [paths[int(i * step)] for i in range(limit_paths)]
    for path in paths:
        old = get_path(doc, path)
        values = list(BAD_JSON)
        if type(old) is int:
            values += [old + 1, old - 1, old * 2 + 1, old + 4096, old + 64, old - 64]
        if isinstance(old, str):
            values += [old.upper(), old[:-1], old + "0", "/" + old, old + "/..", "a/" + old]
        if isinstance(path[-1], str):
            values.append(_DELETE)
        for v in values:
            yield (f"{'.'.join(map(str, path))} = {'<deleted>' if v is _DELETE else repr(v)[:40]}",
                   lambda d, o, path=path, v=v: set_path(d, path, v))
    yield from structural_edits(doc)


def _blob_users(doc: dict):
    for m in doc["models"]:
        for f in m["files"]:
            yield f, None
            for t in f["tensors"]:
                yield f, t


#: What :func:`structural_edits` and :func:`manifest_edits` need appended to the blob area.
EDIT_ROOM = [bytes(4096 * (MAX_DELTA_DEPTH + 2))]


def structural_edits(doc: dict):
    """Named attacks on a real manifest: paths, duplicates, overlaps, ranges, deltas.
    Apply with ``rewrite_manifest(..., append=EDIT_ROOM)``."""
    blobs = doc["blobs"]
    first_file = ("models", 0, "files", 0)
    for p in ("/etc/passwd", "../evil", "a/../../evil", "..", ".", "a/./b", "a//b", "C:/x",
              "C:x", "a\\b", "\\\\server\\x", "a\x00b", "", "a/", "/"):
        yield (f"file path {p!r}", lambda d, o, p=p: set_path(d, (*first_file, "path"), p))
    for n in ("..", ".", "", "/abs", "a/b", "-x", "a" * 200, "CON:", "\u00e9"):
        yield (f"model name {n!r}", lambda d, o, n=n: set_path(d, ("models", 0, "name"), n))
    if len(doc["models"]) > 1:
        yield ("model name twice", lambda d, o: set_path(d, ("models", 1, "name"),
                                                          d["models"][0]["name"]))
    yield ("file listed twice", lambda d, o: d["models"][0]["files"].append(
        copy.deepcopy(d["models"][0]["files"][0])))

    def below_file(d, o):
        f = copy.deepcopy(d["models"][0]["files"][0])
        f["path"] = d["models"][0]["files"][0]["path"] + "/x"
        d["models"][0]["files"].append(f)
    yield ("file below a file", below_file)
    yield ("blob listed twice", lambda d, o: d["blobs"].append(copy.deepcopy(d["blobs"][0])))
    for i, b in enumerate(blobs):
        for j, c in enumerate(blobs):
            if i != j and c["stored_length"] and b["stored_length"]:
                yield (f"blob {i} at blob {j}'s offset",
                       lambda d, o, i=i, j=j: set_path(d, ("blobs", i, "offset"),
                                                       d["blobs"][j]["offset"]))
                break
        for enc in (3, 4, 15, 16, 17, 18, 31, 32, 255, 2**32, 2**63):
            yield (f"blob {i} encoding {enc}",
                   lambda d, o, i=i, enc=enc: set_path(d, ("blobs", i, "encoding"), enc))
        # Declared sizes that the stored bytes could never hold or produce.
        for n in (2**31, 2**40, 2**47, 2**48, 2**48 + 1, 2**62):
            yield (f"blob {i} decoded_length {n}",
                   lambda d, o, i=i, n=n: set_path(d, ("blobs", i, "decoded_length"), n))
        if b["encoding"] != 0 and b["decoded_length"] > 1:
            yield (f"blob {i} decoded_length one less (bomb)",
                   lambda d, o, i=i: set_path(d, ("blobs", i, "decoded_length"),
                                              d["blobs"][i]["decoded_length"] - 1))
    # Consistent lies: a blob and every user of it made to say it decodes to more bytes.

    def grow(d, o, i, n):
        b = d["blobs"][i]
        extra = n - b["decoded_length"]
        b["decoded_length"] = n
        for f, t in _blob_users(d):
            if t is not None and t["hash"] == b["hash"]:
                t["length"] += extra
                f["size"] += extra
            elif t is None and f["layout"] == b["hash"]:
                f["size"] += extra
    for i, b in enumerate(blobs):
        if b["encoding"] in (1, 2) and b["decoded_length"]:
            for n in (b["decoded_length"] * 2, 2**30, 2**40):
                yield (f"blob {i} and its users grown to {n}",
                       lambda d, o, i=i, n=n: grow(d, o, i, n))
    # Delta chains: a cycle, and one deeper than the limit, on real blobs.
    same = {}
    for i, b in enumerate(blobs):
        same.setdefault(b["decoded_length"], []).append(i)
    group = max(same.values(), key=len)
    if len(group) >= 2:
        def cycle(d, o, g=tuple(group[:2])):
            a, b = (d["blobs"][k] for k in g)
            a["encoding"] = b["encoding"] = 16
            a["base"], b["base"] = b["hash"], a["hash"]
        yield ("delta cycle of two", cycle)

        def self_base(d, o, k=group[0]):
            d["blobs"][k]["encoding"] = 16
            d["blobs"][k]["base"] = d["blobs"][k]["hash"]
        yield ("delta blob is its own base", self_base)

    def dangling(d, o):
        d["blobs"][0]["encoding"] = 17
        d["blobs"][0]["base"] = "f" * 64
    yield ("delta base not in the bundle", dangling)

    def deep(d, o, depth=MAX_DELTA_DEPTH + 1):
        """Blob 0 made a delta of depth ``depth`` on a chain of fake blobs (a raw one at
        the end, deltas of 64 stored zero bytes), so that only the depth rule fails."""
        n = d["blobs"][0]["decoded_length"]
        chain = []
        for k in range(depth):
            h = f"{k + 1:064x}"
            rec = {"hash": h, "encoding": 16 if k else 0, "offset": o[0] + 4096 * k,
                   "stored_length": 64 if k else n, "decoded_length": n,
                   "checksum": digest(bytes(64)) if k else h}
            if k:
                rec["base"] = chain[-1]
            chain.append(h)
            d["blobs"].append(rec)
        d["blobs"][0]["encoding"] = 16
        d["blobs"][0]["base"] = chain[-1]
    yield ("delta chain deeper than the limit", deep)
    yield ("manifest not an object", lambda d, o: [])
    yield ("format_version [2, 0]", lambda d, o: set_path(d, ("format_version",), [2, 0]))
    yield ("format_version [1, 999]", lambda d, o: set_path(d, ("format_version",), [1, 999]))
    yield ("unknown key ignored", lambda d, o: set_path(d, ("zz_new",), {"x": 1}))
    for f, t in _blob_users(doc):
        if t is not None and t["length"]:
            name = t["name"]
            break
    else:
        name = None
    if name is not None:
        def dup_tensor(d, o):
            for f in (f for m in d["models"] for f in m["files"]):
                ts = f["tensors"]
                if len(ts) >= 2:
                    ts[1]["name"] = ts[0]["name"]
                    return
        yield ("duplicate tensor name in a file", dup_tensor)

        def overlap_tensors(d, o):
            for f in (f for m in d["models"] for f in m["files"]):
                ts = [t for t in f["tensors"] if t["length"]]
                if len(ts) >= 2:
                    ts[1]["offset"] = ts[0]["offset"]
                    return
        yield ("overlapping tensors", overlap_tensors)

        def tensor_past_end(d, o):
            f = next(f for m in d["models"] for f in m["files"] if f["tensors"])
            f["tensors"][-1]["offset"] = f["size"]
        yield ("tensor past the file's end", tensor_past_end)
        for dt in ("F128", "Q99", "", "f32", "I4"):
            def dtype(d, o, dt=dt):
                for f in (f for m in d["models"] for f in m["files"]):
                    for t in f["tensors"]:
                        t["dtype"] = dt
            yield (f"every tensor dtype {dt!r}", dtype)
        for shape in ([10**9, 10**9], [2**63], [0], [-1], [1, 2, 3, 4, 5, 6, 7, 8, 9] * 8):
            def bad_shape(d, o, shape=shape):
                for f in (f for m in d["models"] for f in m["files"]):
                    for t in f["tensors"]:
                        t["shape"] = shape
            yield (f"every tensor shape {str(shape)[:30]}", bad_shape)


def _stored_at_appended(i: int, stored: bytes, encoding: int | None = None):
    """An edit that points blob ``i`` at ``stored`` (appended first) with its checksum
    (and, given one, another encoding)."""
    def edit(d, o):
        rec = d["blobs"][i]
        rec["offset"], rec["stored_length"] = o[0], len(stored)
        rec["checksum"] = digest(stored)
        if encoding is not None:
            rec["encoding"] = encoding
    return edit


def bomb_edits(doc: dict):
    """(label, append, edit): blobs replaced by hostile zstd frames appended to the blob
    area, the manifest's checksum made to match, so that only the frame checks can refuse."""
    import zstandard as zs

    def frame(data: bytes, size: bool = True) -> bytes:
        return zs.ZstdCompressor(write_content_size=size).compress(data)

    zstd = next((i for i, b in enumerate(doc["blobs"]) if b["encoding"] == 1
                 and b["decoded_length"]), None)
    if zstd is not None:
        n = doc["blobs"][zstd]["decoded_length"]
        exact = frame(b"\0" * n)
        # A frame whose header declares n bytes but whose blocks hold 64 MB more.
        liar = bytearray(frame(b"\0" * (n + (64 << 20))))
        declared = frame_content_size_field(bytes(liar))
        liar[declared[0]:declared[1]] = n.to_bytes(declared[1] - declared[0], "little")
        for label, stored in (("64 MB bomb", frame(b"\0" * (n + (64 << 20)))),
                              ("one byte more", frame(b"\0" * (n + 1))),
                              ("declares n, holds 64 MB more", bytes(liar)),
                              ("no content size", frame(b"\0" * (n * 4096), size=False)),
                              ("trailing byte", exact + b"x"), ("two frames", exact + exact)):
            yield f"blob {zstd}: {label}", [stored], _stored_at_appended(zstd, stored)
    # Any byte-plane blob (F32/F16 tensors are rotated ones), made a plain one.
    planes = next((i for i, b in enumerate(doc["blobs"]) if b["encoding"] in (2, 32, 33)),
                  None)
    if planes is not None:
        n = doc["blobs"][planes]["decoded_length"]
        big = frame(b"\0" * (n + 4096))
        stored = struct.pack("<IQ", 1, len(big)) + big
        for label, s in (("byte-plane bomb", stored),
                         ("byte-plane width 0", struct.pack("<I", 0) + stored[4:]),
                         ("byte-plane width 2**32-1", struct.pack("<I", 2**32 - 1) + stored[4:]),
                         ("byte-plane frame length huge",
                          stored[:4] + struct.pack("<Q", 2**64 - 1) + stored[12:])):
            yield f"blob {planes}: {label}", [s], _stored_at_appended(planes, s, 2)


def frame_content_size_field(frame: bytes) -> tuple[int, int]:
    """Where a zstd frame header keeps its Frame_Content_Size: ``(start, end)``."""
    fhd = frame[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    assert size, "frame declares no content size"
    return pos, pos + size

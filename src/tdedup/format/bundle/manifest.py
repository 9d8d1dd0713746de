"""The bundle manifest: what models, files, tensors and blobs a bundle holds.

The manifest is JSON (schema: spec/manifest.schema.json). ``Manifest.from_json`` is a
strict parser: a reader must not trust a bundle it did not write, so every field's type,
every cross-reference, every range and every path is checked here, before any byte of
output is written. Anything wrong becomes :class:`BundleFormatError` or
:class:`UnsafePathError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from ...errors import BundleFormatError, UnsafePathError, UnsupportedVersionError
from ..checkpoints.records import FileKind, is_model_name, model_folder
from ..strict_json import loads_strict
from .constants import (
    BLOB_ALIGNMENT,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_SIZE,
    MAX_DELTA_DEPTH,
    RAW_ALIGNMENT,
    BlobEncoding,
)

HASH_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: no trailing newline
#: A hub repo id (``org/name`` or ``name``) and a git commit, as hub provenance holds them.
HUB_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
#: A cache blob's name (its etag: sha256 of an LFS file, git sha1 of another).
HUB_BLOB_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: Most bytes one stored byte of a zstd-based blob can decode to. The densest zstd block is
#: an RLE block (3-byte header + 1 byte) of at most 128 KiB, so no frame, and no blob made
#: of frames (every encoding but RAW), decodes to more than 131072 / 4 times its size.
MAX_ZSTD_RATIO = 32768
FORMAT_NAME = "tdedup-bundle"


@dataclass(slots=True)
class BlobRecord:
    """One stored blob. ``hash`` is blake3 of its decoded bytes, ``checksum`` of its stored."""

    hash: str
    encoding: BlobEncoding
    offset: int
    stored_length: int
    decoded_length: int
    checksum: str
    base: str | None = None

    def to_json(self) -> dict:
        d = {"hash": self.hash, "encoding": int(self.encoding), "offset": self.offset,
             "stored_length": self.stored_length, "decoded_length": self.decoded_length,
             "checksum": self.checksum}
        if self.base is not None:
            d["base"] = self.base
        return d


@dataclass(slots=True)
class TensorEntry:
    """A tensor of an original file: where it sat and which blob holds its bytes."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    length: int
    hash: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class FileEntry:
    """An original file: its size, sha256, non-tensor bytes (``layout`` blob) and tensors."""

    path: str
    size: int
    sha256: str
    kind: str
    layout: str
    tensors: list[TensorEntry] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass(slots=True)
class ModelEntry:
    name: str
    layout: str
    files: list[FileEntry] = field(default_factory=list)
    #: Where a model packed from the Hugging Face cache came from (spec §6.3): repo_id,
    #: commit and the refs that pointed at it, so unpack can rebuild the cache layout.
    hub: dict | None = None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.length for f in self.files for t in f.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(slots=True)
class Manifest:
    models: list[ModelEntry]
    blobs: dict[str, BlobRecord]
    tool_version: str = ""
    format_version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR)
    alignment: int = RAW_ALIGNMENT
    summary: dict = field(default_factory=dict)

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- the delta graph: every walk over it is one of these ----------------------------

    def with_bases(self, digests: Iterable[str]) -> dict[str, int]:
        """Every blob of ``digests`` and every base they need, each once, with its delta
        depth (0: not a delta), in first-seen order. The parser has checked the graph
        (no cycle, no missing base, depth within the limit)."""
        depth: dict[str, int] = {}
        for h in digests:
            chain: list[str] = []
            cur: str | None = h
            while cur is not None and cur not in depth:
                chain.append(cur)
                cur = self.blobs[cur].base
            d = depth[cur] if cur is not None else -1
            for c in reversed(chain):
                d += 1
                depth[c] = d
        return depth

    def blobs_of(self, models: Iterable[ModelEntry]) -> list[str]:
        """Every blob the models' files need (layouts, tensors, delta bases), each once."""
        return list(self.with_bases(
            h for m in models for f in m.files for h in (f.layout, *(t.hash for t in f.tensors))))

    def models_using(self, digest: str) -> list[str]:
        """Models with a tensor or file whose bytes depend on blob ``digest``."""
        return [m.name for m in self.models if digest in self.with_bases(
            h for f in m.files for h in (f.layout, *(t.hash for t in f.tensors)))]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": list(self.format_version),
            "tool_version": self.tool_version,
            "alignment": self.alignment,
            "models": [{k: v for k, v in asdict(m).items() if k != "hub" or v is not None}
                       for m in self.models],
            "blobs": [b.to_json() for b in self.blobs.values()],
            "summary": self.summary,
        }

    def dumps(self) -> bytes:
        """Strict JSON (RFC 8259): a non-finite float from a checkpoint's metadata (GGUF
        allows NaN and infinity) is written as the string ``"nan"``, ``"inf"`` or
        ``"-inf"`` (spec §12), never as the ``NaN`` token no strict reader accepts."""
        return json.dumps(_finite(self.to_json()), separators=(",", ":"), sort_keys=False,
                          allow_nan=False).encode()

    @classmethod
    def from_json_bytes(cls, raw: bytes, *, data_end: int) -> "Manifest":
        """Parse and validate. ``data_end`` is where the blob area ends (the manifest)."""
        try:
            doc = loads_strict(raw)
        except ValueError as e:
            raise BundleFormatError(f"manifest is not valid JSON ({e})") from None
        return _Parser(data_end).manifest(doc)


def _finite(node):
    """``node`` with every non-finite float replaced by its name (``nan``, ``inf``)."""
    if isinstance(node, float) and not math.isfinite(node):
        return "nan" if math.isnan(node) else ("inf" if node > 0 else "-inf")
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_finite(v) for v in node]
    return node


def check_relative_path(path: str, what: str) -> None:
    """Refuse paths that could escape an output folder (absolute, ``..``, odd characters)."""
    if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path
            or "\x00" in path or re.match(r"^[A-Za-z]:", path)):
        raise UnsafePathError(f"{what}: unsafe path {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"{what}: unsafe path {path!r}")


def _fail(msg: str) -> BundleFormatError:
    return BundleFormatError(f"manifest: {msg}")


class _Parser:
    """Type-checking walk over the manifest JSON."""

    def __init__(self, data_end: int) -> None:
        self.data_end = data_end

    def obj(self, v, what: str) -> dict:
        if not isinstance(v, dict):
            raise _fail(f"{what} must be an object")
        return v

    def get(self, d: dict, key: str, typ, what: str):
        if key not in d:
            raise _fail(f"{what} lacks {key!r}")
        v = d[key]
        if typ is int:
            ok = type(v) is int and 0 <= v < 1 << 64  # spec §6: integers fit in 64 bits
        elif typ is list:
            ok = isinstance(v, list)
        else:
            ok = isinstance(v, typ)
        if not ok:
            raise _fail(f"{what}.{key} has the wrong type ({type(v).__name__})")
        return v

    def hash(self, d: dict, key: str, what: str) -> str:
        v = self.get(d, key, str, what)
        if not HASH_RE.fullmatch(v):
            raise _fail(f"{what}.{key} is not a 64-digit lower-case hex digest")
        return v

    def manifest(self, doc) -> Manifest:
        doc = self.obj(doc, "manifest")
        if doc.get("format") != FORMAT_NAME:
            raise _fail(f"format is {doc.get('format')!r}, not {FORMAT_NAME!r}")
        version = self.get(doc, "format_version", list, "manifest")
        if len(version) != 2 or not all(type(x) is int for x in version):
            raise _fail("format_version must be [major, minor]")
        if version[0] != FORMAT_MAJOR:
            raise UnsupportedVersionError(
                f"bundle format {version[0]}.{version[1]} is not readable by this tdedup "
                f"(reads {FORMAT_MAJOR}.x)")
        alignment = self.get(doc, "alignment", int, "manifest")
        if alignment == 0 or alignment & (alignment - 1):
            raise _fail("alignment must be a power of two")
        blobs: dict[str, BlobRecord] = {}
        for i, b in enumerate(self.get(doc, "blobs", list, "manifest")):
            rec = self.blob(b, f"blobs[{i}]", alignment)
            if rec.hash in blobs:
                raise _fail(f"blob {rec.hash[:16]} is listed twice")
            blobs[rec.hash] = rec
        self.check_blob_ranges(blobs)
        self.check_deltas(blobs)
        models = [self.model(m, f"models[{i}]", blobs)
                  for i, m in enumerate(self.get(doc, "models", list, "manifest"))]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise _fail("a model name is used twice")
        folders = [model_folder(n) for n in names]
        if len(set(folders)) != len(folders):
            raise _fail("two model names unpack into the same folder")
        summary = doc.get("summary", {})
        return Manifest(models, blobs, str(doc.get("tool_version", "")), tuple(version),
                        alignment, summary if isinstance(summary, dict) else {})

    def blob(self, b, what: str, alignment: int) -> BlobRecord:
        b = self.obj(b, what)
        raw_enc = self.get(b, "encoding", int, what)
        try:
            enc = BlobEncoding(raw_enc)
        except ValueError:
            raise _fail(f"{what}: unknown blob encoding {raw_enc}") from None
        rec = BlobRecord(self.hash(b, "hash", what), enc, self.get(b, "offset", int, what),
                         self.get(b, "stored_length", int, what),
                         self.get(b, "decoded_length", int, what),
                         self.hash(b, "checksum", what),
                         self.hash(b, "base", what) if "base" in b else None)
        if rec.offset < HEADER_SIZE or rec.offset + rec.stored_length > self.data_end:
            raise _fail(f"{what}: stored bytes [{rec.offset}, {rec.offset + rec.stored_length}) "
                        f"lie outside the blob area [{HEADER_SIZE}, {self.data_end})")
        need = alignment if enc is BlobEncoding.RAW else BLOB_ALIGNMENT
        if rec.offset % need:
            raise _fail(f"{what}: offset {rec.offset} is not a multiple of {need}")
        if enc is BlobEncoding.RAW and (rec.stored_length != rec.decoded_length
                                        or rec.checksum != rec.hash):
            raise _fail(f"{what}: raw blob whose stored length or checksum differs from its "
                        "decoded length or hash")
        # Refuse sizes no stored bytes could fill before anyone allocates them.
        if enc is not BlobEncoding.RAW and (
                not rec.stored_length
                or rec.decoded_length > MAX_ZSTD_RATIO * rec.stored_length):
            raise _fail(f"{what}: {rec.stored_length} stored bytes cannot decode to "
                        f"{rec.decoded_length} bytes")
        if enc.is_delta != (rec.base is not None):
            raise _fail(f"{what}: a delta blob needs a base, and only a delta blob has one")
        # A compressed blob can decode to more than it stores, but not absurdly so: the
        # reader still bounds every frame by decoded_length, this only refuses nonsense early.
        if rec.decoded_length > (1 << 48):
            raise _fail(f"{what}: decoded length {rec.decoded_length} is implausible")
        return rec

    def check_blob_ranges(self, blobs: dict[str, BlobRecord]) -> None:
        spans = sorted((b.offset, b.offset + b.stored_length, h) for h, b in blobs.items()
                       if b.stored_length)
        for (_, e0, h0), (s1, _, h1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise _fail(f"blobs {h0[:16]} and {h1[:16]} overlap")

    def check_deltas(self, blobs: dict[str, BlobRecord]) -> None:
        depth: dict[str, int] = {}
        for h in blobs:
            chain: list[str] = []
            cur: str | None = h
            while cur is not None and cur not in depth:
                if cur in chain:
                    raise _fail(f"delta chain through blob {cur[:16]} is a cycle")
                if len(chain) > MAX_DELTA_DEPTH:  # stop walking long (crafted) chains early
                    raise _fail(f"delta chain of blob {h[:16]} is more than {MAX_DELTA_DEPTH} "
                                "deep")
                chain.append(cur)
                rec = blobs.get(cur)
                if rec is None:
                    raise _fail(f"delta base {cur[:16]} is not in the bundle")
                if rec.base is not None:
                    base = blobs.get(rec.base)
                    if base is None:
                        raise _fail(f"delta base {rec.base[:16]} of blob {cur[:16]} is not in "
                                    "the bundle")
                    if (base.decoded_length != rec.decoded_length
                            and not rec.encoding.any_length_base):
                        raise _fail(f"blob {cur[:16]} and its base differ in length")
                cur = rec.base
            d = depth[cur] if cur is not None else 0
            for c in reversed(chain):
                d = d + 1 if blobs[c].base is not None else 0
                depth[c] = d
                if d > MAX_DELTA_DEPTH:
                    raise _fail(f"delta chain of blob {c[:16]} is {d} deep (limit "
                                f"{MAX_DELTA_DEPTH})")

    def model(self, m, what: str, blobs: dict[str, BlobRecord]) -> ModelEntry:
        m = self.obj(m, what)
        name = self.get(m, "name", str, what)
        if not is_model_name(name):
            raise UnsafePathError(f"manifest: unsafe model name {name!r}")
        files = [self.file(f, f"{what}.files[{i}]", blobs)
                 for i, f in enumerate(self.get(m, "files", list, what))]
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise _fail(f"model {name!r} lists a file twice")
        # "a/b" next to "a" would make one a folder and the other a file.
        pset = set(paths)
        for p in paths:
            parts = p.split("/")
            for k in range(1, len(parts)):
                if "/".join(parts[:k]) in pset:
                    raise UnsafePathError(f"manifest: model {name!r}: {p!r} lies below the file "
                                          f"{'/'.join(parts[:k])!r}")
        hub = self.hub(m["hub"], f"{what}.hub") if "hub" in m else None
        return ModelEntry(name, str(m.get("layout", "")), files, hub)

    def hub(self, h, what: str) -> dict:
        """Hub provenance: every value later names a folder or file of a cache layout."""
        h = self.obj(h, what)
        repo = self.get(h, "repo_id", str, what)
        commit = self.get(h, "commit", str, what)
        refs = self.get(h, "refs", list, what)
        if not HUB_REPO_RE.fullmatch(repo):
            raise UnsafePathError(f"manifest: {what}: unsafe repo id {repo!r}")
        if not COMMIT_RE.fullmatch(commit):
            raise _fail(f"{what}.commit is not a 40-digit hex commit")
        for ref in refs:
            check_relative_path(ref, f"{what}.refs")
        return {"repo_id": repo, "commit": commit, "refs": list(refs)}

    def file(self, f, what: str, blobs: dict[str, BlobRecord]) -> FileEntry:
        f = self.obj(f, what)
        path = self.get(f, "path", str, what)
        check_relative_path(path, what)
        size = self.get(f, "size", int, what)
        kind = self.get(f, "kind", str, what)
        if kind not in {k.value for k in FileKind}:
            raise _fail(f"{what}: unknown file kind {kind!r}")
        layout = self.hash(f, "layout", what)
        if layout not in blobs:
            raise _fail(f"{what}: layout blob {layout[:16]} is not in the bundle")
        tensors = []
        end = 0
        for i, t in enumerate(self.get(f, "tensors", list, what)):
            tw = f"{what}.tensors[{i}]"
            t = self.obj(t, tw)
            shape = self.get(t, "shape", list, tw)
            if not all(type(d) is int and 0 <= d < 1 << 64 for d in shape):
                raise _fail(f"{tw}.shape must hold non-negative integers")
            te = TensorEntry(self.get(t, "name", str, tw), self.get(t, "dtype", str, tw), shape,
                             self.get(t, "offset", int, tw), self.get(t, "length", int, tw),
                             self.hash(t, "hash", tw))
            # Non-empty tensors come in file order without overlap; an empty one holds no
            # bytes, so only its offset is range-checked (a writer may put it anywhere).
            if (te.length and te.offset < end) or te.end > size:
                raise _fail(f"{tw}: bytes [{te.offset}, {te.end}) overlap the previous tensor or "
                            f"lie past the file's {size} bytes")
            blob = blobs.get(te.hash)
            if blob is None:
                raise _fail(f"{tw}: blob {te.hash[:16]} is not in the bundle")
            if blob.decoded_length != te.length:
                raise _fail(f"{tw}: blob {te.hash[:16]} decodes to {blob.decoded_length} bytes, "
                            f"the tensor has {te.length}")
            end = te.end if te.length else end
            tensors.append(te)
        gap = size - sum(t.length for t in tensors)
        if blobs[layout].decoded_length != gap:
            raise _fail(f"{what}: layout blob holds {blobs[layout].decoded_length} bytes, the "
                        f"file's non-tensor bytes are {gap}")
        sha = self.get(f, "sha256", str, what)
        if not HASH_RE.fullmatch(sha):
            raise _fail(f"{what}.sha256 is not a 64-digit hex digest")
        info = f.get("info", {})
        return FileEntry(path, size, sha, kind, layout, tensors,
                         info if isinstance(info, dict) else {})

"""Low-level bundle reader: validate header, footer and manifest; lazy blob reads.

Reading follows the numbered steps of spec/FORMAT.md §Reading: header, footer (with its
own checksum), manifest (checksum of the stored bytes before it is decompressed), then
blobs on demand. Raw blobs come back as zero-copy views of the file's map; others are
decoded (delta blobs after their base) and kept in a small byte-bounded cache so that a
blob shared by several files is decoded once.

A bundle is mapped (loaders want zero-copy views) or, with ``mapped=False``, read with
``pread`` (verify, unpack, inspect): a mapped file that shrinks underneath kills the
process with SIGBUS, a read returns short and becomes one line. Unmapped, raw blobs and
zstd blobs are streamed in bounded chunks, so verifying never holds a blob whole; every
other allocation a manifest asks for is checked against the memory there is first.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import blake3
import numpy as np

from ..._fs import check_allocation, file_identity, open_regular
from ...errors import (
    AmbiguousNameError,
    BundleError,
    BundleFormatError,
    IntegrityError,
    ModelNotFoundError,
    TdedupError,
    UnsupportedVersionError,
)
from ..codecs import decode
from ..codecs.zstd import zstd_decompress, zstd_iter_decompress
from .constants import (
    BLOB_ALIGNMENT,
    FOOTER_BODY_STRUCT,
    FOOTER_CHECK_SIZE,
    FOOTER_MAGIC,
    FOOTER_SIZE,
    FORMAT_MAJOR,
    HEADER_FIELDS_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    MAX_MANIFEST_BYTES,
    BlobEncoding,
    ManifestEncoding,
)
from .hashing import hash_bytes, hash_chunks
from .manifest import (
    MAX_ZSTD_RATIO,
    BlobRecord,
    FileEntry,
    Manifest,
    ModelEntry,
    TensorEntry,
)

DEFAULT_CACHE_BYTES = 256 << 20
#: Bytes per read when a bundle is streamed rather than mapped.
READ_CHUNK = 8 << 20
#: The footer's reserved bytes: the last of its checksummed body (spec §3.4).
FOOTER_RESERVED = 16
#: Python's parsed JSON takes at least this many times the text's bytes.
JSON_MEMORY_FACTOR = 4


def tensor_keys(m: ModelEntry) -> list[tuple[str, FileEntry, TensorEntry]]:
    """The key of each tensor of a model, as :func:`tdedup.load`'s state dicts have them:
    the tensor's name, prefixed with the folder of its file within the model when that is
    not the model's root (``unet/conv_in.weight``); names that would still collide (two
    weight files with the same tensors in one folder) are the file's path, a colon and
    the name (``q8_0.gguf:blk.0.attn_q.weight``)."""
    out = []
    for f in m.files:
        folder = posixpath.dirname(f.path)
        for t in f.tensors:
            out.append((f"{folder}/{t.name}" if folder else t.name, f, t))
    counts: dict[str, int] = {}
    for key, _, _ in out:
        counts[key] = counts.get(key, 0) + 1
    keyed = [(f"{f.path}:{t.name}" if counts[key] > 1 else key, f, t) for key, f, t in out]
    seen: set[str] = set()
    for key, f, t in keyed:  # one file naming two tensors alike: a tensor would be lost
        if key in seen:
            raise BundleFormatError(f"model {m.name!r}: {f.path} has two tensors named "
                                    f"{t.name!r}")
        seen.add(key)
    return keyed


class Bundle:
    """An open ``.tdd`` bundle. Use :func:`open_bundle`; close it (or use ``with``)."""

    def __init__(self, path: str | os.PathLike, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 mapped: bool = True) -> None:
        self.path = Path(path)
        # A FIFO or device would block or never end: only regular files are bundles.
        self._file = os.fdopen(open_regular(self.path, "file", BundleError), "rb")
        self._mm: mmap.mmap | None = None
        self.view: memoryview | None = None
        try:
            st = os.fstat(self._file.fileno())
            self.size = st.st_size
            #: The opened file's :func:`file_identity` (to notice it replaced later).
            self.identity = file_identity(st)
            if self.size < HEADER_SIZE + FOOTER_SIZE:
                raise BundleFormatError(f"truncated bundle ({self.size} bytes)")
            if mapped:
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                self.view = memoryview(self._mm)
            self.manifest = self._read_manifest()
        except TdedupError as e:
            self.close()
            raise e.locate(path=self.path) from None
        except MemoryError:
            self.close()
            raise BundleError("not enough memory to read the manifest",
                              path=self.path) from None
        except (OSError, ValueError) as e:
            self.close()
            raise BundleFormatError(f"cannot read the bundle: {e}", path=self.path) from e
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()

    # -- raw reads ----------------------------------------------------------------------

    def read_at(self, offset: int, length: int):
        """``length`` bytes at ``offset``: a view of the map, or read (one line, never
        SIGBUS, if the file has shrunk since it was opened)."""
        if self.view is not None:
            return self.view[offset:offset + length]
        parts, pos, end = [], offset, offset + length
        while pos < end:
            try:
                chunk = os.pread(self._file.fileno(), min(end - pos, 1 << 30), pos)
            except OSError as e:
                raise BundleError(f"cannot read: {e.strerror or e}", path=self.path) from e
            if not chunk:
                raise IntegrityError(f"the bundle shrank to {pos} bytes while being read "
                                     f"(it had {self.size})", path=self.path)
            parts.append(chunk)
            pos += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_at(self, offset: int, length: int, chunk: int = READ_CHUNK) -> Iterator:
        """``length`` bytes at ``offset`` in chunks of at most ``chunk`` bytes."""
        for pos in range(offset, offset + length, chunk):
            yield self.read_at(pos, min(chunk, offset + length - pos))

    # -- structure ----------------------------------------------------------------------

    def _read_manifest(self) -> Manifest:
        magic, major, minor, alignment = HEADER_STRUCT.unpack_from(
            self.read_at(0, HEADER_SIZE), 0)
        if magic != MAGIC:
            raise BundleFormatError("not a tdedup bundle (bad magic)")
        foot = self.size - FOOTER_SIZE
        footer = bytes(self.read_at(foot, FOOTER_SIZE))
        body = footer[:FOOTER_BODY_STRUCT.size]
        fmagic, fmajor, fminor, enc, m_off, m_len, m_dec, m_sum = \
            FOOTER_BODY_STRUCT.unpack_from(body)
        check = footer[FOOTER_BODY_STRUCT.size:]
        footer_ok = (fmagic == FOOTER_MAGIC
                     and blake3.blake3(body).digest()[:FOOTER_CHECK_SIZE] == check)
        if major != FORMAT_MAJOR and not (footer_ok and fmajor == FORMAT_MAJOR):
            # Another major may lay out its footer differently: judge by the header alone.
            raise UnsupportedVersionError(
                f"bundle format {major}.{minor} is not readable by this tdedup (reads "
                f"{FORMAT_MAJOR}.x); upgrade tdedup")
        if fmagic != FOOTER_MAGIC:
            raise BundleFormatError("no footer at the end: truncated, or the write never "
                                    "finished")
        if not footer_ok:
            raise IntegrityError("footer checksum mismatch (corrupted footer)")
        if any(body[FOOTER_BODY_STRUCT.size - FOOTER_RESERVED:]):
            # Covered by the footer's checksum, so written so: not a 1.x bundle (§3.4, §11).
            raise BundleFormatError("reserved footer bytes are not zero")
        # The footer is checksummed, the header is not: a header that disagrees with a
        # sound footer is corrupted (a flipped bit, not a newer format).
        if (fmajor, fminor) != (major, minor):
            raise IntegrityError(f"header says format {major}.{minor} but the footer says "
                                 f"{fmajor}.{fminor} (corrupted header)")
        if m_off % BLOB_ALIGNMENT:
            raise BundleFormatError(f"manifest offset {m_off} is not a multiple of "
                                    f"{BLOB_ALIGNMENT}")
        if m_off < HEADER_SIZE or m_off + m_len != foot:
            raise BundleFormatError(f"footer points at a manifest at [{m_off}, {m_off + m_len}) "
                                    f"which does not end where the footer starts ({foot})")
        if m_dec > MAX_MANIFEST_BYTES:
            raise BundleFormatError(f"manifest of {m_dec} bytes is over the "
                                    f"{MAX_MANIFEST_BYTES}-byte limit")
        if m_dec > MAX_ZSTD_RATIO * m_len:
            raise BundleFormatError(f"a manifest of {m_len} stored bytes cannot decode to "
                                    f"{m_dec} bytes")
        self.manifest_offset = m_off
        # What parsing needs (stored, decoded, Python's objects) must fit before it starts.
        check_allocation(m_len + m_dec * (1 + JSON_MEMORY_FACTOR), "reading the manifest",
                         cls=BundleError)
        stored = self.read_at(m_off, m_len)
        if blake3.blake3(stored).digest() != m_sum:
            raise IntegrityError("manifest checksum mismatch (corrupted manifest)")
        try:
            menc = ManifestEncoding(enc)
        except ValueError:
            raise BundleFormatError(f"unknown manifest encoding {enc}") from None
        raw = (zstd_decompress(stored, m_dec, "manifest") if menc is ManifestEncoding.ZSTD_JSON
               else bytes(stored))
        if len(raw) != m_dec:
            raise BundleFormatError("manifest length disagrees with the footer")
        manifest = Manifest.from_json_bytes(raw, data_end=m_off)
        if manifest.alignment != alignment:
            raise BundleFormatError("header and manifest disagree on the alignment")
        if tuple(manifest.format_version) != (major, minor):
            raise BundleFormatError("header and manifest disagree on the format version")
        return manifest

    # -- lookups ------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models]

    def model(self, name: str) -> ModelEntry:
        try:
            return self.manifest.model(name)
        except KeyError:
            raise ModelNotFoundError(
                f"no model {name!r} in the bundle (it has: {', '.join(self.model_names)})",
                path=self.path) from None

    def blob(self, digest: str) -> BlobRecord:
        try:
            return self.manifest.blobs[digest]
        except KeyError:
            raise BundleFormatError(f"blob {digest[:16]} is not in the bundle",
                                    path=self.path) from None

    def models_using(self, digest: str) -> list[str]:
        """Models with a tensor or file whose bytes depend on blob ``digest``."""
        return self.manifest.models_using(digest)

    def corrupt(self, digest: str, problem: str, cls: type = IntegrityError, *,
                part: str | None = None) -> IntegrityError:
        """The error for a damaged blob: it names the bundle, the blob and the models
        that depend on it, so a user knows what is lost."""
        return cls(problem, path=self.path, blob=digest, models=tuple(self.models_using(digest)),
                   part=part)

    def check_padding(self) -> None:
        """Every byte not in a blob, the manifest, header fields or footer must be zero.

        The checksums cover blobs, manifest and footer; this covers the rest, so that a
        flipped byte *anywhere* in a bundle is found.
        """
        reserved = bytes(self.read_at(HEADER_FIELDS_SIZE, HEADER_SIZE - HEADER_FIELDS_SIZE))
        if any(reserved):
            raise IntegrityError("reserved header bytes are not zero (corrupted header)",
                                 path=self.path)
        spans = sorted((b.offset, b.offset + b.stored_length) for b in self.manifest.blobs.values())
        m_off = self.manifest_offset
        cursor = HEADER_SIZE
        for start, end in [*spans, (m_off, m_off)]:
            if start > cursor and any(np.frombuffer(c, np.uint8).any()
                                      for c in self.iter_at(cursor, start - cursor)):
                raise IntegrityError(f"padding bytes at [{cursor}, {start}) are not zero "
                                     "(corrupted)", path=self.path)
            cursor = max(cursor, end)

    # -- blob reads ---------------------------------------------------------------------

    def stored_bytes(self, rec: BlobRecord):
        """A blob's stored bytes (a view of the map, or read whole: memory checked)."""
        if self.view is None:
            check_allocation(rec.stored_length, f"blob {rec.hash[:16]}", path=self.path,
                             cls=BundleError)
        return self.read_at(rec.offset, rec.stored_length)

    def check_stored(self, rec: BlobRecord) -> None:
        """Raise :class:`IntegrityError` if the blob's stored bytes fail their checksum
        (streamed: the blob is never held whole)."""
        if hash_chunks(self.iter_at(rec.offset, rec.stored_length)) != rec.checksum:
            raise self.corrupt(rec.hash, "stored bytes fail their checksum (corrupted)")

    def _decode_budget(self, rec: BlobRecord) -> None:
        """Refuse a decode whose output (and its bases') cannot fit, before allocating."""
        need = sum(self.blob(h).decoded_length for h in self.manifest.with_bases([rec.hash]))
        check_allocation(need + (0 if self.view is not None else rec.stored_length),
                         f"decoding blob {rec.hash[:16]}", path=self.path, cls=BundleError)

    def read_blob(self, digest: str, *, verify: bool = False, _depth: int = 0):
        """The decoded bytes of a blob (bytes-like; raw blobs are views of the map).

        With ``verify`` the stored checksum is checked before decoding and the decoded
        hash after, for this blob and every base it needs.
        """
        rec = self.blob(digest)
        if rec.encoding is BlobEncoding.RAW:
            data = self.stored_bytes(rec)
            if verify and hash_bytes(data) != digest:
                raise self.corrupt(digest, "bytes do not match their hash (corrupted)")
            return data
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
                return hit
        if verify:
            self.check_stored(rec)
        if _depth == 0:
            self._decode_budget(rec)
        base = None
        if rec.base is not None:
            base = self.read_blob(rec.base, verify=verify, _depth=_depth + 1)
        try:
            data = decode(rec.encoding, self.stored_bytes(rec), rec.decoded_length, base=base)
        except IntegrityError as e:
            raise self.corrupt(digest, e.problem, type(e), part=e.part) from e
        except BundleFormatError as e:
            raise e.locate(path=self.path, blob=digest,
                           models=tuple(self.models_using(digest))) from e
        except MemoryError:
            raise BundleError(f"not enough memory to decode blob {digest[:16]} "
                              f"({rec.decoded_length} bytes)", path=self.path) from None
        if verify and hash_bytes(data) != digest:
            raise self.corrupt(digest, "decoded bytes do not match their hash (corrupted)")
        self._remember(digest, data)
        return data

    def _remember(self, digest: str, data) -> None:
        n = memoryview(data).nbytes
        if n > self._cache_limit // 4:
            return
        with self._lock:
            self._cache[digest] = data
            self._cache_bytes += n
            while self._cache_bytes > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= memoryview(old).nbytes

    def verify_blob(self, digest: str) -> None:
        """Check one blob fully: stored checksum, decode, decoded hash. Raw and zstd blobs
        are streamed (memory bounded by a chunk, whatever their size)."""
        rec = self.blob(digest)
        self.check_stored(rec)
        if rec.encoding is BlobEncoding.RAW:
            return  # a raw blob's checksum is its hash
        if rec.encoding is BlobEncoding.ZSTD:
            try:
                decoded = hash_chunks(zstd_iter_decompress(
                    lambda off, n: self.read_at(rec.offset + off, n), rec.stored_length,
                    rec.decoded_length))
            except IntegrityError as e:
                raise self.corrupt(digest, e.problem, type(e), part=e.part) from e
            except BundleFormatError as e:
                raise e.locate(path=self.path, blob=digest,
                               models=tuple(self.models_using(digest))) from e
            if decoded != digest:
                raise self.corrupt(digest, "decoded bytes do not match their hash (corrupted)")
            return
        self.read_blob(digest, verify=True)

    # -- files and tensors --------------------------------------------------------------

    def iter_file_chunks(self, f: FileEntry, *, verify: bool = False) -> Iterator:
        """The original file's bytes in order: non-tensor runs and tensor blobs."""
        layout = memoryview(self.read_blob(f.layout, verify=verify)).cast("B")
        lpos = cursor = 0
        for t in f.tensors:
            if not t.length:  # empty tensors hold no bytes and may sit at any offset
                continue
            gap = t.offset - cursor
            if gap:
                yield layout[lpos:lpos + gap]
                lpos += gap
            rec = self.blob(t.hash)
            if self.view is None and rec.encoding is BlobEncoding.RAW and not verify:
                yield from self.iter_at(rec.offset, rec.stored_length)  # never held whole
            else:
                yield self.read_blob(t.hash, verify=verify)
            cursor = t.end
        if lpos < len(layout):
            yield layout[lpos:]

    def iter_file_checked(self, f: FileEntry, what: str) -> Iterator:
        """:meth:`iter_file_chunks`, then :class:`IntegrityError` ("``what`` fails its
        sha256") if the bytes given out were not the original file's: a caller keeps
        nothing it made of them until the iteration has ended."""
        h = hashlib.sha256()
        for chunk in self.iter_file_chunks(f):
            h.update(chunk)
            yield chunk
        if h.hexdigest() != f.sha256:
            raise IntegrityError(f"{what} fails its sha256 (corrupted bundle)", path=self.path)

    def read_file(self, model: str, path: str) -> bytes:
        """The whole original file (small files: configs, tokenizers)."""
        for f in self.model(model).files:
            if f.path == path:
                return b"".join(bytes(c) for c in self.iter_file_chunks(f))
        raise ModelNotFoundError(f"model {model!r} has no file {path!r}", path=self.path)

    def tensors(self, model: str) -> Iterator[tuple[FileEntry, TensorEntry]]:
        for f in self.model(model).files:
            for t in f.tensors:
                yield f, t

    def read_tensor(self, model: str, name: str, *, verify: bool = False):
        """One tensor's stored bytes, decoding only the blobs it needs.

        ``name``: the tensor's key as :func:`tdedup.load` gives it (:func:`tensor_keys`:
        ``te2/w``, ``q8_0.gguf:blk.0.attn_q.weight``), or its bare name in its file when
        only one file of the model has a tensor of that name (else
        :class:`AmbiguousNameError`, listing the keys that pick one)."""
        keyed = tensor_keys(self.model(model))
        for key, _, t in keyed:
            if key == name:
                return self.read_blob(t.hash, verify=verify)
        found = [(key, t) for key, _, t in keyed if t.name == name]
        if len(found) == 1:
            return self.read_blob(found[0][1].hash, verify=verify)
        if found:
            keys = tuple(key for key, _ in found)
            raise AmbiguousNameError(
                f"model {model!r} has {len(keys)} tensors named {name!r} "
                f"(in {', '.join(keys)})", path=self.path, candidates=keys,
                hint=f"name one by its key, e.g. read_tensor({model!r}, {keys[-1]!r})")
        raise ModelNotFoundError(f"model {model!r} has no tensor {name!r}", path=self.path)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_cache", None) is not None:
            self._cache.clear()
        view = getattr(self, "view", None)
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # a caller still holds a zero-copy view; the map closes with it
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bundle(path: str | os.PathLike, *, mapped: bool = True) -> Bundle:
    """Open a bundle for lazy reads: one model's tensors without decoding the others."""
    return Bundle(path, mapped=mapped)

"""``pack``: write one deduplicated bundle from a set of models.

Two passes over the inputs, both by reads (``_fs.InputFile``: a file that shrinks gives
one line, not SIGBUS), and what is stored is checked against what was hashed:

1. index every model and hash every tensor (blake3), while a second thread computes each
   original file's sha256;
2. encode each distinct content once (base-plus-delta where the planner found a close
   base, else the smallest of byte-plane zstd / zstd / raw) on a small thread pool, and
   append the blobs in order; then each file's non-tensor bytes; then the manifest.
   Every tensor is read again and its hash compared with pass 1's, and no bundle is
   published if an input was replaced, resized or rewritten meanwhile (issue 14).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .._fs import InputFile
from .._version import __version__
from ..analyzers.delta_planning import DeltaChoice, choose_bases
from ..analyzers.scan import ScannedModels, hash_models, index_models
from ..analyzers.derivation import DeriveChoice
from ..analyzers.tensor_hashes import ContentKey, HashedTensor
from ..errors import UsageError
from ..format.bundle.constants import BlobEncoding, BundleLayout
from ..format.bundle.hashing import hash_bytes
from ..format.bundle.manifest import FileEntry, Manifest, ModelEntry, TensorEntry
from ..format.bundle.writer import BundleWriter
from ..format.checkpoints.dtypes import element_width
from ..format.checkpoints.records import SourceFile
from ..format.checkpoints.sources import ModelArg
from ..format.codecs import DEFAULT_LEVEL, encode
from ..format.codecs.byteplane import ROTATED_TYPES, best_rotation
from ..format.codecs.zstd import zstd_compress
from . import ProgressFn, check_output_file, check_output_not_input, pack_derived
from .ordered import in_order

# Keep a blob raw (zero-copy loads) unless compression saves at least this fraction.
MIN_SAVING = 0.01
# (and only if ``pack_derived.raw_worth_its_alignment``).
# Below this size, trying every encoding in full is cheaper than guessing.
SMALL_BLOB = 1 << 20
# Skip a content's own encodings when the planner estimates its delta below this share
# of them (its estimates land within ~1% of the encoded sizes; bench/RESULTS.md ## delta).
DELTA_CLEAR_WIN = 0.8
SHA_CHUNK = 8 << 20
# Float dtypes whose elements are rotated before their byte planes are split, by the bits
# ``best_rotation`` picks (ROTATED_BYTEPLANE_ZSTD, ROTATEDN_BYTEPLANE_ZSTD).
ROTATED_DTYPES = frozenset({"F32", "BF16", "F16"})



@dataclass(slots=True)
class PackResult:
    """What ``pack`` wrote, with the figures its summary prints."""

    path: Path
    models: list[str]
    logical_bytes: int  # sum of the original files' sizes
    tensor_bytes: int
    distinct_tensor_bytes: int
    bundle_bytes: int
    seconds: float
    encodings: dict[str, int] = field(default_factory=dict)  # blob count per encoding
    layout: str = BundleLayout.COMPACT.value
    #: Per model, what its folder scan left out (``"path (why)"``), for the CLI to say.
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.bundle_bytes if self.bundle_bytes else 1.0


def choose_encoding(data, width: int, level: int, *, base=None,
                    delta: DeltaChoice | None = None,
                    rotate: bool = False) -> tuple[BlobEncoding, object, bool]:
    """Encode ``data`` with the smallest candidate; returns (encoding, stored, used_base).

    Byte planes win on floats, plain zstd on bytes; both are tried in full only on small
    blobs. The planner's delta against ``base`` is tried when given, and the content's own
    encodings are skipped when the planner's estimates put the delta far ahead. Raw is
    kept unless compression saves at least ``MIN_SAVING``, so incompressible blobs stay
    mmap-able; blobs under 4 KiB are never kept raw (``raw_worth_its_alignment``).
    With ``rotate`` (F32, BF16, F16) the byte planes are those of each element rotated by
    the bits that compress a sample best (``best_rotation``: one (ROTATED_BYTEPLANE_ZSTD)
    or more (ROTATEDN_BYTEPLANE_ZSTD); smaller than ZipNN's byte grouping on the corpus);
    plain planes are tried too on small blobs.
    """
    n = memoryview(data).nbytes
    candidates: list[tuple[int, BlobEncoding, object, bool]] = []
    if delta is not None and base is not None:
        stored = encode(delta.encoding, data, width=width, level=level, base=base,
                        shape=delta.shape or None)
        candidates.append((len(stored), delta.encoding, stored, True))
    delta_clearly_wins = (candidates and delta is not None and delta.self_estimated_bytes
                          and delta.estimated_bytes < DELTA_CLEAR_WIN * delta.self_estimated_bytes
                          and candidates[0][0] < n * (1 - MIN_SAVING))
    if not delta_clearly_wins:
        planes: list[tuple[BlobEncoding, int]] = []
        if width > 1 and n % width == 0:
            if rotate and width in ROTATED_TYPES:
                planes.append(_rotated(best_rotation(data, width)))
            if not planes or n <= SMALL_BLOB:
                planes.append((BlobEncoding.BYTEPLANE_ZSTD, 1))
        for enc, rotation in planes:
            stored = encode(enc, data, width=width, level=level, rotation=rotation)
            candidates.append((len(stored), enc, stored, False))
        if width == 1 or n <= SMALL_BLOB or n % width:
            stored = zstd_compress(data, level)
            candidates.append((len(stored), BlobEncoding.ZSTD, stored, False))
    size, enc, stored, used_base = min(candidates, key=lambda c: c[0])
    if size > n * (1 - MIN_SAVING) and not (used_base and size < n) \
            and pack_derived.raw_worth_its_alignment(n):
        return BlobEncoding.RAW, data, False
    return enc, stored, used_base


def _rotated(rotation: int) -> tuple[BlobEncoding, int]:
    """The encoding that stores elements rotated by ``rotation`` bits, and the rotation."""
    if rotation == 1:
        return BlobEncoding.ROTATED_BYTEPLANE_ZSTD, 1
    return BlobEncoding.ROTATEDN_BYTEPLANE_ZSTD, rotation


def layout_bytes(f: SourceFile, src: InputFile) -> bytes:
    """A file's non-tensor bytes (header, metadata, padding; whole file if no tensors)."""
    parts, cursor = [], 0
    for t in f.tensors:
        if t.offset > cursor:
            parts.append(src.read(cursor, t.offset - cursor))
        cursor = max(cursor, t.end)
    if f.size > cursor:
        parts.append(src.read(cursor, f.size - cursor))
    return b"".join(parts)


def sha256_file(src: InputFile, size: int) -> str:
    h = hashlib.sha256()
    for chunk in src.chunks(0, size, SHA_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _check_delta(delta: str) -> None:
    if delta not in ("auto", "off"):
        raise UsageError(f"--delta must be 'auto' or 'off', not {delta!r}")


def _plan_deltas(scanned: ScannedModels, delta: str, decided=None) -> dict:
    """The planner's choices; ``decided`` (see ``choose_bases``) streams them."""
    if delta == "off":
        return {}
    return choose_bases(scanned, decided=decided)


class _Planner:
    """The delta planner on its own thread, handing each decision over as it is made.

    Decisions come in first-occurrence order, every base before its deltas, so the
    writer encodes and writes content *i* while the planner scores content *i + 1*
    (planning is single-threaded numpy: without this, one core idled through it).
    """

    _END = object()

    def __init__(self, scanned: ScannedModels, firsts: dict, delta: str) -> None:
        self.choices: dict = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(scanned, firsts, delta),
                                        name="tdedup-planner", daemon=True)
        self._thread.start()

    def _decided(self, key, choice) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._told.add(key)
        self._queue.put((key, choice))

    def _run(self, scanned: ScannedModels, firsts: dict, delta: str) -> None:
        self._told: set = set()
        try:
            self.choices = _plan_deltas(scanned, delta, self._decided)
            for key in firsts:  # whatever the planner did not stream, in order
                if key not in self._told:
                    self._decided(key, self.choices.get(key))
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 (handed to the writer's thread, raised there)
            self._error = e
        finally:
            self._queue.put(self._END)

    def __iter__(self):
        while (item := self._queue.get()) is not self._END:
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop early (the writer failed) and wait for the thread."""
        self._stop.set()
        self._thread.join()


class _Stopped(Exception):
    pass


def encode_content(data, dtype: str, level: int, base_of: Callable[[ContentKey], object], *,
                   delta: DeltaChoice | None = None, derived: DeriveChoice | None = None,
                   raw_only: bool = False) -> tuple[BlobEncoding, object, str | None]:
    """How one distinct content is stored: (encoding, stored bytes, base blob or None).

    A derived blob (``derived``: a transform of another content, ``base_of`` gives any
    content's bytes) is kept at once when it is a small share of the tensor; otherwise it
    competes with the delta the planner chose and the content's own encodings. Serving
    (``raw_only``) makes the same choice as compact, so that both layouts hold the same
    deltas and derived blobs and ``convert`` between them is exact, then keeps a
    self-contained winner raw."""
    got = None
    if derived is not None:
        got = pack_derived.try_derived(data, base_of(derived.base), derived, level)
        if got is not None and len(got) <= pack_derived.DERIVED_CLEAR_WIN * len(data):
            return BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, got, derived.base[0]
    if raw_only and delta is None and got is None:
        return BlobEncoding.RAW, data, None
    base = base_of(delta.base) if delta is not None else None
    enc, stored, used = choose_encoding(data, element_width(dtype), level, base=base,
                                        delta=delta, rotate=dtype in ROTATED_DTYPES)
    if got is not None and derived is not None and len(got) < len(cast(bytes, stored)):
        return BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, got, derived.base[0]
    if raw_only and not used:
        return BlobEncoding.RAW, data, None
    return enc, stored, (delta.base[0] if used and delta is not None else None)


def pack(paths: Sequence[str | ModelArg], output: str | Path, *, level: int = DEFAULT_LEVEL,
         delta: str = "auto", workers: int = 2, progress: ProgressFn | None = None,
         layout: str | BundleLayout = BundleLayout.COMPACT, derive: str = "auto",
         force: bool = True) -> PackResult:
    """Write a bundle holding every model in ``paths`` (``PATH`` or ``NAME=PATH``).

    Identical tensors are stored once, near-identical ones as base plus delta
    (``delta="auto"``), those another model's tensor computes (a cast, a quantization:
    ``derive="auto"``) as transform plus residual, the rest compressed losslessly at zstd
    ``level`` (``layout="compact"``) or kept raw and aligned for loads that map them
    (``layout="serving"``; the same deltas and derived blobs either way, see spec §10.1);
    a file's non-tensor bytes against another file's when that is smaller. An existing
    ``output`` is replaced only with ``force`` (the CLI checks first; this also refuses a
    file that appeared while the bundle was written).
    """
    t0 = time.perf_counter()
    layout = parse_layout(layout)
    raw_only = layout is BundleLayout.SERVING
    output = check_output_file(output)
    report = progress or (lambda phase, n, total: None)
    models = index_models(paths)
    all_files = [f for m in models for f in m.files]
    check_output_not_input(output, [*(m.path for m in models), *(f.abs_path for f in all_files)])
    total_tensor = sum(m.tensor_bytes for m in models)

    _check_delta(delta)
    with ExitStack() as inputs_open, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Every input is opened once, before anything is hashed: its identity then tells
        # whether it was replaced or rewritten before the bundle is published.
        inputs: dict[Path, InputFile] = {}
        for f in all_files:
            if f.abs_path not in inputs:
                inputs[f.abs_path] = inputs_open.enter_context(
                    InputFile(f.abs_path, expect_size=f.size))
        sha_futures = {id(f): pool.submit(sha256_file, inputs[f.abs_path], f.size)
                       for f in all_files}
        scanned = hash_models(models, lambda n: report("hashing", n, total_tensor))
        firsts = scanned.first_occurrences()
        distinct = sum(k[1] for k in firsts)
        derived = pack_derived.plan(scanned, derive)
        no_delta = pack_derived.delta_exclusions(derived)

        with BundleWriter(output, replace=force) as writer:

            def source(h: HashedTensor) -> bytes:
                """A tensor's bytes, read again and checked against the hash pass 1 gave
                them: what is stored is what was hashed, even if the file changed."""
                path, off, length = scanned.locate(h)
                data = inputs[path].read(off, length)
                if hash_bytes(data) != h.digest:
                    raise inputs[path].changed(f"tensor {h.record.name!r} no longer has the "
                                               "bytes it was hashed with")
                return data

            def job(key, choice):
                h = firsts[key]
                if key in no_delta or (choice is not None and choice.base in no_delta.targets):
                    choice = None  # see pack_derived.delta_exclusions
                return key, *encode_content(source(h), h.record.dtype, level,
                                            lambda k: source(firsts[k]), delta=choice,
                                            derived=derived.get(key), raw_only=raw_only)

            counts: dict[str, int] = {}
            planner = _Planner(scanned, firsts, delta)
            try:
                for key, enc, stored, base in in_order(
                        pool, lambda decision: job(*decision), planner, workers=workers,
                        size=lambda decision: decision[0][1]):
                    writer.add_blob(key[0], enc, stored, key[1], base=base)
                    counts[enc.name.lower()] = counts.get(enc.name.lower(), 0) + 1
                    report("packing", key[1], distinct)
            finally:
                planner.stop()

            layouts = pack_derived.LayoutStore(writer, level, enabled=derive != "off",
                                               raw_only=raw_only)
            manifest_models = []
            for m in models:
                entries = []
                digests = {(h.record.file, h.record.name): h.digest for h in scanned.hashed[m.name]}
                for f in m.files:
                    nontensor = layout_bytes(f, inputs[f.abs_path]) if f.size else b""
                    digest = hash_bytes(nontensor)
                    layouts.add(digest, nontensor, f.kind.value)
                    tensors = [TensorEntry(t.name, t.dtype, list(t.shape), t.offset, t.length,
                                           digests[(t.file, t.name)])
                               for t in f.tensors]
                    info = {k: v for k, v in f.info.items() if isinstance(v, (str, int, float))}
                    entries.append(FileEntry(f.rel_path, f.size,
                                             sha_futures[id(f)].result(), f.kind.value,
                                             digest, tensors, info))
                manifest_models.append(ModelEntry(m.name, m.layout.value, entries, m.hub))
            logical = sum(f.size for f in all_files)
            summary = {"models": len(models), "logical_bytes": logical,
                       "tensor_bytes": total_tensor, "distinct_tensor_bytes": distinct,
                       "stored_blob_bytes": sum(b.stored_length for b in writer.blobs.values()),
                       "encodings": counts, "layout": layout.value}
            # The sha256s, the layouts and the tensors were read at different times: the
            # bundle is published only if no input was replaced or rewritten meanwhile.
            for src in inputs.values():
                src.check_unchanged()
            size = writer.finish(Manifest(manifest_models, {}, tool_version=__version__,
                                          summary=summary), level=level, validate=True)
    return PackResult(output, [m.name for m in models], logical, total_tensor, distinct, size,
                      time.perf_counter() - t0, counts, layout.value,
                      {m.name: list(m.skipped) for m in models if m.skipped})


def parse_layout(layout: str | BundleLayout) -> BundleLayout:
    """``layout`` as a :class:`BundleLayout`, or :class:`UsageError` naming the choices."""
    try:
        return BundleLayout(layout)
    except ValueError:
        choices = ", ".join(repr(x.value) for x in BundleLayout)
        raise UsageError(f"unknown layout {layout!r} (use one of {choices})") from None


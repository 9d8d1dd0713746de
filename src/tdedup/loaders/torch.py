"""``tdedup.load``: every model of a bundle on a torch device, each distinct tensor once.

Each distinct blob the requested models need is decoded and placed on the device once;
every tensor of every model is a view of its blob's bytes (typed and shaped as the
checkpoint declared it), so tensors identical across models are *the same tensor*.

- **CPU**: raw blobs become tensors over a private (copy-on-write) map of the bundle, with
  no copy at all; other blobs are decoded straight into one host arena.
- **CUDA**: a reused pair of pinned staging buffers feeds chunked ``non_blocking`` copies
  on a side stream, so that reading and decoding the next chunk overlaps the transfer of
  the last; delta blobs are finished on the device (XOR, or integer addition, of the
  residual with the base, which is resident by then).
- No hashing unless ``verify=True``: then each blob's stored checksum and decoded hash
  are checked as it is placed, before it serves as a base or any tensor is handed out.

GGUF tensors of F32/F16/BF16/integer types are typed tensors; quantized ones are uint8
tensors of their raw blocks (shape: the logical shape with the last dimension replaced by
its byte count), or float32 with ``dequantize=True`` (via ``gguf.quants``).
:meth:`LoadedBundle.info` gives each tensor's source dtype (the ggml type) and logical
shape.

State-dict keys are the checkpoint's tensor names, prefixed with the folder of their file
within the model when it is not the model's root (a Diffusers pipeline's
``unet/conv_in.weight``; :meth:`LoadedBundle.component` gives one folder's tensors by
their own names). Names that would still collide (two weight files with the same tensors
in one folder) are the file path, a colon and the name (``q8_0.gguf:blk.0.attn_q.weight``).
"""

from __future__ import annotations

import math
import mmap
import os
import posixpath
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from ..errors import (
    BundleFormatError,
    IntegrityError,
    LoadError,
    TdedupError,
    UsageError,
)
from ..format.bundle.constants import BlobEncoding
from ..format.bundle.hashing import hash_bytes
from ..format.bundle.manifest import BlobRecord, FileEntry, ModelEntry, TensorEntry
from ..format.bundle.reader import Bundle
from ..format.checkpoints.dtypes import ggml_blocks, is_quantized, torch_dtype_name
from ..format.codecs import decode
from .blob_stream import (
    DELTA_OPS,
    PREDICTED,
    STREAMED,
    BlobReader,
    DeltaReader,
    MappedSource,
    open_reader,
)

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without the extra
    torch = None

# -- dtypes ---------------------------------------------------------------------------

#: Decoded blobs start at a multiple of this in an arena (any dtype view is aligned).
ARENA_ALIGN = 256
#: Bytes per pinned staging buffer (two are used in turn).
STAGING_BYTES = 32 << 20
#: Bytes decoded per step on the host (bounds the temporaries of predicted deltas).
HOST_CHUNK = 1 << 20


def require_torch():
    """The ``torch`` module, or :class:`LoadError` saying how to get it."""
    if torch is None:
        raise LoadError("loading a bundle needs PyTorch, which is not installed",
                        hint="pip install 'tdedup[torch]' (or the CPU wheel: "
                             "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
    return torch


def require(module: str, purpose: str):
    """Import an optional dependency, or raise :class:`LoadError` naming its extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoadError(f"{purpose} needs {module}, which is not installed",
                        hint=f"pip install 'tdedup[{module}]'") from None


def torch_dtype(dtype: str, kind: str):
    """The torch dtype a tensor of ``dtype`` loads as, or None for raw bytes (uint8):
    quantized ggml blocks, sub-byte floats, or a dtype this torch lacks."""
    name = torch_dtype_name(dtype, kind)
    return getattr(torch, name, None) if name else None


# -- results --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a loaded tensor came from. ``dtype`` is the checkpoint's (safetensors dtype
    or ggml type name, e.g. ``"Q4_1"``), ``shape`` its logical shape; ``ggml_type`` is set
    for quantized GGUF tensors, which load as uint8 blocks unless dequantized."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    blob: str
    ggml_type: str | None = None
    dequantized: bool = False


@dataclass(slots=True)
class LoadStats:
    """Memory and time of one :func:`load`.

    ``logical_bytes``: what the models' tensors take if each model is loaded on its own;
    ``device_bytes``: what they take here, each distinct tensor once (on CPU this
    includes ``mapped_bytes``, tensors that are zero-copy views of the bundle file).
    """

    models: dict[str, int] = field(default_factory=dict)
    logical_bytes: int = 0
    device_bytes: int = 0
    mapped_bytes: int = 0
    tensors: int = 0
    distinct_blobs: int = 0
    seconds: float = 0.0

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.device_bytes


class LoadedBundle(Mapping):
    """Model name -> ``dict[str, torch.Tensor]`` state dict, plus :attr:`stats`.

    Tensors shared by several models are the same tensor objects: writing into one model's
    tensor in place changes every model that shares it (as with tied weights).
    """

    def __init__(self, path: Path, device, state: dict[str, dict], info: dict[str, dict],
                 files: dict[str, list[FileEntry]], stats: LoadStats) -> None:
        self.path = path
        self.device = device
        self.stats = stats
        self._state = state
        self._info = info
        self._files = files
        self._bundle: Bundle | None = None
        self._lock = threading.Lock()

    def __getitem__(self, model: str) -> dict:
        try:
            return self._state[model]
        except KeyError:
            raise KeyError(f"model {model!r} was not loaded (loaded: "
                           f"{', '.join(self._state)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __repr__(self) -> str:
        return (f"LoadedBundle({str(self.path)!r}, device={str(self.device)!r}, "
                f"models={list(self._state)})")

    def info(self, model: str) -> dict[str, TensorInfo]:
        """Key -> :class:`TensorInfo` of every tensor of ``model``."""
        self[model]
        return self._info[model]

    def files(self, model: str) -> list[str]:
        """Paths of every file of ``model`` (weights and others), as in the bundle."""
        self[model]
        return [f.path for f in self._files[model]]

    def component(self, model: str, folder: str = "", *, variant: str | None = None
                  ) -> dict:
        """The tensors of the weight files directly in ``folder`` of ``model`` (``""``:
        its root), keyed by their names in those files. ``variant`` picks Diffusers-style
        variant files (``*.fp16.safetensors``); without it, files without a variant."""
        state, info = self[model], self._info[model]
        out = {}
        for key, ti in info.items():
            if posixpath.dirname(ti.file) == folder and weight_variant(ti.file) == variant:
                out[ti.name] = state[key]
        return out

    def read_file(self, model: str, path: str) -> bytes:
        """An original file of ``model`` (config.json, tokenizer files), from the bundle."""
        self[model]
        with self._lock:
            if self._bundle is None:
                self._bundle = Bundle(self.path)
            return self._bundle.read_file(model, path)

    def close(self) -> None:
        """Close the bundle file kept for :meth:`read_file`. Tensors stay valid."""
        with self._lock:
            if self._bundle is not None:
                self._bundle.close()
                self._bundle = None

    def __enter__(self) -> "LoadedBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def weight_variant(path: str) -> str | None:
    """``"fp16"`` for ``unet/diffusion_pytorch_model.fp16.safetensors`` (and its shards),
    None for a file without a variant."""
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    stem = _SHARD_RE.sub("", stem)
    return stem.split(".", 1)[1] if "." in stem else None


# -- planning -------------------------------------------------------------------------

@dataclass(slots=True)
class _Use:
    model: str
    key: str
    file: FileEntry
    tensor: TensorEntry


def _keys(m: ModelEntry) -> list[tuple[str, FileEntry, TensorEntry]]:
    """State-dict key of each tensor of a model (see the module docstring)."""
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


# -- placing blobs --------------------------------------------------------------------

class _ArrayReader(BlobReader):
    """Decoded bytes already in memory (encodings left to the format's codecs)."""

    def __init__(self, data) -> None:
        self.data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        self.pos = 0

    def readinto(self, out: np.ndarray) -> None:
        out[:] = self.data[self.pos:self.pos + len(out)]
        self.pos += len(out)


#: Elements per step of :func:`combine` (bounds its temporaries on the host).
COMBINE_CHUNK = 1 << 20
_SIGNED = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def combine(out, base, op: str, width: int) -> None:
    """Finish a delta blob in place: ``out`` holds its residual, ``base`` the base's bytes
    (uint8 tensors of one length, on one device). See ``blob_stream.DELTA_OPS``."""
    if op == "xor":
        out.bitwise_xor_(base)
        return
    name = _SIGNED.get(width)
    if name is None or len(out) % width:
        raise LoadError(f"cannot add a delta residual of element width {width}")
    dt = getattr(torch, name)
    # Signed views: two's complement addition wraps exactly like the unsigned one.
    o, b = out.view(dt), base.view(dt)
    if op == "add":
        o.add_(b)
        return
    top = (1 << (8 * width - 1)) - 1  # unzigzag: logical shift right = arithmetic & top
    for i in range(0, len(o), COMBINE_CHUNK):
        z = o[i:i + COMBINE_CHUNK]
        sign = z.bitwise_and(1).neg_()
        z.bitwise_right_shift_(1).bitwise_and_(top).bitwise_xor_(sign).add_(
            b[i:i + COMBINE_CHUNK])


class _Stager:
    """Pinned host buffers, reused across loads, feeding one CUDA device on a side stream."""

    _cache: dict = {}

    def __init__(self, device) -> None:
        self.device = device
        self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)]
        self.events: list = [None, None]
        self.stream = torch.cuda.Stream(device)
        self.turn = 0
        self.lock = threading.Lock()  # one load at a time uses these buffers

    @classmethod
    def get(cls, device) -> "_Stager":
        key = (device.type, device.index)
        if key not in cls._cache:
            cls._cache[key] = cls(device)
        return cls._cache[key]

    def upload(self, reader: BlobReader, dest, hasher=None) -> None:
        """Decode the reader's bytes chunk by chunk into ``dest`` (a device uint8 tensor)."""
        n = len(dest)
        pos = 0
        step = STAGING_BYTES // reader.unit * reader.unit
        if not step:
            raise LoadError(f"a {reader.unit}-byte row does not fit the staging buffer")
        while pos < n:
            k = min(step, n - pos)
            ev = self.events[self.turn]
            if ev is not None:
                ev.synchronize()  # that buffer's last copy is done: it can be refilled
            host = self.buffers[self.turn][:k]
            chunk = host.numpy()
            reader.readinto(chunk)
            if hasher is not None:
                hasher.update(chunk)
            with torch.cuda.stream(self.stream):
                dest[pos:pos + k].copy_(host, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.events[self.turn] = ev
            self.turn ^= 1
            pos += k

    def combine(self, out, base, op: str, width: int) -> None:
        with torch.cuda.stream(self.stream):  # after the residual's and the base's copies
            combine(out, base, op, width)

    def finish(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class _Placer:
    """Decodes each blob once into its final storage and keeps it as a uint8 tensor."""

    def __init__(self, bundle: Bundle, device, depth: dict[str, int], *, verify: bool,
                 workers: int) -> None:
        self.bundle, self.device, self.depth = bundle, device, depth
        self.verify, self.workers = verify, workers
        self.blobs: dict[str, object] = {}  # hash -> uint8 tensor of its decoded bytes
        self.viewed: list[tuple[int, int]] = []  # byte ranges of the map that tensors view
        with open(bundle.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != bundle.size:
                raise LoadError("the bundle changed while it was being opened",
                                path=bundle.path)
            # Private map: tensors over it can be written (copy on write), never the file.
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.view = memoryview(self.mm)

    def what(self, rec: BlobRecord) -> None:
        return None  # codec errors name no part of their own; corrupt() adds the blob

    def corrupt(self, rec: BlobRecord, problem: str, part: str | None = None
                ) -> IntegrityError:
        return self.bundle.corrupt(rec.hash, problem, part=part)

    def check_stored(self, rec: BlobRecord) -> None:
        if not self.verify or rec.encoding is BlobEncoding.RAW:
            return  # a raw blob's checksum is its hash, checked once it is placed
        if hash_bytes(self.view[rec.offset:rec.offset + rec.stored_length]) != rec.checksum:
            raise self.corrupt(rec, "stored bytes fail their checksum (corrupted)")

    def check_decoded(self, rec: BlobRecord, digest: str) -> None:
        if digest != rec.hash:
            raise self.corrupt(rec, "decoded bytes do not match their hash (corrupted)")

    def reader(self, rec: BlobRecord, base_bytes=None, *, device_combine: bool = False
               ) -> BlobReader:
        """A reader of ``rec``'s decoded bytes. Deltas are finished by the reader, from
        ``base_bytes(start, stop)`` (default: the placed base's bytes, on the host); with
        ``device_combine``, a ``DELTA_OPS`` delta reads as its residual, for
        :meth:`finish_delta`."""
        try:
            if rec.encoding in STREAMED or (device_combine and rec.encoding in DELTA_OPS):
                return open_reader(self.mm, self.view, rec, self.what(rec))
            if rec.encoding in DELTA_OPS or rec.encoding in PREDICTED:
                if base_bytes is None:
                    base = self.blobs[rec.base]
                    base_bytes = lambda a, b: base[a:b].cpu().numpy()  # noqa: E731
                return DeltaReader(self.mm, self.view, rec, self.what(rec), base_bytes)
        except IntegrityError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        # An encoding not streamed here: decoded whole on the host by the format's
        # codecs, from the placed base.
        base = None
        if rec.base is not None:
            base = (base_bytes(0, rec.decoded_length) if base_bytes is not None
                    else self.blobs[rec.base].cpu().numpy())
        source = MappedSource(self.mm, self.view, rec.offset, rec.stored_length)
        try:
            data = decode(rec.encoding, source.read(), rec.decoded_length, base=base,
                          what=self.what(rec))
        except TdedupError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        finally:
            source.close()
        return _ArrayReader(data)

    def finish_delta(self, rec: BlobRecord, out, reader: BlobReader, stager: _Stager) -> None:
        """Apply a residual uploaded as is to its base, on the device."""
        if rec.encoding not in DELTA_OPS or isinstance(reader, DeltaReader):
            return  # not a delta, or one its reader already finished
        stager.combine(out, self.blobs[rec.base], DELTA_OPS[rec.encoding], reader.width)

    # -- host ------------------------------------------------------------------------

    def place_host(self, recs: list[BlobRecord]) -> None:
        """CPU: raw blobs as zero-copy views of the map, the others decoded into an arena."""
        arena_recs = []
        for rec in recs:
            if rec.encoding is BlobEncoding.RAW:
                self.blobs[rec.hash] = torch.frombuffer(self.mm, dtype=torch.uint8,
                                                        count=rec.decoded_length,
                                                        offset=rec.offset)
                self.viewed.append((rec.offset, rec.offset + rec.decoded_length))
                if self.verify:
                    self.check_decoded(rec, hash_bytes(self.blobs[rec.hash].numpy()))
            else:
                arena_recs.append(rec)
        for rec, dest in zip(arena_recs, self.arena(arena_recs, torch.device("cpu"))):
            self.blobs[rec.hash] = dest
        # Bases before deltas: each depth is decoded before the next starts.
        by_depth: dict[int, list[BlobRecord]] = {}
        for rec in arena_recs:
            by_depth.setdefault(self.depth[rec.hash], []).append(rec)
        for level in sorted(by_depth):
            group = by_depth[level]
            if self.workers > 1 and len(group) > 1:
                with ThreadPoolExecutor(self.workers) as pool:
                    list(pool.map(self.decode_host, group))
            else:
                for rec in group:
                    self.decode_host(rec)

    def drop_pages(self) -> None:
        """Drop from the process every page of the map that no tensor views (headers and
        tables read while decoding): the page cache keeps them, the resident set not."""
        if not (hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")):
            return
        page = mmap.PAGESIZE
        cursor = 0
        for start, end in sorted(self.viewed) + [(len(self.mm), len(self.mm))]:
            stop = start // page * page
            if stop > cursor:
                self.mm.madvise(mmap.MADV_DONTNEED, cursor, stop - cursor)
            cursor = max(cursor, -(-end // page) * page)

    def decode_host(self, rec: BlobRecord) -> None:
        self.check_stored(rec)
        out = self.blobs[rec.hash]
        reader = self.reader(rec)
        array = out.numpy()
        step = max(reader.unit, HOST_CHUNK // reader.unit * reader.unit)
        try:
            for i in range(0, len(array), step):
                reader.readinto(array[i:i + step])
            reader.finish()
        except IntegrityError as e:
            raise self.corrupt(rec, e.problem, e.part) from e
        if self.verify:
            self.check_decoded(rec, hash_bytes(out.numpy()))

    def arena(self, recs: list[BlobRecord], device) -> list:
        """One allocation for all of ``recs``; a uint8 slice for each."""
        offsets, total = [], 0
        for rec in recs:
            offsets.append(total)
            total += -(-rec.decoded_length // ARENA_ALIGN) * ARENA_ALIGN
        if not recs:
            return []
        if device.type == "cpu":
            arena = _host_arena(total)
        else:
            arena = torch.empty(total, dtype=torch.uint8, device=device)
        return [arena[o:o + rec.decoded_length] for o, rec in zip(offsets, recs)]

    # -- CUDA ------------------------------------------------------------------------

    def place_cuda(self, recs: list[BlobRecord]) -> None:
        """Every blob into one device arena, through the pinned staging buffers."""
        stager = _Stager.get(self.device)
        for rec, dest in zip(recs, self.arena(recs, self.device)):
            self.blobs[rec.hash] = dest
        with stager.lock:
            self._upload_all(stager, recs)

    def _device_bytes(self, stager: _Stager, digest: str | None):
        """``(start, stop) -> host copy of that range of a device blob``, ordered after
        the blob's own upload on the staging stream."""
        if digest is None:
            return None

        def fetch(start: int, stop: int) -> np.ndarray:
            with torch.cuda.stream(stager.stream):
                return self.blobs[digest][start:stop].to("cpu").numpy()

        return fetch

    def _upload_all(self, stager: _Stager, recs: list[BlobRecord]) -> None:
        try:
            for rec in recs:  # already ordered: bases first
                self.check_stored(rec)
                dest = self.blobs[rec.hash]
                reader = self.reader(rec, self._device_bytes(stager, rec.base),
                                     device_combine=True)
                hasher = (blake3.blake3(max_threads=blake3.blake3.AUTO)
                          if self.verify and rec.base is None else None)
                try:
                    stager.upload(reader, dest, hasher)
                    reader.finish()
                except IntegrityError as e:
                    raise self.corrupt(rec, e.problem, e.part) from e
                self.finish_delta(rec, dest, reader, stager)
                if self.verify:
                    if hasher is None:  # a delta: its final bytes exist on the device only
                        stager.finish()
                        self.check_decoded(rec, hash_bytes(dest.cpu().numpy()))
                    else:
                        self.check_decoded(rec, hasher.hexdigest())
        finally:
            stager.finish()


def _host_arena(nbytes: int):
    """A uint8 tensor of ``nbytes`` of fresh host memory, its pages mapped up front.

    Mapping every page in one ``MAP_POPULATE`` call costs about half of faulting them
    in one by one while decoding (bench/RESULTS.md, "## load"). The memory goes back
    to the system when the last tensor viewing it is freed.
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if not flags or not hasattr(mmap, "MAP_POPULATE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    mm = mmap.mmap(-1, nbytes, flags=flags | mmap.MAP_POPULATE)
    return torch.frombuffer(mm, dtype=torch.uint8)


def _resolve_device(device):
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"not a torch device: {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError("CUDA is not available here",
                            hint="load on the CPU (device='cpu', or --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise UsageError(f"device {dev} is not supported (use 'cpu' or 'cuda[:N]')")
    return dev


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1) // 2))


# -- the API --------------------------------------------------------------------------

def load(path: str | os.PathLike, device: "str | torch.device" = "cuda", models: Sequence[str] | None = None,
         verify: bool = False, *, dequantize: bool = False, workers: int | None = None
         ) -> LoadedBundle:
    """Load the tensors of ``models`` (default: every model) of a bundle onto ``device``,
    each distinct tensor once. See the module docstring for what comes back.

    ``device``: ``"cuda"`` (``"cuda:N"``), ``"cpu"`` or ``"auto"``. ``verify``: check every
    blob's checksum and hash before it is used. ``dequantize``: quantized GGUF tensors as
    float32. ``workers``: threads decoding blobs on CPU (default: half the cores, up to 4).
    """
    require_torch()
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    with Bundle(path) as bundle:
        names = list(dict.fromkeys(models)) if models else bundle.model_names
        chosen = [bundle.model(n) for n in names]
        if verify:  # bytes no tensor uses are checked too, so a damaged bundle never loads
            bundle.check_padding()
            for f in (f for m in chosen for f in m.files):
                bundle.check_stored(bundle.blob(f.layout))
        uses = [_Use(m.name, key, f, t) for m in chosen for key, f, t in _keys(m)]
        quant = {id(u): ggml_blocks(u.tensor.dtype)
                 if is_quantized(u.tensor.dtype, u.file.kind) else None for u in uses}
        # Blobs that only feed dequantization stay on the host; any other use, or being
        # the base of a device blob, puts a blob on the device.
        on_device = {u.tensor.hash for u in uses
                     if u.tensor.length and not (dequantize and quant[id(u)])}
        needed = [u.tensor.hash for u in uses if u.tensor.length]
        order = bundle.manifest.placement_order(needed)
        depth = bundle.manifest.with_bases(needed)
        for rec in reversed(order):
            if rec.hash in on_device and rec.base is not None:
                on_device.add(rec.base)
        placer = _Placer(bundle, dev, depth, verify=verify,
                         workers=_default_workers() if workers is None else max(1, workers))
        device_recs = [r for r in order if r.hash in on_device]
        # Device blobs first: a host-only blob may be a delta on a device base.
        if dev.type == "cuda":
            placer.place_cuda(device_recs)
        else:
            placer.place_host(device_recs)
        placer.place_host([r for r in order if r.hash not in on_device])
        placer.drop_pages()
        files = {m.name: list(m.files) for m in chosen}

    state, info, stats = _build_tensors(uses, quant, placer.blobs, dev, dequantize,
                                        [m.name for m in chosen])
    stats.device_bytes += sum(r.decoded_length for r in device_recs)
    if dev.type == "cpu":
        stats.mapped_bytes = sum(r.decoded_length for r in device_recs
                                 if r.encoding is BlobEncoding.RAW)
    stats.distinct_blobs = len(order)
    stats.seconds = time.perf_counter() - t0
    return LoadedBundle(Path(path), dev, state, info, files, stats)


def _build_tensors(uses: list[_Use], quant: dict, blobs: dict, dev, dequantize: bool,
                   names: list[str]):
    """Typed, shaped views of the placed blobs; one tensor per distinct (blob, dtype,
    shape), shared by every model that uses it."""
    state: dict[str, dict] = {n: {} for n in names}
    info: dict[str, dict] = {n: {} for n in names}
    stats = LoadStats(models={n: 0 for n in names})
    made: dict[tuple, object] = {}
    dequantized_bytes = 0
    for u in uses:
        t, f = u.tensor, u.file
        q = quant[id(u)]
        shape = tuple(t.shape)
        deq = bool(q) and dequantize
        key = (t.hash, t.dtype, shape, f.kind, deq)
        tensor = made.get(key)
        if tensor is None:
            _check_fits(t, f, q, None if q is not None else torch_dtype(t.dtype, f.kind))
            if q is not None:
                block, type_size = q.block, q.type_size
                if deq:
                    tensor = _dequantize(blobs.get(t.hash), q.type_id, shape, dev)
                    dequantized_bytes += tensor.nbytes
                else:
                    tensor = _typed(blobs.get(t.hash), torch.uint8,
                                    (*shape[:-1], shape[-1] // block * type_size)
                                    if shape else (t.length,), dev)
            else:
                dt = torch_dtype(t.dtype, f.kind)
                tensor = _typed(blobs.get(t.hash), dt or torch.uint8,
                                shape if dt is not None else (t.length,), dev)
            made[key] = tensor
        state[u.model][u.key] = tensor
        info[u.model][u.key] = TensorInfo(t.name, f.path, t.dtype, shape, t.hash,
                                          q.name if q else None, deq)
        stats.models[u.model] += tensor.nbytes
    stats.logical_bytes = sum(stats.models.values())
    stats.tensors = len(uses)
    stats.device_bytes = dequantized_bytes
    return state, info, stats


def _check_fits(t: TensorEntry, f: FileEntry, q, dt) -> None:
    """Refuse a tensor whose dtype and shape do not describe exactly its bytes (a damaged
    or hostile manifest) before a view or an allocation is made from them."""
    shape = tuple(t.shape)
    if any(d >= 1 << 63 for d in shape):  # torch sizes are int64 (an empty tensor's too)
        ok = False
    elif q is not None:
        block, type_size = q.block, q.type_size
        ok = not shape or (shape[-1] % block == 0 and math.prod(shape[:-1])
                           * (shape[-1] // block * type_size) == t.length)
    else:
        ok = dt is None or math.prod(shape) * dt.itemsize == t.length
    if not ok:
        raise BundleFormatError(f"tensor {t.name!r} of {f.path}: {t.dtype} {list(shape)} does "
                                f"not fit its {t.length} bytes (corrupted manifest)")


def _typed(raw, dtype, shape: tuple[int, ...], dev):
    if raw is None:  # an empty tensor: no blob bytes to view
        return torch.empty(shape, dtype=dtype, device=dev)
    return raw.view(dtype).view(shape)


def _dequantize(raw, qtype, shape: tuple[int, ...], dev):
    from gguf.quants import dequantize

    if raw is None:
        return torch.empty(shape, dtype=torch.float32, device=dev)
    blocks = raw.cpu().numpy()
    values = dequantize(blocks, qtype).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dev)


__all__ = ["load", "LoadedBundle", "LoadStats", "TensorInfo", "torch_dtype", "TdedupError"]

"""A resident registry: models added to and dropped from a running process, each distinct
blob resident once across every bundle loaded.

Entries are keyed by blob hash (the BLAKE3 of the decoded bytes, which every manifest
records), so identical content from two bundles is one storage. Loading a model places
only the blobs not yet resident (a delta is decoded against its resident base); a model
whose every blob is resident costs no memory and no decoding. A model is known by its
name: loading a name that is resident again is free when it is the same model (same
tensors, same files, same ``dequantize``), and refused otherwise (unload it first), so
a resident model never mixes two bundles' tensors or files.

Unloading a model frees every entry no resident model uses any more, and each blob has a
storage of its own: its memory goes back once no other tensor (a model built from it, a
state dict kept by the caller) refers to it. On CUDA it goes back to torch's caching
allocator (``torch.cuda.empty_cache()`` hands it to the driver). On the CPU, decoded
blobs of 1 MiB and more are anonymous maps, unmapped when freed; raw blobs are views of
a private map of their bundle, whose pages are dropped with the last view (a blob placed
only as a delta's base, or only to be dequantized, is dropped at the end of its load);
smaller blobs and the decoders' temporaries come from malloc, whose free memory an
unload hands back with ``malloc_trim`` where the C library is glibc (elsewhere the heap
may keep it for reuse).

:func:`tdedup.load` is a :class:`Registry` used once, privately, so the two paths are one.
Loads and unloads are serialized by one lock (each load decodes on every core): two
threads loading overlapping models place each blob once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelNotLoadedError, UsageError, display_path
from ..format.bundle.constants import BlobEncoding
from ..format.bundle.manifest import FileEntry, ModelEntry, TensorEntry
from ..format.bundle.reader import Bundle
from .deps import require_torch
from .placement import Placer, blob_order, default_workers, resolve_device, trim_heap
from .results import (
    LoadedBundle,
    LoadStats,
    ModelAccess,
    ModelRecord,
    ModelStats,
    RegistryStats,
    TensorInfo,
)
from .views import dequantized, quant_of, state_keys, typed_view

#: Suffix of the entry key of a dequantized tensor (its blob's hash + this).
DEQUANTIZED = ":f32"


@dataclass(slots=True)
class Entry:
    """One resident piece of content: a blob's bytes (uint8) or a dequantized tensor;
    the typed views made of it, and the models using it."""

    tensor: Any
    nbytes: int
    mapped: bool = False
    users: set[str] = field(default_factory=set)
    views: dict[tuple, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Use:
    """One tensor of one model to be handed out."""

    model: str
    key: str
    file: FileEntry
    tensor: TensorEntry
    deq: bool

    @property
    def entry(self) -> str | None:
        if not self.tensor.length:
            return None  # empty: no bytes to hold
        return self.tensor.hash + DEQUANTIZED if self.deq else self.tensor.hash

    def info(self) -> TensorInfo:
        q = quant_of(self.file, self.tensor)
        t = self.tensor
        return TensorInfo(t.name, self.file.path, t.dtype, tuple(t.shape), t.hash,
                          q.name if q else None, self.deq)


class Registry(Mapping, ModelAccess):
    """Model name -> state dict of every resident model, each distinct blob once.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda[:N]"``.
    ``verify``: check each blob read against its stored checksum before any tensor is
    handed out (resident blobs are not read again). ``workers``: decoding threads.
    """

    def __init__(self, device: Any = "auto", *, verify: bool = True,
                 workers: int | None = None) -> None:
        require_torch()
        ModelAccess.__init__(self)
        self.device = resolve_device(device)
        self.verify = verify
        self.workers = default_workers() if workers is None else max(1, workers)
        self._entries: dict[str, Entry] = {}
        self._models: dict[str, ModelRecord] = {}
        self._lock = threading.RLock()

    # -- the mapping -------------------------------------------------------------------

    def record(self, model: str) -> ModelRecord:
        with self._lock:
            try:
                return self._models[model]
            except KeyError:
                raise ModelNotLoadedError(f"model {model!r} is not resident (resident: "
                                          f"{', '.join(self._models) or 'none'})") from None

    def __getitem__(self, model: str) -> dict:
        return self.record(model).state

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._models))

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"Registry(device={str(self.device)!r}, models={list(self._models)})"

    @property
    def stats(self) -> RegistryStats:
        with self._lock:
            models = {}
            for name, rec in self._models.items():
                unique = sum(self._entries[k].nbytes for k in rec.entries
                             if self._entries[k].users == {name})
                models[name] = ModelStats(rec.logical_bytes, unique)
            return RegistryStats(sum(e.nbytes for e in self._entries.values()), models)

    # -- adding and dropping -----------------------------------------------------------

    def load(self, bundle: str | os.PathLike, names: Sequence[str] | str | None = None, *,
             dequantize: bool = False) -> dict[str, dict]:
        """Make ``names`` of ``bundle`` resident, placing only the blobs not resident
        yet; their state dicts. ``names``: None for every model of the bundle; a name
        or a sequence of names; an empty sequence loads nothing (a caller passing the
        models still missing may pass none)."""
        loaded = self.place(bundle, names, dequantize=dequantize)
        return {n: loaded[n] for n in loaded}

    def unload(self, name: str) -> int:
        """Drop model ``name``; free every entry no resident model uses. Returns the
        bytes freed (which go back to the system as the module docstring says)."""
        freed = self._drop(name)
        if freed:
            trim_heap()
        return freed

    def _drop(self, name: str) -> int:
        with self._lock:
            rec = self.record(name)
            del self._models[name]
            freed = 0
            for key in rec.entries:
                entry = self._entries[key]
                entry.users.discard(name)
                if not entry.users:
                    freed += entry.nbytes
                    del self._entries[key]
            return freed

    def place(self, path: str | os.PathLike, names: Sequence[str] | str | None = None, *,
              dequantize: bool = False, progress: Callable[[int, int], None] | None = None
              ) -> LoadedBundle:
        """:meth:`load`, returned as a :class:`LoadedBundle` whose stats are this call's
        (``device_bytes``: what it added to the resident set). ``progress(done, total)``
        is called with stored bytes as blobs are placed."""
        t0 = time.perf_counter()
        wanted = None if names is None else selection(names)
        with self._lock, Bundle(path) as bundle:
            if wanted is None:
                wanted = bundle.model_names
            if not wanted:
                return LoadedBundle(Path(path), self.device, {},
                                    LoadStats(verified=self.verify,
                                              seconds=time.perf_counter() - t0))
            chosen = [bundle.model(n) for n in wanted]
            if self.verify:  # bytes no tensor uses too, so a damaged bundle never loads
                bundle.check_padding()
                for f in {f.layout: f for m in chosen for f in m.files}.values():
                    bundle.check_stored(bundle.blob(f.layout))
            # From here on only the manifest is used (the placer reads through a private
            # map of its own): unmapping the bundle's map now returns the pages those
            # checks faulted in (with the kernel's fault-around, ~3 % of the distinct
            # bytes on the corpus family) before the decoded bytes pile up.
            bundle.close()
            uses: dict[str, list[Use]] = {}
            for m in chosen:
                uses[m.name] = [Use(m.name, key, f, t,
                                    dequantize and quant_of(f, t) is not None)
                                for key, f, t in state_keys(m)]
            fresh = self._check_names(Path(path), chosen, uses)
            placed, stats = self._place(bundle, [u for n in fresh for u in uses[n]],
                                        progress)
            records = {n: self._models[n] for n in wanted if n not in fresh}
            try:
                for n in fresh:
                    records[n] = self._record(Path(path), bundle, n, uses[n], placed)
            except BaseException:
                self._forget(fresh)
                del placed
                trim_heap()
                raise
            records = {n: records[n] for n in wanted}
            for n, rec in records.items():
                self._models[n] = rec
                stats.models[n] = rec.logical_bytes
            stats.logical_bytes = sum(stats.models.values())
            stats.tensors = sum(len(r.state) for r in records.values())
        stats.seconds = time.perf_counter() - t0
        return LoadedBundle(Path(path), self.device, records, stats)

    # -- internals ---------------------------------------------------------------------

    def _check_names(self, path: Path, chosen: list[ModelEntry],
                     uses: dict[str, list[Use]]) -> list[str]:
        """The models not resident yet; a resident one must be the same model (same
        tensors and files, loaded with the same ``dequantize``)."""
        fresh = []
        for m in chosen:
            rec = self._models.get(m.name)
            if rec is None:
                fresh.append(m.name)
                continue
            us = uses[m.name]
            sig = frozenset((u.key, u.tensor.hash, u.tensor.dtype, tuple(u.tensor.shape),
                             u.deq) for u in us)
            files = frozenset((f.path, f.sha256) for f in m.files)
            if sig == rec.signature() and files == rec.file_hashes():
                continue
            name, there = m.name, display_path(rec.path)
            undo = f"unload({name!r})"
            same_tensors = _bare(sig) == _bare(rec.signature())
            if same_tensors and files == rec.file_hashes():  # only dequantize differs
                was = any(i.dequantized for i in rec.info.values())
                raise UsageError(
                    f"model {name!r} is resident already with dequantize={was} (from "
                    f"{there}); unload it first to load it with dequantize={not was}",
                    path=path, models=(name,),
                    hint=f"use it as it is, or {undo} and load it again")
            if same_tensors:
                other = dict.fromkeys(sorted(p for p, _ in files ^ rec.file_hashes()))
                what = f"the same tensors but other files ({', '.join(other)})"
            else:
                what = "other tensors"
            raise UsageError(
                f"another model named {name!r} is resident (from {there}), with {what}; "
                f"unload it first", path=path, models=(name,),
                hint=f"{undo}, then load this one (a name is one model at a time)")
        return fresh

    def _place(self, bundle: Bundle, uses: list[Use], progress) -> tuple[dict, LoadStats]:
        """Place every blob ``uses`` needs that is not resident; new entries by key."""
        resident = {k: e.tensor for k, e in self._entries.items()}
        need = {u.entry: u for u in uses if u.entry is not None and u.entry not in resident}
        # Blobs that only feed dequantization stay on the host; any other use, or being
        # the base of a device blob, puts a blob on the device.
        digests = [u.tensor.hash for u in need.values()]
        order, depth = blob_order(bundle, digests, resident)
        on_device = {u.tensor.hash for u in need.values() if not u.deq}
        for rec in reversed(order):
            if rec.hash in on_device and rec.base is not None:
                on_device.add(rec.base)
        placer = Placer(bundle, self.device, depth, verify=self.verify,
                        workers=self.workers, resident=resident, progress=progress)
        device_recs = [r for r in order if r.hash in on_device]
        try:
            # Device blobs first: a host-only blob may be a delta on a device base.
            if self.device.type == "cuda":
                placer.place_cuda(device_recs)
            else:
                placer.place_host(device_recs)
            placer.place_host([r for r in order if r.hash not in on_device])
        finally:
            placer.close()
        stats = LoadStats(distinct_blobs=len(order), verified=self.verify,
                          read_bytes=sum(r.stored_length for r in order))
        raw = {r.hash for r in device_recs if r.encoding is BlobEncoding.RAW}
        entries: dict[str, Entry] = {}
        for key, u in need.items():
            h = u.tensor.hash
            blob = placer.blobs.get(h)
            if blob is None:
                blob = resident[h]
            if u.deq:
                tensor = dequantized(blob, u.file, u.tensor, self.device)
                entries[key] = Entry(tensor, tensor.nbytes)
            else:
                mapped = self.device.type == "cpu" and h in raw
                entries[key] = Entry(blob, len(blob), mapped)
                stats.mapped_bytes += len(blob) if mapped else 0
            stats.device_bytes += entries[key].nbytes
        # Raw blobs that only fed deltas or dequantization are not kept: the map's pages
        # of every blob no entry views go now (they stayed while the deltas decoded).
        placer.drop_pages(keep={u.tensor.hash for key, u in need.items()
                                if entries[key].mapped})
        return entries, stats

    def _forget(self, names: list[str]) -> None:
        """Undo a failed load: entries it made that no resident model uses go."""
        for key in list(self._entries):
            entry = self._entries[key]
            entry.users.difference_update(n for n in names if n not in self._models)
            if not entry.users:
                del self._entries[key]

    def _record(self, path: Path, bundle: Bundle, name: str, uses: list[Use],
                placed: dict) -> ModelRecord:
        """Model ``name``'s tensors as views of resident entries (``placed``: new ones,
        made resident as they are first used)."""
        state, info, keys, logical = {}, {}, set(), 0
        for u in uses:
            ek = u.entry
            if ek is None:
                tensor = typed_view(None, u.file, u.tensor, self.device) if not u.deq \
                    else dequantized(None, u.file, u.tensor, self.device)
            else:
                entry = self._entries.get(ek)
                if entry is None:
                    entry = self._entries[ek] = placed[ek]
                vkey = (u.tensor.dtype, tuple(u.tensor.shape), u.file.kind)
                tensor = entry.views.get(vkey)
                if tensor is None:
                    tensor = entry.tensor if u.deq else typed_view(entry.tensor, u.file,
                                                                   u.tensor, self.device)
                    entry.views[vkey] = tensor
                entry.users.add(u.model)
                keys.add(ek)
            state[u.key] = tensor
            info[u.key] = u.info()
            logical += tensor.nbytes
        return ModelRecord(name, path, state, info, list(bundle.model(name).files),
                           frozenset(keys), logical, bundle.identity)


def _bare(signature: frozenset) -> frozenset:
    """A signature without its dequantize flags."""
    return frozenset(s[:4] for s in signature)


def selection(names: Iterable[str] | str) -> list[str]:
    """The model names a caller asked for, each once: a str is one name (not its
    characters); anything else must be an iterable of str (empty: no model)."""
    if isinstance(names, str):
        return [names]
    try:
        wanted = list(names)
    except TypeError:
        wanted = None
    if wanted is None or not all(isinstance(n, str) for n in wanted):
        raise UsageError(f"models must be a model name or a list of names, not {names!r}",
                         hint="e.g. models=['base', 'ft'] (None: every model)")
    return list(dict.fromkeys(wanted))


__all__ = ["DEQUANTIZED", "Entry", "Registry", "Use", "selection"]

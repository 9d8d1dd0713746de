"""What a load hands back: state dicts per model, where each tensor came from, the cost.

:class:`LoadedBundle` (from :func:`tdedup.load`) and :class:`tdedup.Registry` both hold
:class:`ModelRecord` objects and answer the same questions about them through
:class:`ModelAccess` (a model's tensors, their origin, its other files, one component's
tensors), so the transformers and diffusers builders accept either.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleChangedError, ModelNotFoundError, ModelNotLoadedError, TdedupError
from ..format.bundle.manifest import FileEntry
from .._fs import file_identity
from ..format.bundle.reader import Bundle


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
    ``read_bytes``: stored bytes of the blobs read; ``verified``: whether each was
    checked against its stored checksum before any tensor was handed out.
    """

    models: dict[str, int] = field(default_factory=dict)
    logical_bytes: int = 0
    device_bytes: int = 0
    mapped_bytes: int = 0
    tensors: int = 0
    distinct_blobs: int = 0
    read_bytes: int = 0
    verified: bool = False
    seconds: float = 0.0

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.device_bytes

    @property
    def gb_per_s(self) -> float:
        """Logical bytes delivered per second (decimal GB), the serving figure of merit."""
        return self.logical_bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass(slots=True)
class ModelRecord:
    """One loaded model: its state dict, each key's origin, its files, and the resident
    entries (blob hashes, or dequantized copies) its tensors are views of. ``identity``:
    the bundle file's :func:`~tdedup.format.bundle.reader.file_identity` when it was
    loaded (its files are read from that file, or from one holding the same files)."""

    name: str
    path: Path
    state: dict[str, Any]
    info: dict[str, TensorInfo]
    files: list[FileEntry]
    entries: frozenset[str]
    logical_bytes: int
    identity: tuple | None = None

    def signature(self) -> frozenset:
        """What the model *is* (keys, blobs, types, shapes): two records with the same
        signature are the same model, whichever bundle they came from."""
        return frozenset((k, i.blob, i.dtype, i.shape, i.dequantized)
                         for k, i in self.info.items())

    def file_hashes(self) -> frozenset[tuple[str, str]]:
        """``(path, sha256)`` of every file: two records with the same signature and the
        same file hashes serve the same bytes for everything (configs included)."""
        return frozenset((f.path, f.sha256) for f in self.files)


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def weight_variant(path: str) -> str | None:
    """``"fp16"`` for ``unet/diffusion_pytorch_model.fp16.safetensors`` (and its shards),
    None for a file without a variant."""
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    stem = _SHARD_RE.sub("", stem)
    return stem.split(".", 1)[1] if "." in stem else None


class ModelAccess:
    """Questions about loaded models, answered from :meth:`record` (implemented by the
    holder). Original files are read from each model's own bundle, opened on demand."""

    def __init__(self) -> None:
        self._bundles: dict[Path, Bundle] = {}
        self._files_lock = threading.Lock()

    def record(self, model: str) -> ModelRecord:
        raise NotImplementedError

    def info(self, model: str) -> dict[str, TensorInfo]:
        """Key -> :class:`TensorInfo` of every tensor of ``model``."""
        return self.record(model).info

    def files(self, model: str) -> list[str]:
        """Paths of every file of ``model`` (weights and others), as in the bundle."""
        return [f.path for f in self.record(model).files]

    def component(self, model: str, folder: str = "", *, variant: str | None = None
                  ) -> dict:
        """The tensors of the weight files directly in ``folder`` of ``model`` (``""``:
        its root), keyed by their names in those files. ``variant`` picks Diffusers-style
        variant files (``*.fp16.safetensors``); without it, files without a variant."""
        rec = self.record(model)
        return {ti.name: rec.state[key] for key, ti in rec.info.items()
                if posixpath.dirname(ti.file) == folder and weight_variant(ti.file) == variant}

    def read_file(self, model: str, path: str) -> bytes:
        """An original file of ``model`` (config.json, tokenizer files): the one it was
        loaded with, checked against its sha256. Read from the bundle the model was
        loaded from; if that file has been replaced or rewritten since, the new one
        serves only if it holds the very same file, else :class:`BundleChangedError`
        (load the model again)."""
        rec = self.record(model)
        want = next((f for f in rec.files if f.path == path), None)
        if want is None:
            raise ModelNotFoundError(f"model {model!r} has no file {path!r}", path=rec.path)
        with self._files_lock:
            bundle = self._bundles.get(rec.path)
            if bundle is None or (bundle.identity != rec.identity
                                  and not _is_current(bundle)):
                if bundle is not None:
                    bundle.close()
                    del self._bundles[rec.path]
                try:
                    bundle = Bundle(rec.path, mapped=False)
                except TdedupError as e:
                    raise _changed(rec, model, path, e.problem) from None
                self._bundles[rec.path] = bundle
            try:
                found = next((f for f in bundle.model(model).files if f.path == path), None)
            except ModelNotFoundError:
                found = None
            if found is None or found.sha256 != want.sha256:
                raise _changed(rec, model, path, "it no longer holds that file")
            return b"".join(bytes(c) for c in bundle.iter_file_checked(
                found, f"{path} of model {model!r}"))

    def close(self) -> None:
        """Close the bundle files kept for :meth:`read_file`. Tensors stay valid."""
        with self._files_lock:
            for bundle in self._bundles.values():
                bundle.close()
            self._bundles.clear()


def _is_current(bundle: Bundle) -> bool:
    """Whether ``bundle`` is still the file at its path."""
    try:
        return file_identity(os.stat(bundle.path)) == bundle.identity
    except OSError:
        return False


def _changed(rec: ModelRecord, model: str, path: str, why: str) -> BundleChangedError:
    return BundleChangedError(f"cannot read {path} of model {model!r}: the bundle was "
                              f"replaced or rewritten since the model was loaded ({why})",
                              path=rec.path, models=(model,),
                              hint="load the model again (a Registry: unload it, then "
                                   "load it from the new bundle)")


class LoadedBundle(Mapping, ModelAccess):
    """Model name -> ``dict[str, torch.Tensor]`` state dict, plus :attr:`stats`.

    Tensors with the same content share one storage across models. Where they are also
    declared alike (same dtype and shape, in the same kind of file) they are the same
    tensor object; otherwise (the same F32 bytes in a safetensors and a GGUF file, or
    declared with another dtype or shape) they are distinct tensor objects viewing that
    one storage. Either way, writing into one model's tensor in place changes every
    model that shares its storage (as with tied weights); :func:`tdedup.private` gives
    a copy to change. A dequantized tensor is a float32 copy, shared by the models that
    dequantize the same blocks (not with the blocks).
    """

    def __init__(self, path: Path, device, records: dict[str, ModelRecord],
                 stats: LoadStats) -> None:
        ModelAccess.__init__(self)
        self.path = path
        self.device = device
        self.stats = stats
        self._records = records

    def record(self, model: str) -> ModelRecord:
        try:
            return self._records[model]
        except KeyError:
            raise ModelNotLoadedError(f"model {model!r} was not loaded (loaded: "
                                      f"{', '.join(self._records)})", path=self.path) from None

    def __getitem__(self, model: str) -> dict:
        return self.record(model).state

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"LoadedBundle({str(self.path)!r}, device={str(self.device)!r}, "
                f"models={list(self._records)})")

    def __enter__(self) -> "LoadedBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One resident model: ``logical_bytes`` (its tensors as if loaded alone) and
    ``unique_bytes`` (resident bytes no other model uses: what unloading it frees)."""

    logical_bytes: int
    unique_bytes: int


@dataclass(frozen=True, slots=True)
class RegistryStats:
    """``resident_bytes``: the bytes of resident tensor content, each distinct blob
    once (dequantized copies included); ``models``: name -> :class:`ModelStats`."""

    resident_bytes: int
    models: Mapping[str, ModelStats]

    @property
    def logical_bytes(self) -> int:
        return sum(m.logical_bytes for m in self.models.values())


__all__ = [
    "LoadStats",
    "LoadedBundle",
    "ModelAccess",
    "ModelRecord",
    "ModelStats",
    "RegistryStats",
    "TensorInfo",
    "weight_variant",
]

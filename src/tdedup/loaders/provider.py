"""What the model integrations read models from: a small interface a loaded bundle (or a
registry of loaded models) provides, and the few helpers built on it. (Not to be confused
with ``format.checkpoints.sources``, the checkpoint files that ``pack`` reads.)

A *model provider* is any object with

- ``provider[name]`` -> ``Mapping[str, torch.Tensor]``: the model's state dict, keys as
  :func:`tdedup.load` makes them (a file outside the model's root folder is prefixed
  with its folder: ``unet/conv_in.weight``);
- ``provider.files(name)`` -> list of the model's file paths (as in the bundle);
- ``provider.read_file(name, path)`` -> that file's bytes (config.json, tokenizer files).

Optional: ``provider.component(name, folder, variant=None)`` (the tensors of the weight
files directly in ``folder``, by their own names; without it they are taken from the
``folder/`` keys) and ``provider.path`` (named in errors). :class:`LoadedBundle` is one;
a registry serving several bundles can be another. Wherever a provider is accepted, a
bundle path is too: it is loaded with :func:`tdedup.load`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import LoadError
from .placement import resolve_device
from .torch import load

#: Weight file suffixes: files a provider serves as tensors, never extracted.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@runtime_checkable
class ModelProvider(Protocol):
    """The interface the integrations need (see the module docstring)."""

    def __getitem__(self, name: str) -> Mapping[str, Any]: ...

    def files(self, name: str) -> list[str]: ...

    def read_file(self, name: str, path: str) -> bytes: ...


def as_provider(bundle_or_loaded, names: Sequence[str], device="auto",
              **load_kw) -> ModelProvider:
    """``bundle_or_loaded`` if it is a model provider, else the bundle at that path with
    ``names`` loaded on ``device``."""
    if isinstance(bundle_or_loaded, (str, os.PathLike)):
        return load(bundle_or_loaded, device=device, models=list(names), **load_kw)
    if not isinstance(bundle_or_loaded, ModelProvider):
        raise LoadError(f"not a bundle path nor a loaded bundle: {type(bundle_or_loaded).__name__}"
                        " (a provider needs [name], files(name) and read_file(name, path))")
    return bundle_or_loaded


def target_device(device) -> Any:
    """Where the integrations put a loaded source's tensors: None for ``"auto"`` (where
    they are), else the device, checked as :func:`tdedup.load` checks it (a device that
    is not there, or is no device, is one :class:`~tdedup.errors.TdedupError`)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return None
    return resolve_device(device)


def provider_path(source) -> str | None:
    """What errors about ``provider`` name: its bundle path when it has one."""
    path = getattr(source, "path", None)
    return None if path is None else str(path)


def component_state(source, name: str, folder: str = "", variant: str | None = None
                    ) -> dict:
    """The tensors of ``name``'s weight files directly in ``folder`` by their own names."""
    if hasattr(source, "component"):
        return dict(source.component(name, folder, variant=variant))
    state = source[name]
    if not folder:
        return {k: v for k, v in state.items() if "/" not in k.split(":", 1)[0]}
    prefix = folder + "/"
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}


def has_file(source, name: str, path: str) -> bool:
    return path in source.files(name)


def extract_files(source, name: str, dest: Path, folder: str = "") -> Path:
    """Write ``name``'s non-weight files below ``folder`` (configs, tokenizer files)
    into ``dest``, keeping their relative paths; returns ``dest / folder``. Paths that
    would leave ``dest`` are refused."""
    prefix = f"{folder}/" if folder else ""
    root = dest.resolve()
    for path in source.files(name):
        if not path.startswith(prefix) or path.endswith(WEIGHT_SUFFIXES):
            continue
        target = (dest / path).resolve()
        if root not in target.parents:
            raise LoadError(f"model {name!r}: file path {path!r} leaves its folder",
                            path=provider_path(source))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_file(name, path))
    return dest / folder if folder else dest


def join(folder: str, path: str) -> str:
    return posixpath.join(folder, path) if folder else path


__all__ = ["ModelProvider", "as_provider", "component_state", "extract_files", "has_file",
           "provider_path", "target_device", "WEIGHT_SUFFIXES"]

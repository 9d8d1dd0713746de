"""tdedup: factor families of model checkpoints.

Find what a set of checkpoints shares (``tdedup analyze``), store it once in a bundle
(:func:`pack`; :func:`convert` re-lays one), restore every original file (:func:`unpack`),
check it (:func:`verify`), read one model lazily (:func:`open_bundle`) and load every
model onto a torch device with shared tensors stored once (:func:`load`, needs the
``torch`` extra), and rebuild models sharing them (:func:`from_bundle` for transformers,
:func:`sentence_transformer`, :func:`pipelines` for Diffusers; :func:`private` for a copy
to train).
"""

from __future__ import annotations

from ._version import __version__
from .errors import TdedupError  # noqa: E402
from .format.bundle.reader import Bundle, open_bundle  # noqa: E402
from .ops.convert import ConvertResult, convert  # noqa: E402
from .ops.pack import PackResult, pack  # noqa: E402
from .ops.unpack import UnpackResult, unpack  # noqa: E402
from .ops.verify import VerifyResult, verify  # noqa: E402


#: Model integrations (optional extras), imported on first use.
_INTEGRATIONS = {"from_bundle": "transformers", "sentence_transformer": "sentence_transformers",
                 "pipelines": "diffusers"}


def __getattr__(name: str):
    # torch is an optional extra: import the loader only when it is asked for.
    if name in ("load", "LoadedBundle"):
        from .loaders import torch as torch_loader
        return getattr(torch_loader, name)
    if name in ("load_into", "private"):
        from .loaders import modules
        return getattr(modules, name)
    if name in _INTEGRATIONS:
        import importlib
        return getattr(importlib.import_module(f".loaders.{_INTEGRATIONS[name]}", __name__),
                       name)
    raise AttributeError(f"module 'tdedup' has no attribute {name!r}")


__all__ = ["__version__", "TdedupError", "Bundle", "open_bundle", "pack", "PackResult",
           "convert", "ConvertResult", "unpack", "UnpackResult", "verify", "VerifyResult",
           "load", "load_into", "LoadedBundle", "private", "from_bundle", "sentence_transformer",
           "pipelines"]

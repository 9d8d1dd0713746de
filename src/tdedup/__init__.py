"""tdedup: factor families of model checkpoints.

Find what a set of checkpoints shares (``tdedup analyze``), store it once in a bundle
(:func:`pack`; :func:`convert` re-lays one), restore every original file (:func:`unpack`),
check it (:func:`verify`), add or drop models without re-encoding the rest (:func:`add`,
:func:`remove`), read one model lazily (:func:`open_bundle`) and load every model onto a
torch device with shared tensors stored once (:func:`load`, needs the ``torch`` extra),
and rebuild models sharing them (:func:`from_bundle` for transformers,
:func:`sentence_transformer`, :func:`pipelines` for Diffusers; :func:`private` for a copy
to train).
"""

from __future__ import annotations

from ._version import __version__
from .errors import TdedupError

# Every other public name is imported when first asked for: ``tdedup --help`` imports this
# package, and the bundle reader, pack and the planner pull in numpy and zstandard (~70 ms);
# torch and the model integrations are optional extras.
_LAZY = {
    "Bundle": ".format.bundle.reader", "open_bundle": ".format.bundle.reader",
    "PackResult": ".ops.pack", "pack": ".ops.pack",
    "UnpackResult": ".ops.unpack", "unpack": ".ops.unpack",
    "VerifyResult": ".ops.verify", "verify": ".ops.verify",
    "ConvertResult": ".ops.convert", "convert": ".ops.convert",
    "EditResult": ".ops.add", "add": ".ops.add", "remove": ".ops.add", "merge": ".ops.add",
    "load": ".loaders.torch", "LoadedBundle": ".loaders.torch",
    "Registry": ".loaders.registry",
    "load_into": ".loaders.modules", "private": ".loaders.modules",
    "from_bundle": ".loaders.transformers",
    "sentence_transformer": ".loaders.sentence_transformers",
    "pipelines": ".loaders.diffusers",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tdedup' has no attribute {name!r}")
    import importlib
    # Not cached in globals: each access reads the defining module, so a test that
    # patches ``tdedup.ops.pack.pack`` is seen through ``tdedup.pack`` as well.
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "TdedupError", "Bundle", "open_bundle", "pack", "PackResult",
           "convert", "ConvertResult", "add", "remove", "merge", "EditResult",
           "unpack", "UnpackResult", "verify", "VerifyResult",
           "load", "load_into", "LoadedBundle", "Registry", "private", "from_bundle",
           "sentence_transformer", "pipelines"]

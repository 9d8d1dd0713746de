"""tdedup: factor families of model checkpoints.

Find what a set of checkpoints shares (``tdedup analyze``), store it once in a bundle
(:func:`pack`), restore every original file (:func:`unpack`), check it (:func:`verify`),
read one model lazily (:func:`open_bundle`) and load every model onto a torch device with
shared tensors stored once (:func:`load`, needs the ``torch`` extra).
"""

from __future__ import annotations

from ._version import __version__
from .errors import TdedupError  # noqa: E402
from .format.bundle.reader import Bundle, open_bundle  # noqa: E402
from .ops.pack import PackResult, pack  # noqa: E402
from .ops.unpack import UnpackResult, unpack  # noqa: E402
from .ops.verify import VerifyResult, verify  # noqa: E402


def __getattr__(name: str):
    # torch is an optional extra: import the loader only when it is asked for.
    if name in ("load", "LoadedBundle"):
        from .loaders import torch as torch_loader
        return getattr(torch_loader, name)
    if name == "load_into":
        from .loaders import modules
        return modules.load_into
    raise AttributeError(f"module 'tdedup' has no attribute {name!r}")


__all__ = ["__version__", "TdedupError", "Bundle", "open_bundle", "pack", "PackResult",
           "unpack", "UnpackResult", "verify", "VerifyResult", "load", "load_into",
           "LoadedBundle"]

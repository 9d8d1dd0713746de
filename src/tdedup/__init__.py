"""tdedup: factor families of model checkpoints.

Find what a set of checkpoints shares (:func:`analyze`), store it once in a bundle
(:func:`pack`), restore every original file (:func:`unpack`) and load every model onto a
torch device with shared tensors stored once (:func:`load`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TdedupError  # noqa: E402

__all__ = ["__version__", "TdedupError"]

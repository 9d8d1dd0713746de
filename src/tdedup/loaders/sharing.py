"""What sharing saves, model by model: the memory each model takes loaded on its own
against what it adds to the models loaded before it, when identical tensors are one.

Works on any model provider (:mod:`tdedup.loaders.provider`: ``provider[name]`` is a state
dict); tensors are the same memory when they view the same bytes (device, address,
length), which is what :func:`tdedup.load` makes of identical tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSharing:
    """One model's row: ``alone_bytes`` (its tensors, each counted: without sharing),
    ``added_bytes`` (the bytes of its tensors no earlier model holds: with sharing),
    ``saved_bytes`` (the difference)."""

    model: str
    tensors: int
    alone_bytes: int
    added_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.alone_bytes - self.added_bytes


def _where(t) -> tuple:
    return (str(t.device), t.data_ptr(), t.nbytes)


def model_sharing(source: Mapping, names: Iterable[str] | None = None) -> list[ModelSharing]:
    """A :class:`ModelSharing` per model of ``names`` (default: every model of the
    source), in that order: the first model adds all of its bytes, each later one only
    the tensors that no earlier one holds."""
    held: set = set()
    rows = []
    for name in (list(source) if names is None else names):
        state = source[name]
        alone = added = 0
        for t in state.values():
            alone += t.nbytes
            where = _where(t)
            if where not in held:
                held.add(where)
                added += t.nbytes
        rows.append(ModelSharing(name, len(state), alone, added))
    return rows


__all__ = ["ModelSharing", "model_sharing"]

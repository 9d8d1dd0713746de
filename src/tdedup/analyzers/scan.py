"""Index and hash a set of models: the first pass that analyze and pack share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..format.model_source import ModelArg, open_models
from ..format.records import ModelSource
from .hashing import HashedTensor, hash_model


@dataclass(slots=True)
class ScannedModels:
    """Models with every tensor hashed, in the order they were given."""

    models: list[ModelSource]
    hashed: dict[str, list[HashedTensor]]

    @property
    def tensor_bytes(self) -> int:
        return sum(m.tensor_bytes for m in self.models)


def index_models(paths: Sequence[str | ModelArg]) -> list[ModelSource]:
    """Read every model's headers (cheap); no tensor data is touched."""
    return open_models(list(paths))


def hash_models(models: list[ModelSource],
                progress: Callable[[int], None] | None = None) -> ScannedModels:
    """Hash every tensor of every model (the expensive, streaming pass)."""
    return ScannedModels(models, {m.name: hash_model(m, progress) for m in models})

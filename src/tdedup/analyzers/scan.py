"""Index and hash a set of models: the first pass that analyze and pack share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..format.checkpoints.records import ModelSource, SourceFile
from ..format.checkpoints.sources import ModelArg, open_models
from .tensor_hashes import ContentKey, HashedTensor, hash_model


@dataclass(slots=True)
class ScannedModels:
    """Models with every tensor hashed, in the order they were given."""

    models: list[ModelSource]
    hashed: dict[str, list[HashedTensor]]

    @property
    def tensor_bytes(self) -> int:
        return sum(m.tensor_bytes for m in self.models)

    def source_file(self, model: str, rel_path: str) -> SourceFile:
        """The file a tensor record (``record.model``, ``record.file``) came from."""
        for m in self.models:
            if m.name == model:
                for f in m.files:
                    if f.rel_path == rel_path:
                        return f
        raise KeyError((model, rel_path))

    def first_occurrences(self) -> dict[ContentKey, HashedTensor]:
        """Each distinct content key with its first occurrence, in model/file order."""
        out: dict[ContentKey, HashedTensor] = {}
        for m in self.models:
            for h in self.hashed[m.name]:
                out.setdefault(h.key, h)
        return out

    def locate(self, h: HashedTensor) -> tuple[Path, int, int]:
        """(absolute path, offset, length) of a hashed tensor's bytes."""
        f = self.source_file(h.record.model, h.record.file)
        return f.abs_path, h.record.offset, h.record.length


def index_models(paths: Sequence[str | ModelArg]) -> list[ModelSource]:
    """Read every model's headers (cheap); no tensor data is touched."""
    return open_models(list(paths))


def hash_models(models: list[ModelSource],
                progress: Callable[[int], None] | None = None) -> ScannedModels:
    """Hash every tensor of every model (the expensive, streaming pass)."""
    return ScannedModels(models, {m.name: hash_model(m, progress) for m in models})

"""What a set of models shares: per-model shared/unique bytes, pair matrix, shared groups.

Definitions (also in the JSON schema of ``tdedup analyze --json``):

- a model's ``tensor_bytes`` counts every tensor occurrence of the model;
- its ``shared_bytes`` counts the occurrences whose content key also occurs in at least one
  *other* model; ``unique_bytes = tensor_bytes - shared_bytes``;
- ``pairs[a, b].shared_bytes`` sums the byte lengths of the *distinct* content keys that
  occur in both ``a`` and ``b``; it is symmetric;
- ``distinct_tensor_bytes`` sums the lengths of distinct content keys over all models;
  ``dedup_ratio = total_tensor_bytes / distinct_tensor_bytes`` and
  ``saved_bytes = total_tensor_bytes - distinct_tensor_bytes``;
- a *group* is one content key that occurs more than once (in one or several models).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from ..format.records import ModelSource
from .hashing import ContentKey, HashedTensor


@dataclass(slots=True)
class ModelSummary:
    name: str
    path: str
    layout: str
    files: int
    tensors: int
    tensor_bytes: int
    shared_bytes: int
    unique_bytes: int


@dataclass(slots=True)
class PairOverlap:
    a: str
    b: str
    shared_bytes: int
    shared_tensors: int


@dataclass(slots=True)
class Occurrence:
    model: str
    file: str
    name: str
    dtype: str
    shape: list[int]


@dataclass(slots=True)
class SharedGroup:
    """One content key stored more than once."""

    hash: str
    bytes: int
    count: int
    saved_bytes: int
    models: list[str]
    occurrences: list[Occurrence] = field(default_factory=list)

    @property
    def views_differ(self) -> bool:
        """True when byte-identical occurrences disagree on dtype or shape."""
        return len({(o.dtype, tuple(o.shape)) for o in self.occurrences}) > 1


@dataclass(slots=True)
class OverlapReport:
    models: list[ModelSummary]
    pairs: list[PairOverlap]
    groups: list[SharedGroup]
    total_tensor_bytes: int
    distinct_tensor_bytes: int
    total_tensors: int
    distinct_tensors: int

    @property
    def dedup_ratio(self) -> float:
        if self.distinct_tensor_bytes == 0:
            return 1.0
        return self.total_tensor_bytes / self.distinct_tensor_bytes

    @property
    def saved_bytes(self) -> int:
        return self.total_tensor_bytes - self.distinct_tensor_bytes

    @property
    def view_mismatches(self) -> list[SharedGroup]:
        """Byte-identical tensors stored under different dtypes or shapes."""
        return [g for g in self.groups if g.views_differ]

    def pair(self, a: str, b: str) -> PairOverlap | None:
        for p in self.pairs:
            if {p.a, p.b} == {a, b}:
                return p
        return None

    def to_dict(self) -> dict:
        return {
            "models": [asdict(m) for m in self.models],
            "total_tensor_bytes": self.total_tensor_bytes,
            "distinct_tensor_bytes": self.distinct_tensor_bytes,
            "total_tensors": self.total_tensors,
            "distinct_tensors": self.distinct_tensors,
            "dedup_ratio": round(self.dedup_ratio, 6),
            "saved_bytes": self.saved_bytes,
            "pairs": [asdict(p) for p in self.pairs],
            "groups": [{**asdict(g), "views_differ": g.views_differ} for g in self.groups],
            "view_mismatches": [g.hash for g in self.view_mismatches],
        }


def compute_overlap(models: list[ModelSource],
                    hashed: dict[str, list[HashedTensor]]) -> OverlapReport:
    """Build the overlap report from each model's hashed tensors (keyed by model name)."""
    where: dict[ContentKey, list[HashedTensor]] = defaultdict(list)
    for m in models:
        for h in hashed[m.name]:
            where[h.key].append(h)
    models_of = {k: {h.record.model for h in hs} for k, hs in where.items()}

    summaries = []
    for m in models:
        hs = hashed[m.name]
        total = sum(h.record.length for h in hs)
        shared = sum(h.record.length for h in hs if len(models_of[h.key]) > 1)
        summaries.append(ModelSummary(m.name, str(m.path), m.layout, len(m.files), len(hs),
                                      total, shared, total - shared))

    names = [m.name for m in models]
    pair_bytes: dict[tuple[str, str], list[int]] = {
        (a, b): [0, 0] for i, a in enumerate(names) for b in names[i + 1:]}
    order = {n: i for i, n in enumerate(names)}
    for key, ms in models_of.items():
        if len(ms) < 2:
            continue
        sorted_ms = sorted(ms, key=order.__getitem__)
        for i, a in enumerate(sorted_ms):
            for b in sorted_ms[i + 1:]:
                acc = pair_bytes[(a, b)]
                acc[0] += key[1]
                acc[1] += 1
    pairs = [PairOverlap(a, b, v[0], v[1]) for (a, b), v in pair_bytes.items()]

    groups = []
    for key, hs in where.items():
        if len(hs) < 2:
            continue
        occ = [Occurrence(h.record.model, h.record.file, h.record.name, h.record.dtype,
                          list(h.record.shape)) for h in hs]
        groups.append(SharedGroup(key[0], key[1], len(hs), key[1] * (len(hs) - 1),
                                  sorted(models_of[key], key=order.__getitem__), occ))
    groups.sort(key=lambda g: (-g.saved_bytes, g.hash))

    total = sum(s.tensor_bytes for s in summaries)
    distinct = sum(k[1] for k in where)
    return OverlapReport(summaries, pairs, groups, total, distinct,
                         sum(s.tensors for s in summaries), len(where))

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

from .._version import __version__
from ..format.checkpoints.records import ModelSource
from .tensor_hashes import ContentKey, HashedTensor

# Bumped when a field of ``OverlapReport.to_dict`` changes meaning or disappears; adding a
# field keeps the version (docs/analyze-json.md).
SCHEMA_VERSION = 1


@dataclass(slots=True)
class ModelSummary:
    """One model's totals: every tensor occurrence counts, split into shared and unique."""

    name: str
    path: str
    layout: str
    files: int
    weight_files: int
    tensors: int
    tensor_bytes: int
    shared_tensors: int
    shared_bytes: int
    unique_bytes: int


@dataclass(slots=True)
class PairOverlap:
    """Distinct contents that two models both hold (``a`` before ``b`` in model order)."""

    a: str
    b: str
    shared_bytes: int
    shared_tensors: int


@dataclass(slots=True)
class Occurrence:
    """Where one copy of a shared content sits: model, file, tensor name and its view."""

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
    def views(self) -> list[tuple[str, tuple[int, ...]]]:
        """The distinct (dtype, shape) views of these bytes, in order of appearance."""
        return list(dict.fromkeys((o.dtype, tuple(o.shape)) for o in self.occurrences))

    @property
    def views_differ(self) -> bool:
        """True when byte-identical occurrences disagree on dtype or shape.

        Empty tensors are left out: zero bytes match every view, which tells nothing.
        """
        return self.bytes > 0 and len(self.views) > 1


@dataclass(slots=True)
class OverlapReport:
    """Everything ``tdedup analyze`` reports; ``to_dict`` is its JSON form."""

    models: list[ModelSummary]
    pairs: list[PairOverlap]
    groups: list[SharedGroup]
    total_tensor_bytes: int
    distinct_tensor_bytes: int
    total_tensors: int
    distinct_tensors: int
    _pair_index: dict[tuple[str, str], PairOverlap] = field(default_factory=dict, repr=False)

    @property
    def dedup_ratio(self) -> float:
        """Logical over distinct tensor bytes; 1.0 when there are no tensor bytes."""
        if self.distinct_tensor_bytes == 0:
            return 1.0
        return self.total_tensor_bytes / self.distinct_tensor_bytes

    @property
    def saved_bytes(self) -> int:
        """What a store holding each distinct content once saves over storing all."""
        return self.total_tensor_bytes - self.distinct_tensor_bytes

    @property
    def view_mismatches(self) -> list[SharedGroup]:
        """Byte-identical tensors stored under different dtypes or shapes."""
        return [g for g in self.groups if g.views_differ]

    def pair(self, a: str, b: str) -> PairOverlap | None:
        """The overlap of two models, in either order (None for a model with itself)."""
        if not self._pair_index:
            for p in self.pairs:
                self._pair_index[(p.a, p.b)] = self._pair_index[(p.b, p.a)] = p
        return self._pair_index.get((a, b))

    def shared_matrix(self) -> list[list[int]]:
        """Shared bytes of every ordered pair, in model order; the diagonal holds 0."""
        names = [m.name for m in self.models]
        def shared(a: str, b: str) -> int:
            p = self.pair(a, b)
            return 0 if p is None else p.shared_bytes

        return [[shared(a, b) for b in names] for a in names]

    def to_dict(self) -> dict:
        """The documented JSON form (docs/analyze-json.md)."""

        size = {m.name: m.tensor_bytes for m in self.models}
        return {
            "schema_version": SCHEMA_VERSION,
            "tdedup_version": __version__,
            "models": [asdict(m) for m in self.models],
            "total_tensor_bytes": self.total_tensor_bytes,
            "distinct_tensor_bytes": self.distinct_tensor_bytes,
            "saved_bytes": self.saved_bytes,
            "dedup_ratio": round(self.dedup_ratio, 6),
            "total_tensors": self.total_tensors,
            "distinct_tensors": self.distinct_tensors,
            "pairs": [{**asdict(p),
                       "a_fraction": _fraction(p.shared_bytes, size[p.a]),
                       "b_fraction": _fraction(p.shared_bytes, size[p.b])}
                      for p in self.pairs],
            # Spelled out: dataclasses.asdict deep-copies recursively, and groups are
            # thousands of occurrences on a real family (a third of the JSON time).
            "groups": [{"hash": g.hash, "bytes": g.bytes, "count": g.count,
                        "saved_bytes": g.saved_bytes, "models": list(g.models),
                        "occurrences": [{"model": o.model, "file": o.file, "name": o.name,
                                         "dtype": o.dtype, "shape": list(o.shape)}
                                        for o in g.occurrences],
                        "views_differ": g.views_differ} for g in self.groups],
            "view_mismatches": [
                {"hash": g.hash, "bytes": g.bytes,
                 "views": [{"dtype": d, "shape": list(s),
                            "models": sorted({o.model for o in g.occurrences
                                              if (o.dtype, tuple(o.shape)) == (d, s)})}
                           for d, s in g.views]}
                for g in self.view_mismatches],
        }


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


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
        shared = [h for h in hs if len(models_of[h.key]) > 1]
        shared_bytes = sum(h.record.length for h in shared)
        summaries.append(ModelSummary(m.name, str(m.path), m.layout.value, len(m.files),
                                      len(m.weight_files), len(hs), total, len(shared),
                                      shared_bytes, total - shared_bytes))
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

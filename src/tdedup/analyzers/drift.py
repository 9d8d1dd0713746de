"""Drift between models: how tensors that are *not* byte-identical differ, and what
base-plus-delta storage would make of it (the drift section of ``tdedup analyze``).

A *slot* is a tensor name in a model. Each model's slot is compared with the same slot of
the first earlier model that has it with the same dtype and byte length (its
*reference*). For slots whose bytes differ the report gives the fraction of bytes and of
elements that changed, which byte planes changed (plane 3 of an F32 holds the sign and
exponent), the relative L2 difference ``||t - r|| / ||r||`` for float dtypes, and the
same grouped by layer (``encoder.layer.3``, ``blk.3``, ``embeddings``...). Tensors above
``SAMPLE_ABOVE`` elements are measured on a sample of evenly spaced runs.

The size estimate comes from the delta planner (:func:`plan_deltas`): every distinct
content at its estimated own byte-plane size, or at its planned delta's.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from ..format.checkpoints.dtypes import NUMPY_FLOATS
from ..format.codecs.delta import SUB_WIDTHS
from ..format.codecs.delta_encode import sample_index
from .delta_planning import DeltaPlan, plan_deltas, plane_width
from .scan import ScannedModels
from .tensor_bytes import TensorBytes
from .tensor_hashes import HashedTensor

#: Tensors with more elements than this are measured on a sample.
SAMPLE_ABOVE = 1 << 16
#: The sample: this many runs of this many consecutive elements.
SAMPLE_RUNS, SAMPLE_RUN = 64, 256

_LAYER = re.compile(r"^((?:.*?[._])?(?:layers?|h|blocks?|blk)\.\d+)\.")


@dataclass(slots=True)
class SlotDrift:
    """One tensor slot of ``model`` whose bytes differ from ``reference``'s."""

    model: str
    reference: str
    name: str
    layer: str
    dtype: str
    bytes: int
    sampled: bool
    bytes_changed: float  # fraction of bytes that differ
    elements_changed: float  # fraction of elements with any differing byte
    planes_changed: list[float]  # per byte plane: fraction of elements whose byte differs
    rel_l2: float | None  # ||t - r|| / ||r|| over finite elements (None: not a float)
    max_abs_diff: float | None
    # sums behind rel_l2, for grouping (not reported)
    _d2: float = field(default=0.0, repr=False)
    _r2: float = field(default=0.0, repr=False)


@dataclass(slots=True)
class LayerDrift:
    """Differing slots of one model grouped by layer; fractions weighted by bytes."""

    model: str
    reference: str
    layer: str
    tensors: int
    bytes: int
    bytes_changed: float
    elements_changed: float
    planes_changed: list[float]  # over the group's tensors of the widest plane width
    rel_l2: float | None


@dataclass(slots=True)
class ModelDrift:
    """How a model's slots compare with earlier models'."""

    model: str
    slots: int
    identical: int  # same bytes as the reference slot
    differing: int
    new: int  # no earlier model has the slot (with that dtype and length)
    differing_bytes: int


@dataclass(slots=True)
class DriftReport:
    models: list[ModelDrift]
    layers: list[LayerDrift]
    slots: list[SlotDrift]
    estimate: dict

    def to_dict(self) -> dict:
        def clean(d: dict) -> dict:
            return {k: _round(v) for k, v in d.items() if not k.startswith("_")}
        return {
            "models": [asdict(m) for m in self.models],
            "layers": [clean(asdict(g)) for g in self.layers],
            "slots": [clean({f: getattr(s, f) for f in s.__slots__}) for s in self.slots],
            "estimate": dict(self.estimate),
        }


def _round(v):
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def layer_of(name: str) -> str:
    """``encoder.layer.3`` / ``blk.3`` for a layer's tensors, else the first component."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.split(".", 1)[0]


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    t = NUMPY_FLOATS.get(dtype)
    return None if t is None else raw.view(t).astype(np.float64)


def slot_drift(model: str, reference: str, t: HashedTensor, r: HashedTensor,
               read: TensorBytes) -> SlotDrift:
    """Drift metrics of tensor ``t`` against ``r`` (same dtype and length)."""
    rec = t.record
    w = plane_width(t)
    total = rec.length // w
    sampled = total > SAMPLE_ABOVE
    if sampled:
        idx = sample_index(total, SAMPLE_RUNS, SAMPLE_RUN)
        ta, ra = read.rows(t, w, idx), read.rows(r, w, idx)
    else:
        ta, ra = read(t).reshape(-1, w), read(r).reshape(-1, w)
    n = len(ta)
    if w in SUB_WIDTHS:  # whole elements at once, planes by shifting their XOR
        x = np.bitwise_xor(np.ascontiguousarray(ta).view(SUB_WIDTHS[w]),
                           np.ascontiguousarray(ra).view(SUB_WIDTHS[w])).reshape(-1)
        planes = [np.count_nonzero((x >> x.dtype.type(8 * j)) & x.dtype.type(0xFF)) / max(1, n)
                  for j in range(w)]
        elements = np.count_nonzero(x) / max(1, n)
    else:
        diff = ta != ra
        planes = (diff.sum(axis=0) / max(1, n)).tolist()
        elements = float(diff.any(axis=1).mean()) if n else 0.0
    tf, rf = _floats(ta.reshape(-1), rec.dtype), _floats(ra.reshape(-1), rec.dtype)
    rel = mad = None
    d2 = r2 = 0.0
    if tf is not None:
        ok = np.isfinite(tf) & np.isfinite(rf)
        d = tf[ok] - rf[ok]
        d2, r2 = float(np.dot(d, d)), float(np.dot(rf[ok], rf[ok]))
        rel = _rel(d2, r2)
        if n:  # the layer's sums are of whole tensors: scale a sample's up to its tensor
            d2, r2 = d2 * total / n, r2 * total / n
        mad = float(np.abs(d).max()) if d.size else 0.0
    return SlotDrift(model, reference, rec.name, layer_of(rec.name), rec.dtype, rec.length,
                     sampled, float(sum(planes) / w), float(elements), [float(p) for p in planes],
                     rel, mad, d2, r2)


def _rel(d2: float, r2: float) -> float:
    """``||t - r|| / ||r||`` from the sums of squares; infinite when only ``r`` is zero."""
    return math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)


def _group(slots: list[SlotDrift]) -> list[LayerDrift]:
    groups: dict[tuple, list[SlotDrift]] = defaultdict(list)
    for s in slots:
        groups[(s.model, s.reference, s.layer)].append(s)
    out = []
    for (model, ref, layer), ss in groups.items():
        total = sum(s.bytes for s in ss) or 1
        width = max(len(s.planes_changed) for s in ss)
        wide = [s for s in ss if len(s.planes_changed) == width]
        wide_total = sum(s.bytes for s in wide) or 1
        planes = [sum(s.planes_changed[j] * s.bytes for s in wide) / wide_total
                  for j in range(width)]
        floats = [s for s in ss if s.rel_l2 is not None]
        rel = _rel(sum(s._d2 for s in floats), sum(s._r2 for s in floats)) if floats else None
        out.append(LayerDrift(
            model, ref, layer, len(ss), sum(s.bytes for s in ss),
            sum(s.bytes_changed * s.bytes for s in ss) / total,
            sum(s.elements_changed * s.bytes for s in ss) / total, planes, rel))
    return out


def compute_drift(scanned: ScannedModels, *, plan: DeltaPlan | None = None,
                  estimate: bool = True) -> DriftReport:
    """The drift report of ``scanned`` (see the module docstring).

    ``plan`` reuses a plan already made; ``estimate=False`` skips the size estimate.
    """
    if plan is None and estimate:
        plan = plan_deltas(scanned)
    holders: dict[tuple, tuple[str, HashedTensor]] = {}
    slots: list[SlotDrift] = []
    models: list[ModelDrift] = []
    with TensorBytes(scanned) as read:
        for m in scanned.models:
            md = ModelDrift(m.name, 0, 0, 0, 0, 0)
            for h in scanned.hashed[m.name]:
                rec = h.record
                slot = (rec.name, rec.dtype, rec.length)
                md.slots += 1
                ref = holders.get(slot)
                if ref is None:
                    holders[slot] = (m.name, h)
                    md.new += 1
                elif ref[1].key == h.key:
                    md.identical += 1
                else:
                    md.differing += 1
                    md.differing_bytes += rec.length
                    slots.append(slot_drift(m.name, ref[0], h, ref[1], read))
            models.append(md)
    est = {}
    if plan is not None:
        by_enc: dict[str, int] = defaultdict(int)
        for c in plan.choices.values():
            by_enc[c.encoding.name.lower()] += 1
        distinct = sum(k[1] for k in plan.self_estimates)
        est = {
            "distinct_tensor_bytes": distinct,
            "without_deltas_bytes": plan.self_estimated_bytes,
            "with_deltas_bytes": plan.estimated_bytes,
            "delta_blobs": len(plan.choices),
            "delta_encodings": dict(by_enc),
            "ratio_vs_without_deltas": round(plan.self_estimated_bytes
                                             / max(1, plan.estimated_bytes), 4),
        }
    return DriftReport(models, _group(slots), slots, est)

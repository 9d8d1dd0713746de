"""``pack --dry-run``: what a pack would store, as the planners estimate it.

Hashing and planning are the cheap half of a pack (no encoding, nothing written). The
estimate makes pack's own choices from the same plans: the delta planner's, the derivation
planner's (``--derive auto``: casts and quantizations of another model's tensor, as
transform + residual) and the layout's (serving keeps self-contained blobs raw). The
planners' per-blob estimates land within a few percent of the encoded sizes, and the
figures are always reported as an estimate.

A merge (bundles among the inputs) is estimated as ``ops.add.merge`` writes it: the first
bundle's tensor blobs as they are stored (as ``convert`` re-lays them for another layout),
the other contents as ``add`` stores them (deltas and derived blobs, as pack would).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from ..analyzers.delta_planning import plan_deltas
from ..analyzers.scan import hash_models, index_models
from ..errors import UsageError
from ..format.bundle.constants import BlobEncoding, BundleLayout
from ..format.bundle.manifest import BlobRecord
from ..format.bundle.reader import Bundle
from ..format.checkpoints.sources import ModelArg
from . import ProgressFn, pack_derived
from .convert import layout_of
from .pack import parse_layout


def _kept_blobs(path: str | os.PathLike) -> tuple[str, dict[str, BlobRecord]]:
    """The layout of the bundle a merge keeps, and its tensor blobs."""
    with Bundle(path, mapped=False) as b:
        tensors = {t.hash for m in b.manifest.models for f in m.files for t in f.tensors}
        return layout_of(b.manifest), {h: b.manifest.blobs[h] for h in tensors}


def _relaid(rec: BlobRecord, self_estimate: int, target: BundleLayout, own: str) -> int:
    """A kept blob's stored size once ``convert`` has re-laid it in ``target``."""
    if target.value == own or rec.base is not None:
        return rec.stored_length  # copied byte for byte
    if target is BundleLayout.SERVING:
        return rec.decoded_length
    return self_estimate if rec.encoding is BlobEncoding.RAW else rec.stored_length


def estimate(paths: Sequence[str | ModelArg], *, delta: str = "auto", derive: str = "auto",
             layout: str | BundleLayout | None = None, keep: str | os.PathLike | None = None,
             progress: ProgressFn | None = None) -> dict:
    """The planners' estimate of a pack of ``paths``: blob counts and stored tensor bytes
    (``estimated_bytes``; layouts and the manifest, a few kB, are not counted).

    ``layout`` defaults to compact, or for a merge to the kept bundle's own. ``keep``: the
    bundle a merge keeps as it is (its models must be among ``paths``, restored)."""
    if delta not in ("auto", "off"):
        raise UsageError(f"--delta must be 'auto' or 'off', not {delta!r}")
    if derive not in ("auto", "off"):
        raise UsageError(f"--derive must be 'auto' or 'off', not {derive!r}")
    own, kept = _kept_blobs(keep) if keep is not None else ("", {})
    target = parse_layout(layout if layout is not None else own or BundleLayout.COMPACT)
    serving = target is BundleLayout.SERVING
    report = progress or (lambda phase, n, total: None)
    models = index_models(paths)
    total = sum(m.tensor_bytes for m in models)
    scanned = hash_models(models, lambda n: report("hashing", n, total))
    plan = plan_deltas(scanned)
    choices = plan.choices if delta == "auto" else {}
    # As pack (and add, for a merge): derived choices first; the delta choices they
    # exclude are dropped.
    derived = pack_derived.plan(scanned, derive)
    excluded = pack_derived.delta_exclusions(derived)
    kinds: Counter[str] = Counter()  # self, delta, derived, copied
    delta_encodings: Counter[str] = Counter()
    transforms: Counter[str] = Counter()
    stored = self_contained = 0
    for key, self_est in plan.self_estimates.items():
        n = key[1]
        self_contained += n if serving else self_est
        if key[0] in kept:
            stored += _relaid(kept[key[0]], self_est, target, own)
            kinds["copied"] += 1
            continue
        c = choices.get(key)
        if c is not None and (key in excluded or c.base in excluded.targets):
            c = None
        use_delta = c is not None and c.estimated_bytes <= self_est
        best = c.estimated_bytes if c is not None and use_delta else self_est
        d = derived.get(key)
        if d is not None and (d.estimated_bytes <= pack_derived.DERIVED_CLEAR_WIN * n
                              or d.estimated_bytes < best):
            stored += d.estimated_bytes
            kinds["derived"] += 1
            transforms[d.describe()] += 1
        elif c is not None and use_delta:
            stored += c.estimated_bytes
            kinds["delta"] += 1
            delta_encodings[c.encoding.name] += 1
        else:
            stored += n if serving else self_est
            kinds["self"] += 1
    firsts = scanned.first_occurrences()
    return {"estimate": True, "models": len(models), "model_names": [m.name for m in models],
            "layout": target.value, "delta": delta,
            "derive": derive, "merge": keep is not None,
            "tensor_bytes": total, "distinct_tensors": len(firsts),
            "distinct_tensor_bytes": sum(k[1] for k in firsts),
            "self_blobs": kinds["self"], "delta_blobs": kinds["delta"],
            "derived_blobs": kinds["derived"], "copied_blobs": kinds["copied"],
            "delta_encodings": dict(delta_encodings), "derived_transforms": dict(transforms),
            "estimated_bytes": stored,
            # Every distinct content stored self-contained (no delta, no derived blob).
            "estimated_without_deltas_bytes": self_contained}

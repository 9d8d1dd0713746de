"""``pack --dry-run``: what a pack would store, as the delta planner estimates it.

Hashing and planning are the cheap half of a pack (no encoding, nothing written); the
planner's per-blob estimates land within a few percent of the encoded sizes, and the
figures are always reported as an estimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..analyzers.delta_planning import plan_deltas
from ..analyzers.scan import hash_models, index_models
from ..errors import UsageError
from ..format.checkpoints.sources import ModelArg
from . import ProgressFn


def estimate(paths: Sequence[str | ModelArg], *, delta: str = "auto",
             progress: ProgressFn | None = None) -> dict:
    """The planner's estimate of a pack of ``paths``: blob counts and stored tensor bytes
    (``estimated_bytes``; layouts and the manifest, a few kB, are not counted)."""
    if delta not in ("auto", "off"):
        raise UsageError(f"--delta must be 'auto' or 'off', not {delta!r}")
    report = progress or (lambda phase, n, total: None)
    models = index_models(paths)
    total = sum(m.tensor_bytes for m in models)
    scanned = hash_models(models, lambda n: report("hashing", n, total))
    plan = plan_deltas(scanned)
    choices = plan.choices if delta == "auto" else {}
    with_deltas = sum(choices[k].estimated_bytes if k in choices else est
                      for k, est in plan.self_estimates.items())
    firsts = scanned.first_occurrences()
    return {"estimate": True, "models": len(models), "model_names": [m.name for m in models],
            "tensor_bytes": total, "distinct_tensors": len(firsts),
            "distinct_tensor_bytes": sum(k[1] for k in firsts),
            "self_blobs": len(firsts) - len(choices), "delta_blobs": len(choices),
            "delta_encodings": dict(Counter(c.encoding.name for c in choices.values())),
            "estimated_bytes": with_deltas,
            "estimated_without_deltas_bytes": plan.self_estimated_bytes}

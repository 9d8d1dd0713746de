"""Choose, for each distinct tensor content, whether to store it as a delta and against
which base: the planner that ``pack`` calls between hashing and encoding.

For every distinct content (in first-occurrence order) the candidates are earlier distinct
contents of *other* models with the same dtype and byte length: the tensors of the same
name, and, for a model that has no tensor of that name at all (GGUF vs HF naming), the two
tensors of the same shape whose sampled high bytes agree most. Each candidate is scored on
a sample (32 runs of 128 elements, read through mmap) by the order-0 entropy of each byte
plane of the XOR, the difference and the zigzagged difference; the best base is then also
tried with the F32 predictions (weight decay, low rank). A delta is planned when its
estimate beats the estimate of the content's own byte planes by ``MIN_GAIN``.

Bases always come earlier in first-occurrence order, so chains have no cycles and the
first model given stays self-contained (loadable without decoding deltas); a base whose own
chain is already ``max_depth`` long is not a candidate. The writer may still store a
planned base or delta self-contained when that comes out smaller; that only shortens
chains.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import numpy as np

from ..format.bundle.constants import MAX_DELTA_DEPTH, BlobEncoding
from ..format.checkpoints.dtypes import element_width
from ..format.codecs.delta import (
    SUB_WIDTHS,
    decay_predict,
    lowrank_predict,
    sub_residual,
)
from ..format.codecs.delta_encode import diff64, fit_decay, probe_rank, sample_index
from .scan import ScannedModels
from .tensor_bytes import TensorBytes
from .tensor_hashes import ContentKey, HashedTensor

__all__ = ["Decided", "DeltaChoice", "DeltaPlan", "choose_bases", "element_width", "plan_deltas"]

#: A delta must be estimated at least this much smaller than the content's own planes.
MIN_GAIN = 0.03
#: zstd (fast, min_match 7) lands this close to the order-0 entropy of residual planes.
ZSTD_OVER_ENTROPY = 1.03
#: Per-plane cost of a frame and its table entry.
FRAME_OVERHEAD = 24
#: Renamed candidates kept per other model (by agreement of the sampled high bytes).
RENAMED_PER_MODEL = 2
#: Below this estimate the predicted encodings are not worth trying.
PREDICT_MIN_BYTES = 1 << 14
#: The F32 predictions are tried against up to this many of the best plain candidates,
#: those within PREDICT_NEAR of the best.
PREDICT_CANDIDATES = 3
PREDICT_NEAR = 0.05
#: Highest rank a low-rank prediction is looked for at; a first, cheaper probe looks up
#: to FIRST_PROBE_RANK and goes on only if what its rows leave unexplained falls off
#: steeply (largest squared residual below FLAT_TAIL of the largest row's).
MAX_LOWRANK = 64
FIRST_PROBE_RANK = 16
FLAT_TAIL = 1e-3

_E = BlobEncoding
_PLAIN = (_E.XOR_BYTEPLANE_ZSTD, _E.SUB_BYTEPLANE_ZSTD, _E.ZIGZAG_SUB_BYTEPLANE_ZSTD)


@dataclass(frozen=True, slots=True)
class DeltaChoice:
    """Store a content as ``encoding`` against ``base`` (planes of ``width`` bytes).

    ``shape`` is the tensor's shape: pass it to ``encode_delta(..., shape=)`` (the low-rank
    encoding needs it). ``self_estimated_bytes`` estimates the content's own byte planes:
    when ``estimated_bytes`` is far below it, the writer may skip trying them.
    """

    base: ContentKey
    encoding: BlobEncoding
    width: int
    estimated_bytes: int
    shape: tuple[int, ...] = ()
    self_estimated_bytes: int = 0
    depth: int = 1


@dataclass(slots=True)
class DeltaPlan:
    """The planner's output: chosen deltas and, for every distinct content, an estimate
    of its own byte-plane encoding."""

    choices: dict[ContentKey, DeltaChoice]
    self_estimates: dict[ContentKey, int]
    stats: dict = field(default_factory=dict)

    @property
    def estimated_bytes(self) -> int:
        """Estimated stored bytes of every distinct content, deltas included."""
        return sum(self.choices[k].estimated_bytes if k in self.choices else est
                   for k, est in self.self_estimates.items())

    @property
    def self_estimated_bytes(self) -> int:
        """Estimated stored bytes with no delta at all."""
        return sum(self.self_estimates.values())


# -- sampling ----------------------------------------------------------------------------

def plane_width(h: HashedTensor) -> int:
    """The plane width of a tensor: its element width if it divides the length, else 1."""
    w = element_width(h.record.dtype)
    return w if h.record.length % w == 0 else 1


def sample_elements(read: TensorBytes, h: HashedTensor, width: int, runs: int = 32,
                    run: int = 128) -> np.ndarray:
    """A (n, width) uint8 array of sampled elements (evenly spaced runs; all if small)."""
    return read.rows(h, width, sample_index(h.record.length // width, runs, run))


def plane_entropy(planes: np.ndarray) -> np.ndarray:
    """Order-0 entropy (bits per byte, Miller-Madow corrected) of each column."""
    n = planes.shape[0]
    out = np.zeros(planes.shape[1])
    if n == 0:
        return out
    for j in range(planes.shape[1]):
        counts = np.bincount(planes[:, j], minlength=256)
        p = counts[counts > 0] / n
        h = -(p * np.log2(p)).sum() + (len(p) - 1) / (2 * n * math.log(2))
        out[j] = min(8.0, h)
    return out


def estimate_planes(sample: np.ndarray, n_elements: int) -> int:
    """Estimated bytes of a byte-plane blob of ``n_elements`` like the (n, w) ``sample``."""
    width = sample.shape[1]
    bits = plane_entropy(sample)
    body = sum(min(n_elements, n_elements * b / 8 * ZSTD_OVER_ENTROPY) for b in bits)
    return int(body) + 4 + width * FRAME_OVERHEAD


def _as_planes(arr: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(arr).view(np.uint8).reshape(-1, width)


# -- estimates of one pair ---------------------------------------------------------------

@dataclass(slots=True)
class _Key:
    key: ContentKey
    h: HashedTensor
    width: int
    n: int  # elements of `width` bytes
    sample: np.ndarray
    models: frozenset[str]
    names: frozenset[str]
    pos: int
    self_est: int = 0
    depth: int = 0


def _plain_estimates(t: _Key, b: _Key) -> dict[BlobEncoding, int]:
    w = t.width
    ts, bs = t.sample, b.sample
    out = {_E.XOR_BYTEPLANE_ZSTD: estimate_planes(ts ^ bs, t.n)}
    if w in SUB_WIDTHS:
        for enc, zz in ((_E.SUB_BYTEPLANE_ZSTD, False), (_E.ZIGZAG_SUB_BYTEPLANE_ZSTD, True)):
            res = sub_residual(ts.reshape(-1), bs.reshape(-1), w, zz)
            out[enc] = estimate_planes(_as_planes(res, w), t.n)
    return out


def _decay_estimate(t: _Key, b: _Key) -> int | None:
    tb, bb = t.sample.reshape(-1).view(np.uint32), b.sample.reshape(-1).view(np.uint32)
    c, k, matches = fit_decay(tb, bb)
    if k == 0 or matches < len(tb) // 4:
        return None
    res = sub_residual(t.sample.reshape(-1), decay_predict(bb, c, k).view(np.uint8), 4)
    return 8 + estimate_planes(_as_planes(res, 4), t.n)


def _lowrank_estimate(t: _Key, b: _Key, read: TensorBytes) -> int | None:
    rows, cols = t.h.record.shape
    max_rank = min(MAX_LOWRANK, rows // 4, cols // 4)
    if max_rank < 1:
        return None
    # A small probe first: it finds ranks up to FIRST_PROBE_RANK, and a spectrum that
    # stays flat (a full fine-tune's noise-like drift) rules out a larger low rank.
    for rank in (min(FIRST_PROBE_RANK, max_rank), max_rank):
        probe = np.unique(np.linspace(0, rows - 1, min(rows, 2 * rank + 8)).astype(int))
        tr = read.rows(t.h, 4 * cols, probe).view(np.uint32)
        br = read.rows(b.h, 4 * cols, probe).view(np.uint32)
        d = diff64(tr, br)
        r, v, tail = probe_rank(d, rank)
        if r or tail > FLAT_TAIL or rank == max_rank:
            break
    if not r:
        return None
    u = np.einsum("ik,jk->ij", d, v).astype(np.float32)
    pred = lowrank_predict(br.view(np.uint8), u, v.astype(np.float32))
    res = sub_residual(tr.view(np.uint8).reshape(-1), pred.view(np.uint8), 4)
    factors = int((rows + cols) * r * 4 * 0.9)
    return 16 + factors + estimate_planes(_as_planes(res, 4), t.n)


# -- the plan ----------------------------------------------------------------------------

#: Told each distinct content's decision as soon as it is made, in first-occurrence order
#: (so every base before its deltas): the writer encodes while the planner goes on.
Decided = Callable[[ContentKey, "DeltaChoice | None"], None]


def plan_deltas(scanned: ScannedModels, *, max_depth: int = MAX_DELTA_DEPTH,
                decided: Decided | None = None,
                only: Container[ContentKey] | None = None) -> DeltaPlan:
    """Plan deltas for every distinct content of ``scanned`` (see the module docstring).
    Estimates do not depend on the zstd level the writer will use. ``decided``, when
    given, is called with each content and its choice (None: no delta) in order.
    ``only``: plan just these contents; the others are candidate bases only (``add``
    passes the new ones)."""
    firsts = scanned.first_occurrences()
    occurrences: dict[ContentKey, list[HashedTensor]] = defaultdict(list)
    for m in scanned.models:
        for h in scanned.hashed[m.name]:
            occurrences[h.key].append(h)
    names_of_model = {m.name: {h.record.name for h in scanned.hashed[m.name]}
                      for m in scanned.models}

    choices: dict[ContentKey, DeltaChoice] = {}
    self_est: dict[ContentKey, int] = {}
    stats = {"candidates": 0, "renamed_candidates": 0, "encodings": defaultdict(int)}
    with TensorBytes(scanned) as read:
        info: dict[ContentKey, _Key] = {}
        by_name: dict[tuple, list[_Key]] = defaultdict(list)
        by_shape: dict[tuple, dict[str, list[_Key]]] = defaultdict(lambda: defaultdict(list))
        for pos, (key, h) in enumerate(firsts.items()):
            w = plane_width(h)
            occ = occurrences[key]
            k = _Key(key, h, w, h.record.length // w, sample_elements(read, h, w),
                     frozenset(o.record.model for o in occ),
                     frozenset(o.record.name for o in occ), pos)
            k.self_est = min(h.record.length, estimate_planes(k.sample, k.n))
            self_est[key] = k.self_est
            info[key] = k
            if h.record.length == 0:
                if decided is not None:
                    decided(key, None)
                continue
            cands = ([] if only is not None and key not in only else
                     _candidates(k, by_name, by_shape, names_of_model, max_depth, stats))
            choice = _best(k, cands, read, stats) if cands else None
            if choice is not None:
                base, enc, est = choice
                k.depth = info[base].depth + 1
                choices[key] = DeltaChoice(base, enc, k.width, est, tuple(h.record.shape),
                                           k.self_est, k.depth)
                stats["encodings"][enc.name] += 1
            if decided is not None:
                decided(key, choices.get(key))
            for o in occ:
                rec = o.record
                by_name[(rec.name, rec.dtype, rec.length)].append(k)
                by_shape[(rec.dtype, tuple(rec.shape), rec.length)][rec.model].append(k)
    stats["encodings"] = dict(stats["encodings"])
    return DeltaPlan(choices, self_est, stats)


def choose_bases(scanned: ScannedModels, *, max_depth: int = MAX_DELTA_DEPTH,
                 decided: Decided | None = None) -> dict[ContentKey, DeltaChoice]:
    """For each distinct content worth delta-encoding, its chosen base and encoding.

    No cycles (bases come earlier in first-occurrence order) and every chain is at most
    ``max_depth`` deltas long. ``decided`` streams the decisions (see :func:`plan_deltas`).
    """
    return plan_deltas(scanned, max_depth=max_depth, decided=decided).choices


def _candidates(k: _Key, by_name, by_shape, names_of_model, max_depth: int,
                stats: dict) -> list[_Key]:
    rec = k.h.record
    out: dict[ContentKey, _Key] = {}
    for name in k.names:
        for c in by_name.get((name, rec.dtype, rec.length), ()):
            if c.depth < max_depth and c.models - k.models:
                out.setdefault(c.key, c)
    same_shape = by_shape.get((rec.dtype, tuple(rec.shape), rec.length), {})
    for model, group in same_shape.items():
        if model in k.models or names_of_model[model] & k.names:
            continue  # same model, or a model that names its tensors like ours
        group = [c for c in group if c.depth < max_depth and c.key not in out]
        top = k.sample[:, -1]
        group.sort(key=lambda c: -int(np.count_nonzero(c.sample[:, -1] == top)))
        for c in group[:RENAMED_PER_MODEL]:
            out.setdefault(c.key, c)
            stats["renamed_candidates"] += 1
    stats["candidates"] += len(out)
    return list(out.values())


def _best(k: _Key, cands: list[_Key], read: TensorBytes,
          stats: dict) -> tuple[ContentKey, BlobEncoding, int] | None:
    """The cheapest (base, encoding, estimate) among ``cands``, or None if no delta pays.

    Plain estimates rank the candidates (a deeper base must be 1% better per level); the
    F32 predictions are tried against the few that come close to the best, since a merged
    LoRA is low-rank against its own base only, whichever base is closest.
    """
    scored = []
    for c in cands:
        ests = _plain_estimates(k, c)
        enc = min(ests, key=ests.get)
        scored.append((ests[enc] * (1 + 0.01 * c.depth), c.pos, ests[enc], enc, c))
    scored.sort(key=lambda s: s[:2])
    _, _, est, enc, base = scored[0]
    if k.h.record.dtype == "F32" and k.width == 4 and est >= PREDICT_MIN_BYTES:
        near = [s[4] for s in scored if s[0] <= scored[0][0] * (1 + PREDICT_NEAR)]
        for c in near[:PREDICT_CANDIDATES]:
            decay = _decay_estimate(k, c)
            if decay is not None and decay < est:
                est, enc, base = decay, _E.DECAY_SUB_BYTEPLANE_ZSTD, c
            if len(k.h.record.shape) == 2:
                low = _lowrank_estimate(k, c, read)
                if low is not None and low < est:
                    est, enc, base = low, _E.LOWRANK_SUB_BYTEPLANE_ZSTD, c
    if est >= k.self_est * (1 - MIN_GAIN):
        return None
    return base.key, enc, est

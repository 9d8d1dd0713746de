"""Plan derived tensors: which distinct contents are a transform of another model's tensor.

A precision ladder (F32 safetensors, F16/BF16 casts, llama.cpp's GGUF conversions and
``llama-quantize`` outputs) shares almost no bytes, but each file is a deterministic function
of the first. For every distinct content this planner looks for a *base* in another model
and a *chain* of transforms (``format.codecs.transforms``) that predicts it:

1. **Names across formats.** GGUF tensors are named by llama.cpp (``blk.0.attn_q.weight``),
   safetensors ones by their framework (``model.layers.0.self_attn.q_proj.weight``). Every
   safetensors name is mapped with gguf-py's ``TensorNameMap`` for each architecture the GGUF
   files of the set declare (block count from their tensor names). Tensors are grouped by
   (canonical name, element count): one dictionary pass, linear in the number of tensors.
2. **Candidates.** Within a group, the smallest content that predicts every other exactly
   (an F32 tensor its casts and quantizations; a Q4_1 tensor its dequantized and
   requantized copies) is the base of all. Failing one, each content tries other models'
   contents, most precise type first (F32, then BF16/F16, then quantized by bits), at most
   ``MAX_BASES`` of them.
3. **Chains** by the pair of types: a cast, a quantization (directly, or through F16/BF16
   first), a dequantization, or dequantize-then-quantize; a transposed shape adds a
   transpose; llama-family ``attn_q``/``attn_k`` against a safetensors base try the
   converter's head permutation.
4. **Agreement test.** Each chain is applied to a few sampled rows of the base and compared
   byte for byte with the same rows of the tensor (for a Q/K permutation, with the base
   rows it moves there; for a transpose, a corner block; the whole tensor when those
   cannot be picked);
   the best (candidate, chain) is kept if it
   agrees on at least ``MIN_AGREEMENT`` of the bytes. ``pack`` then encodes it in full beside
   the delta and the plain encodings and keeps the smallest.

No choice makes a cycle with another or with the planned deltas, and chains of bases stay
within ``MAX_DELTA_DEPTH``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import TransformMismatch
from ..format.bundle.constants import MAX_DELTA_DEPTH
from ..format.checkpoints.records import FileKind
from ..format.codecs.transforms import (
    FLOAT_TYPES,
    QUANT_TYPES,
    Transform,
    TransformKind,
    TypedTensor,
    apply_chain,
    qk_permute,
    type_number,
)
from .tensor_bytes import TensorBytes
from .scan import ScannedModels
from .tensor_hashes import ContentKey, HashedTensor

__all__ = ["DerivableModel", "DeriveChoice", "canonical_names", "derivation_report",
           "plan_derived"]

#: Candidate bases tried per content (when no content of its group predicts all others).
MAX_BASES = 3
#: Groups larger than this skip the search for a common root (quadratic in the group).
MAX_GROUP = 16
#: Sampled byte agreement a chain needs to be planned.
MIN_AGREEMENT = 0.5
#: Rows sampled at each of three places (start, middle, end) of a tensor.
SAMPLE_ROWS = 4
#: A transpose to a float tensor is sampled on this many rows and columns of its corner
#: (columns spread over the whole base: a column sample faulted every page of its map).
TRANSPOSE_BLOCK = 16
#: A quantized base's transpose is tested on the whole tensor (its rows are blocks, its
#: columns cannot be sampled); bigger ones are not tried.
MAX_LAYOUT_ELEMENTS = 1 << 24
#: Architectures whose converter permutes attn_q / attn_k rows (convert_hf_to_gguf.py).
PERMUTING_ARCHS = {"llama", "mistral", "granite", "granitemoe", "llama4", "deci", "smollm3"}
#: Transforms that move elements (a chain starts with at most one).
LAYOUT_KINDS = frozenset({TransformKind.TRANSPOSE, TransformKind.PERMUTE_QK})
_BLK = re.compile(r"^blk\.(\d+)\.")
_DIGITS = re.compile(r"\d+")
_PRECISION = {"F32": 0, "BF16": 1, "F16": 1, "Q8_0": 2, "Q6_K": 3, "Q5_1": 4, "Q5_K": 4,
              "Q5_0": 5, "Q4_1": 6, "Q4_K": 6, "Q4_0": 7, "Q3_K": 8, "Q2_K": 9}


@dataclass(frozen=True, slots=True)
class DeriveChoice:
    """Store a content as ``chain(base)`` plus its residual (``encode_derived``)."""

    base: ContentKey
    chain: tuple[Transform, ...]
    base_dtype: str
    base_shape: tuple[int, ...]
    agreement: float  # sampled fraction of bytes the prediction gets right
    length: int

    @property
    def estimated_bytes(self) -> int:
        return int(self.length * (1.0 - self.agreement) * 1.1) + 256

    def describe(self) -> str:
        return " then ".join(t.describe() for t in self.chain)


def _gguf_archs(scanned: ScannedModels) -> dict[str, int]:
    """Architecture -> block count, from the GGUF files of the set."""
    archs: dict[str, int] = {}
    for m in scanned.models:
        for f in m.files:
            arch = f.info.get("general.architecture") if f.kind is FileKind.GGUF else None
            if isinstance(arch, str):
                blocks = [int(b.group(1)) + 1 for t in f.tensors if (b := _BLK.match(t.name))]
                archs[arch] = max(archs.get(arch, 0), max(blocks, default=0))
    return archs


def canonical_names(scanned: ScannedModels) -> dict[tuple[str, str, str], str]:
    """(model, file, tensor) -> llama.cpp's name where gguf-py maps it, else its own.

    A map names blocks 0 to n - 1; it is built for no more blocks than the largest number
    in a name it is asked about (a 30-block llama map took ~6 ms of every report): a name
    holding block ``b`` holds a run of digits worth at least ``b``."""
    import gguf

    others = [t.name for m in scanned.models for f in m.files if f.kind is not FileKind.GGUF
              for t in f.tensors]
    largest = max((int(d) for name in others for d in _DIGITS.findall(name)), default=0)
    maps = []
    for arch, blocks in _gguf_archs(scanned).items() if others else ():
        ident = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
        if ident is not None:
            try:
                maps.append(gguf.get_tensor_name_map(ident, min(blocks, largest + 1)))
            except (KeyError, ValueError):
                continue
    out: dict[tuple[str, str, str], str] = {}
    for m in scanned.models:
        for f in m.files:
            for t in f.tensors:
                if f.kind is FileKind.GGUF:
                    out[(m.name, f.rel_path, t.name)] = t.name
                    continue
                out[(m.name, f.rel_path, t.name)] = t.name  # same-format ladders
                for tmap in maps:
                    name = tmap.get_name(t.name, try_suffixes=(".weight", ".bias"))
                    if name is not None:
                        out[(m.name, f.rel_path, t.name)] = name
                        break
    return out


def _numel(shape) -> int:
    # math.prod of Python ints cannot overflow, and it is ~10x faster than np.prod on a
    # short tuple (this runs several times per sampled pair: 15 ms of analyze's report).
    return math.prod(shape)


def _chains(base: str, target: str) -> list[tuple[Transform, ...]]:
    """Type chains from ``base`` to ``target`` type (no layout)."""
    T, K = Transform, TransformKind
    if base in FLOAT_TYPES and target in FLOAT_TYPES:
        return [(T(K.CAST, type_number(target)),)] if base != target else []
    if base in FLOAT_TYPES and target in QUANT_TYPES:
        q = T(K.QUANTIZE, type_number(target))
        out: list[tuple[Transform, ...]] = [(q,)]
        if base == "F32":
            out += [(T(K.CAST, type_number("F16")), q), (T(K.CAST, type_number("BF16")), q)]
        return out
    if base not in FLOAT_TYPES and target in FLOAT_TYPES:
        return [(T(K.DEQUANTIZE, type_number(target)),)]
    if base not in FLOAT_TYPES and target in QUANT_TYPES and base != target:
        return [(T(K.DEQUANTIZE, type_number("F32")), T(K.QUANTIZE, type_number(target)))]
    return []


@functools.lru_cache(maxsize=256)
def _sample_rows(rows: int) -> np.ndarray:
    """Which rows a sample takes: ``SAMPLE_ROWS`` at the start, middle and end."""
    picks = {0, max(0, rows // 2 - SAMPLE_ROWS // 2), max(0, rows - SAMPLE_ROWS)}
    index = np.array(sorted({r for p in picks for r in range(p, min(rows, p + SAMPLE_ROWS))}),
                     dtype=np.intp)
    index.flags.writeable = False
    return index


def _rows_of(read: TensorBytes, h: HashedTensor, index: np.ndarray) -> np.ndarray:
    """The bytes of rows ``index`` of a tensor (a 1-D one is one row), flat."""
    shape = tuple(h.record.shape)
    rows = _numel(shape[:-1]) if len(shape) > 1 else 1
    return read.rows(h, h.record.length // rows, index).reshape(-1)


def _samples(layout: Transform | None, read: TensorBytes, b: HashedTensor,
             t: HashedTensor) -> tuple[TypedTensor, np.ndarray] | None:
    """A piece of the base and the piece of the target that ``layout`` (none, a transpose,
    a Q/K permutation) puts it at, both read from a few places of each map: whole rows
    from the start, middle and end; for a transpose to a float tensor, the top-left block.
    None when they cannot be picked apart (then the whole tensors are compared)."""
    bd, bs, ts = b.record.dtype, tuple(b.record.shape), tuple(t.record.shape)
    index = _sample_rows(_numel(ts[:-1]) if len(ts) > 1 else 1)
    if layout is None:
        if bs[-1:] != ts[-1:]:
            return None
        return (TypedTensor.of(_rows_of(read, b, index), bd, (len(index), *bs[-1:])),
                _rows_of(read, t, index))
    if layout.kind is TransformKind.TRANSPOSE and len(bs) == 2 and bd in FLOAT_TYPES:
        td = t.record.dtype
        if td in FLOAT_TYPES:  # target[:m, :k] = base[:k, :m].T: the first rows of each
            k, m = min(TRANSPOSE_BLOCK, bs[0]), min(TRANSPOSE_BLOCK, bs[1])
            el = _rows_of(read, b, np.arange(k)).view(FLOAT_TYPES[bd]).reshape(k, bs[1])
            piece = np.ascontiguousarray(el[:, :m].T)
            got = _rows_of(read, t, np.arange(m)).view(FLOAT_TYPES[td]).reshape(m, ts[1])
            want = np.ascontiguousarray(got[:, :k])
            return (TypedTensor(piece.reshape(-1).view(np.uint8), bd, piece.shape),
                    want.reshape(-1).view(np.uint8))
        whole = read(b).view(FLOAT_TYPES[bd]).reshape(bs)
        piece = np.ascontiguousarray(whole[:, index].T)  # target row i = base column i
        return (TypedTensor(piece.reshape(-1).view(np.uint8), bd, piece.shape),
                _rows_of(read, t, index))
    if layout.kind is TransformKind.PERMUTE_QK and bs == ts and len(bs) >= 1:
        try:
            src = qk_permute(np.arange(bs[0]).reshape(-1, 1), layout.param)[:, 0]
        except TransformMismatch:
            return None
        rows = read.rows(b, b.record.length // bs[0], src[index]).reshape(-1)
        return (TypedTensor.of(rows, bd, (len(index), *bs[1:])), _rows_of(read, t, index))
    return None


def _agreement(chain, read: TensorBytes, b: HashedTensor, t: HashedTensor) -> float:
    """Fraction of sampled bytes the chain predicts right (``_samples``; the whole
    tensor when the samples cannot be picked)."""
    layout = chain[0] if chain and chain[0].kind in LAYOUT_KINDS else None
    try:
        picked = _samples(layout, read, b, t)
        if picked is None:
            pred = apply_chain(chain, TypedTensor.of(read(b), b.record.dtype,
                                                     tuple(b.record.shape))).data
            actual = read(t)
        else:
            sample, actual = picked
            pred = apply_chain(chain[1:] if layout else chain, sample).data
    except (TransformMismatch, ValueError):
        return 0.0
    if pred.size != actual.size or not actual.size:
        return 0.0
    return float(np.count_nonzero(pred == actual)) / actual.size


def _layouts(b: HashedTensor, t: HashedTensor, canon: str, heads: dict
             ) -> list[tuple[Transform, ...]]:
    """Layout prefixes that make the base's shape the target's: none, transpose, permute."""
    bs, ts = tuple(b.record.shape), tuple(t.record.shape)
    out: list[tuple[Transform, ...]] = []
    if bs == ts:
        out.append(())
        n = heads.get((t.record.model, t.record.file, canon))
        if n:
            out.append((Transform(TransformKind.PERMUTE_QK, n),))
    if len(bs) == 2 and bs[::-1] == ts and (b.record.dtype in FLOAT_TYPES
                                            or _numel(bs) <= MAX_LAYOUT_ELEMENTS):
        out.append((Transform(TransformKind.TRANSPOSE, 0),))
    return out


def _gguf_int(info: dict, key: str) -> int | None:
    """A scalar integer metadata value the GGUF indexer kept, or None (absent, an array)."""
    val = info.get(key)
    return val if type(val) is int and val > 0 else None


def _head_counts(scanned: ScannedModels) -> dict[tuple[str, str, str], int]:
    """(model, file, attn_q/attn_k name) -> heads of the converter's permutation, for the
    GGUF files of architectures whose converter permutes them (the head counts are kept by
    the GGUF indexer; reading them with ``GGUFReader`` cost ~3 s per file)."""
    out: dict[tuple[str, str, str], int] = {}
    for m in scanned.models:
        for f in m.files:
            arch = f.info.get("general.architecture")
            if f.kind is not FileKind.GGUF or arch not in PERMUTING_ARCHS:
                continue
            nq = _gguf_int(f.info, f"{arch}.attention.head_count")
            nkv = _gguf_int(f.info, f"{arch}.attention.head_count_kv") or nq
            for t in f.tensors:
                if t.name.endswith("attn_q.weight") and nq:
                    out[(m.name, f.rel_path, t.name)] = nq
                elif t.name.endswith("attn_k.weight") and nkv:
                    out[(m.name, f.rel_path, t.name)] = nkv
    return out


def _best_chain(c: HashedTensor, h: HashedTensor, canon: str, heads: dict, read,
                cache: dict) -> DeriveChoice | None:
    """The chain from base ``c`` that predicts ``h`` best on the sample (None below
    ``MIN_AGREEMENT``); stops at the first that agrees fully."""
    memo = (c.key, h.key)
    if memo in cache:
        return cache[memo]
    best: DeriveChoice | None = None
    for layout in _layouts(c, h, canon, heads):
        for types in _chains(c.record.dtype, h.record.dtype) or ([()] if layout else []):
            chain = layout + types
            if not chain or len(chain) > 2:
                continue
            agree = _agreement(chain, read, c, h)
            if agree >= MIN_AGREEMENT and (best is None or agree > best.agreement):
                best = DeriveChoice(c.key, chain, c.record.dtype, tuple(c.record.shape),
                                    agree, h.record.length)
            if best is not None and best.agreement == 1.0:
                cache[memo] = best
                return best
    cache[memo] = best
    return best


def _root(group: list[HashedTensor], canon: str, heads: dict, read, cache: dict
          ) -> HashedTensor | None:
    """The smallest content every other content of the group derives from exactly (on the
    sample): the one to store. The most precise contents are tried first, so a wrong root
    fails on its first test."""
    by_precision = sorted(group, key=lambda c: _PRECISION[c.record.dtype])
    for r in sorted(group, key=lambda c: c.record.length):
        if all((c := _best_chain(r, x, canon, heads, read, cache)) is not None
               and c.agreement == 1.0 for x in by_precision if x.key != r.key):
            return r
    return None


def _no_transform_between(group: list[HashedTensor], heads: dict) -> bool:
    """Whether no chain can relate the group's contents: one type, one shape and no head
    permutation (fine-tunes of one model: deltas' business, and at analyze's scale a
    group may hold thousands of them)."""
    first = group[0].record
    return all(h.record.dtype == first.dtype and tuple(h.record.shape) == tuple(first.shape)
               and (h.record.model, h.record.file, h.record.name) not in heads for h in group)


def plan_derived(scanned: ScannedModels, deltas: dict | None = None,
                 max_depth: int = MAX_DELTA_DEPTH) -> dict[ContentKey, DeriveChoice]:
    """Derived choices for the distinct contents of ``scanned`` (see the module docstring).

    Per group of contents with one canonical name and element count: when one content
    predicts every other exactly, the smallest such (a Q4_1 file its dequantized and
    requantized copies, an F32 file its casts and quantizations) is the base of all;
    otherwise each content takes the best of the more precise contents of other models."""
    canon = canonical_names(scanned)
    heads = _head_counts(scanned)
    firsts = scanned.first_occurrences()
    groups: dict[tuple[str, int], list[HashedTensor]] = defaultdict(list)
    for h in firsts.values():
        r = h.record
        name = canon.get((r.model, r.file, r.name))
        if name is not None and r.dtype in _PRECISION:
            groups[(name, _numel(r.shape))].append(h)
    edges = {k: c.base for k, c in (deltas or {}).items()}
    choices: dict[ContentKey, DeriveChoice] = {}
    users: dict[ContentKey, list[ContentKey]] = defaultdict(list)  # see _acyclic
    for k, b in edges.items():
        users[b].append(k)
    with TensorBytes(scanned) as read:
        for (name, _), group in groups.items():
            if len(group) < 2 or _no_transform_between(group, heads):
                continue
            cache: dict = {}
            by_precision = sorted(group, key=lambda c: _PRECISION[c.record.dtype])
            root = _root(group, name, heads, read, cache) if len(group) <= MAX_GROUP else None
            for h in group:
                if root is not None:
                    cands = [root] if h.key != root.key else []
                else:
                    cands = list(itertools.islice(
                        (c for c in by_precision if c.key != h.key
                         and c.record.model != h.record.model
                         and _PRECISION[c.record.dtype] <= _PRECISION[h.record.dtype]),
                        MAX_BASES))
                best: DeriveChoice | None = None
                for c in cands:
                    if not _acyclic(h.key, c.key, edges, choices, max_depth, users):
                        continue
                    got = _best_chain(c, h, name, heads, read, cache)
                    if got is not None and (best is None or got.agreement > best.agreement):
                        best = got
                    if best is not None and best.agreement == 1.0:
                        break
                if best is not None:
                    choices[h.key] = best
                    users[best.base].append(h.key)
    return choices


def _acyclic(key: ContentKey, base: ContentKey, edges: dict, choices: dict,
             max_depth: int, users: Mapping[ContentKey, list]) -> bool:
    """Whether adding ``key -> base`` keeps the union of delta and derived edges acyclic
    with every chain at most ``max_depth`` long (pack may pick either edge of a content).
    ``users``: for each content, the contents whose delta or derived edge points at it
    (kept by the caller as edges are added: scanning every edge per call made planning
    quadratic, 12 % of analyze's derivation report on the corpus)."""
    if key != base and base not in choices and base not in edges and not users.get(key):
        return True  # a chain of one edge: the common case, without the walk below
    def forward(node):
        out = []
        if node in choices:
            out.append(choices[node].base)
        if node in edges:
            out.append(edges[node])
        return out

    def below(node, seen: frozenset) -> int:
        if node == key or node in seen or len(seen) > max_depth:
            return max_depth + 1  # a cycle, or too deep already
        return 1 + max((below(n, seen | {node}) for n in forward(node)), default=0)

    def above(node, seen: frozenset) -> int:
        if len(seen) > max_depth:
            return max_depth + 1
        return max((1 + above(u, seen | {u}) for u in users.get(node, ()) if u not in seen),
                   default=0)

    return below(base, frozenset()) + above(key, frozenset({key})) <= max_depth


# -- the report analyze prints --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DerivableModel:
    """How much of one model another model's tensors compute (sampled full agreement)."""

    model: str
    tensor_bytes: int
    derivable_bytes: int
    base_model: str  # the model most of those bytes derive from
    transform: str  # the chain most tensors use, described ("Q4_0 quantization")
    transforms: dict[str, int] = field(default_factory=dict)  # chain -> derivable bytes

    @property
    def fraction(self) -> float:
        return self.derivable_bytes / self.tensor_bytes if self.tensor_bytes else 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "tensor_bytes": self.tensor_bytes,
                "derivable_bytes": self.derivable_bytes, "fraction": round(self.fraction, 6),
                "base_model": self.base_model, "transform": self.transform,
                "transforms": dict(self.transforms)}

    def sentence(self) -> str:
        return (f"{self.model}: {self.fraction:.1%} derivable from {self.base_model} by "
                f"{self.transform}")


def derivation_report(scanned: ScannedModels) -> list[DerivableModel]:
    """Per model with derivable tensors: the bytes another model's tensors reproduce
    exactly on the sample, from which model and how (most bytes first within a model)."""
    choices = plan_derived(scanned)
    firsts = scanned.first_occurrences()
    out = []
    for m in scanned.models:
        hs = scanned.hashed[m.name]
        by_base: dict[str, int] = defaultdict(int)
        by_chain: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        for h in hs:
            c = choices.get(h.key)
            if c is None or c.agreement < 1.0:
                continue
            base_model = firsts[c.base].record.model
            if base_model != m.name:
                how = c.describe()
                by_base[base_model] += h.record.length
                by_chain[how] += h.record.length
                count[how] += 1
        if by_base:
            out.append(DerivableModel(
                m.name, sum(h.record.length for h in hs), sum(by_base.values()),
                max(by_base, key=by_base.__getitem__), max(count, key=count.__getitem__),
                dict(by_chain)))
    return out

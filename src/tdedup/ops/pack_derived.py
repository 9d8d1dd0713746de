"""What ``pack`` adds for derived tensors and repeated layouts (issue 12).

Kept apart from ``ops.pack`` so that pack's own flow stays readable:

- :func:`plan` runs the derivation planner (``--derive auto``) after the delta planner;
- :func:`try_derived` encodes one content as transform + residual, or says it cannot;
- :class:`LayoutStore` stores each file's non-tensor bytes, as plain zstd or, when smaller,
  as zstd against an earlier file's layout of the same kind (``ZSTD_REF``): a ladder of
  GGUF files repeats megabytes of metadata (the vocabulary) in every file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analyzers.derivation import DeriveChoice, plan_derived
from ..analyzers.scan import ScannedModels
from ..analyzers.tensor_hashes import ContentKey
from ..errors import TransformMismatch, UsageError
from ..format.bundle.constants import RAW_ALIGNMENT, BlobEncoding
from ..format.bundle.manifest import MAX_ZSTD_RATIO
from ..format.bundle.writer import BundleWriter
from ..format.codecs import encode
from ..format.codecs.zstd import zstd_compress

def raw_worth_its_alignment(n: int) -> bool:
    """Whether an ``n``-byte blob may stay raw: a raw blob starts at a multiple of
    ``RAW_ALIGNMENT`` (4 KiB), a compressed one of 64 bytes, so a smaller raw blob costs up
    to 4 KiB of padding (a tiny pipeline's biases: a third of its bundle was padding). An
    empty one costs nothing either way and stays raw."""
    return n >= RAW_ALIGNMENT or not n


#: A derived blob at most this share of its tensor is kept without trying the others.
DERIVED_CLEAR_WIN = 0.02


def plan(scanned: ScannedModels, derive: str) -> dict[ContentKey, DeriveChoice]:
    """Derived choices for pack (none with ``derive="off"``), planned before the delta
    planner runs (it streams its choices to the writer)."""
    if derive == "off":
        return {}
    if derive != "auto":
        raise UsageError(f"--derive must be 'auto' or 'off', not {derive!r}")
    return plan_derived(scanned)


@dataclass(frozen=True, slots=True)
class DeltaExclusions:
    """Contents whose delta choice pack ignores (``members``), and the derived ones among
    them (``targets``: no delta may use one as its base)."""

    members: frozenset
    targets: frozenset

    def __contains__(self, key: object) -> bool:
        return key in self.members


def delta_exclusions(derived: dict[ContentKey, DeriveChoice]) -> DeltaExclusions:
    """What keeps deltas and derived blobs from making a cycle or a too-long chain.

    The delta planner does not see derived choices, so pack ignores its choice for every
    derived target and every derived base (those are stored derived or self-contained), and
    for every delta whose base is a derived target. Then a derived base ends every chain
    it is on, a chain of derived blobs is acyclic and short (the derivation planner checks),
    and a delta chain never passes a derived blob: dropping a delta only shortens chains."""
    return DeltaExclusions(frozenset(derived) | {c.base for c in derived.values()},
                           frozenset(derived))


def try_derived(data, base, choice: DeriveChoice, level: int) -> bytes | None:
    """Stored bytes of ``data`` as ``choice``'s chain of ``base`` plus residual, or None
    when the chain does not apply after all."""
    try:
        return encode(BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, data, base=base, level=level,
                      derive=(choice.chain, choice.base_dtype, choice.base_shape))
    except TransformMismatch:
        return None


class LayoutStore:
    """Adds layout blobs to a writer, each against the first plain layout of its file kind
    when that is smaller (references are never themselves references: depth 1). With
    ``raw_only`` (the serving layout) the same choice is made, then a self-contained winner
    is kept raw, so that both layouts hold the same references."""

    def __init__(self, writer: BundleWriter, level: int, enabled: bool = True,
                 raw_only: bool = False) -> None:
        self.writer = writer
        self.level = level
        self.enabled = enabled
        self.raw_only = raw_only
        self.refs: dict[str, tuple[str, bytes]] = {}

    def seed(self, digest: str, layout: bytes, kind: str) -> None:
        """Take ``layout``, a plain blob the writer holds already (``add`` copies the
        bundle's), as the reference for files of ``kind`` unless there is one."""
        if self.enabled and layout and kind not in self.refs:
            self.refs[kind] = (digest, layout)

    def add(self, digest: str, layout: bytes, kind: str) -> None:
        if digest in self.writer:
            return
        n = len(layout)
        enc, stored, base = BlobEncoding.ZSTD, zstd_compress(layout, self.level), None
        ref = self.refs.get(kind) if self.enabled else None
        if ref is not None and n:
            against = encode(BlobEncoding.ZSTD_REF, layout, base=ref[1], level=self.level)
            if len(against) < len(stored) and n <= MAX_ZSTD_RATIO * len(against):
                enc, stored, base = BlobEncoding.ZSTD_REF, against, ref[0]
        if base is None and (self.raw_only or (len(stored) >= n and raw_worth_its_alignment(n))):
            enc, stored = BlobEncoding.RAW, layout
        self.writer.add_blob(digest, enc, stored, n, base=base)
        if base is None and kind not in self.refs and n:
            self.refs[kind] = (digest, layout)

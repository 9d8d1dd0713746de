"""Which tensors could equal another one: the cheap screen before full hashing.

``analyze`` needs the classes of equal tensors, not every tensor's digest (its report
prints the digests of shared groups only). Two tensors can be equal only if their byte
lengths are equal and so are their bytes at three sampled places (start, middle, end).
The screen reads those samples, the order duplicate finders (fdupes, rmlint) take: size,
then a partial hash, then the full hash of what is still undecided. Each tensor ends as
one of:

- **set apart**: no other tensor shares its length and samples, so it equals none. It
  gets a placeholder digest, ``DISTINCT_PREFIX`` and its place, that no blake3 hex digest
  can equal: a unique content key, which is all the overlap, drift and derivation
  reports ask of it. Never printed (only shared groups' digests are);
- **undecided**: the rest, hashed in full by :func:`.scan.hash_models`. A tensor under
  ``SAMPLED_FROM`` bytes is not sampled: three scattered reads would cost a disk or a
  network file system more than reading it whole in file order.

On the corpus's 18 models 946 of 1,508 MB stay undecided (every copy of a shared tensor
does); fine-tunes, other precisions and lone shapes are set apart.

``pack`` and the incremental index need true digests of every tensor and never screen.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .._fs import InputFile
from ..format.bundle.hashing import hash_bytes
from ..format.checkpoints.records import SourceFile
from .work_units import FileStamp

#: Bytes read at each of the three sampled places of a tensor.
SAMPLE_BYTES = 4096

#: Tensors from this size up are sampled (their samples are at most 4.7 % of them).
SAMPLED_FROM = 256 << 10

#: How a placeholder digest starts (a blake3 hex digest is 64 characters of [0-9a-f]).
DISTINCT_PREFIX = "distinct:"

#: How a sampled tensor's digest starts until its full hash replaces it (the digest of
#: its samples follows), and what an unsampled one's is.
SAMPLED_PREFIX = "sampled:"
UNSAMPLED = "unsampled"


@dataclass(slots=True)
class Screen:
    """What the screen found for the weight files of a scan, in scan order.

    ``digests[n][i]`` is tensor ``i`` of file ``n``'s placeholder (set apart) or, until
    it is hashed in full, what the screen knows of it; ``undecided[n]`` lists the
    tensors still to hash, in file order; ``stamps[n]`` is the file's stamp (of its real
    path) taken before the screen read it, None for a file without tensors. The hash
    pass plans with these stamps, so that a file changed after the screen is told
    (:func:`.scan.hash_models`).
    """

    digests: list[list[str]]
    undecided: list[list[int]]
    stamps: list[FileStamp | None]


def screen_files(files: Sequence[SourceFile]) -> Screen:
    """Screen the tensors of ``files`` (all of a scan's weight files, since a tensor may
    equal one in any file, its own included)."""
    lengths = Counter(t.length for f in files for t in f.tensors)
    sample = bytearray(3 * SAMPLE_BYTES)  # one buffer for every tensor's three places
    places = [memoryview(sample)[k * SAMPLE_BYTES:(k + 1) * SAMPLE_BYTES] for k in range(3)]
    digests: list[list[str]] = []
    stamps: list[FileStamp | None] = []
    for n, f in enumerate(files):
        stamps.append(FileStamp.of(os.path.realpath(f.abs_path)) if f.tensors else None)
        got = []
        src: InputFile | None = None
        try:
            for i, t in enumerate(f.tensors):
                if lengths[t.length] == 1:
                    got.append(f"{DISTINCT_PREFIX}{n}.{i}")
                    continue
                if t.length < SAMPLED_FROM:
                    got.append(UNSAMPLED)
                    continue
                src = src or InputFile(f.abs_path)
                mid = t.offset + (t.length - SAMPLE_BYTES) // 2
                for place, at in zip(places, (t.offset, mid,
                                              t.offset + t.length - SAMPLE_BYTES)):
                    src.read_into(place, at)
                got.append(SAMPLED_PREFIX + hash_bytes(sample))
        finally:
            if src is not None:
                src.close()
        digests.append(got)
    classes = Counter((t.length, d) for f, ds in zip(files, digests)
                      for t, d in zip(f.tensors, ds) if d.startswith(SAMPLED_PREFIX))
    undecided: list[list[int]] = []
    for n, f in enumerate(files):
        ds = digests[n]
        keep = []
        for i, t in enumerate(f.tensors):
            if ds[i] == UNSAMPLED or (ds[i].startswith(SAMPLED_PREFIX)
                                      and classes[t.length, ds[i]] > 1):
                keep.append(i)
            elif ds[i].startswith(SAMPLED_PREFIX):
                ds[i] = f"{DISTINCT_PREFIX}{n}.{i}"
        undecided.append(keep)
    return Screen(digests, undecided, stamps)

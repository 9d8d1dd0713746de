"""On-disk constants of the bundle format (``.tdd``), version 1. See spec/FORMAT.md.

Every on-disk enum is an ``IntEnum`` with explicit numbers, and per-enum tables are keyed
by the enum, as gguf-py does. ``tests/test_spec.py`` checks these against the spec's tables.
"""

from __future__ import annotations

import struct
from enum import Enum, IntEnum

#: First 8 bytes of every bundle.
MAGIC = b"TDEDUPB\x00"
#: First 8 bytes of the footer (the last FOOTER_SIZE bytes of the bundle).
FOOTER_MAGIC = b"TDDFOOT\x00"
FORMAT_MAJOR = 1
FORMAT_MINOR = 2
#: Raw blobs start at a multiple of this (mmap-able, page-aligned for the device copy).
RAW_ALIGNMENT = 4096
#: Every other blob, and the manifest, start at a multiple of this.
BLOB_ALIGNMENT = 64
HEADER_SIZE = 64
FOOTER_SIZE = 96
#: Longest chain of delta blobs (a delta whose base is a delta, ...). 1 = base is never a delta.
MAX_DELTA_DEPTH = 4
#: Readers refuse manifests that decode to more than this (a bomb, or not ours).
MAX_MANIFEST_BYTES = 1 << 30
#: Deepest nesting of JSON arrays and objects a reader accepts (the outermost is 1).
MAX_JSON_DEPTH = 64
#: The byte width an element of a byte-plane blob may have.
MAX_PLANE_WIDTH = 16
# The writer's zstd level (not a format fact: any level decodes). Here rather than in
# codecs/zstd.py so that the CLI can show it without importing zstandard (start-up time).
DEFAULT_LEVEL = 1  # on float planes level 1 beats 3 in size and is 2x faster (bench/RESULTS.md)

# Header: magic, major u16, minor u16, raw alignment u32, reserved (zero) to 64 bytes.
HEADER_STRUCT = struct.Struct("<8sHHI48x")
HEADER_FIELDS_SIZE = struct.calcsize("<8sHHI")  # bytes [16, 64) are reserved, zero
# Footer: magic, major, minor, manifest encoding u32, manifest offset u64, stored length u64,
# decoded length u64, blake3 of the stored manifest (32 bytes), 16 reserved (zero) bytes,
# and the first 8 bytes of blake3 over the 88 bytes before it.
FOOTER_BODY_STRUCT = struct.Struct("<8sHHIQQQ32s16x")
FOOTER_CHECK_SIZE = 8
assert HEADER_STRUCT.size == HEADER_SIZE
assert FOOTER_BODY_STRUCT.size + FOOTER_CHECK_SIZE == FOOTER_SIZE


class BlobEncoding(IntEnum):
    """How a blob's stored bytes turn into its decoded bytes.

    0-15 and 32 up are self-contained encodings; 16-31 are delta encodings, which need the
    decoded bytes of the blob named by the record's ``base`` (layouts in
    ``format.codecs.delta``):

    - ``XOR_BYTEPLANE_ZSTD``: byte planes of ``data XOR base``;
    - ``SUB_BYTEPLANE_ZSTD``: byte planes of ``data - base`` on unsigned integers of the
      element width (1, 2, 4 or 8 bytes);
    - ``ZIGZAG_SUB_BYTEPLANE_ZSTD`` (18): the same difference zigzagged, so that small
      negative differences keep the high planes zero;
    - ``DECAY_SUB_BYTEPLANE_ZSTD`` (19): ``c``, ``k``, then byte planes of ``zigzag(data - P)``,
      ``P`` = the F32 base multiplied ``k`` times by ``c`` (AdamW weight decay of rows that
      got no gradient; ``k = 1`` a rescale);
    - ``LOWRANK_SUB_BYTEPLANE_ZSTD`` (20): rows, cols, rank, factors ``U``, ``V``, then byte
      planes of ``zigzag(data - P)``, ``P = float32(base + U @ V)`` summed in float64 (a
      merged LoRA).
    - ``DERIVED_XOR_BYTEPLANE_ZSTD`` (24, since 1.1): a transform chain applied to the base
      (a cast, a ggml quantization...; ``format.codecs.transforms``), then byte planes of
      ``data XOR prediction``; the base may have any length.
    - ``ZSTD_REF`` (25, since 1.1): one zstd frame with the base as a raw-content
      dictionary (a file's layout bytes against another file's).

    ``ROTATED_BYTEPLANE_ZSTD`` (32, self-contained): every element of 2 or 4 bytes rotated
    left by one bit, then byte planes: the sign goes to bit 0, so the 8 exponent bits of
    an F32 or BF16 fill the top byte and compress as one symbol (ZipNN's byte grouping).
    ``ROTATEDN_BYTEPLANE_ZSTD`` (33, since 1.2): the rotation (u32), then the elements
    rotated left by that many bits as byte planes: by three, the top plane of an F32 or
    BF16 takes the mantissa's leading bits too and the lowest plane the exponent's
    constant top bits, 0.3-0.6 % smaller than by one on trained weights.
    """

    RAW = 0
    ZSTD = 1
    BYTEPLANE_ZSTD = 2
    XOR_BYTEPLANE_ZSTD = 16
    SUB_BYTEPLANE_ZSTD = 17
    ZIGZAG_SUB_BYTEPLANE_ZSTD = 18
    DECAY_SUB_BYTEPLANE_ZSTD = 19
    LOWRANK_SUB_BYTEPLANE_ZSTD = 20
    DERIVED_XOR_BYTEPLANE_ZSTD = 24
    ZSTD_REF = 25
    ROTATED_BYTEPLANE_ZSTD = 32
    ROTATEDN_BYTEPLANE_ZSTD = 33

    @property
    def is_delta(self) -> bool:
        return 16 <= self < 32

    @property
    def any_length_base(self) -> bool:
        """Whether the base may differ in length (a transform's or a reference's base)."""
        return self in (BlobEncoding.DERIVED_XOR_BYTEPLANE_ZSTD, BlobEncoding.ZSTD_REF)


class ManifestEncoding(IntEnum):
    """How the manifest's stored bytes turn into UTF-8 JSON."""

    JSON = 0
    ZSTD_JSON = 1



class BundleLayout(str, Enum):
    """How a bundle stores its self-contained blobs (spec §10.1; informative, recorded as
    the manifest's ``summary.layout``). Delta blobs are stored alike in both.

    - ``COMPACT``: the smallest of byte-plane zstd, zstd and raw (``pack``'s default);
    - ``SERVING``: every self-contained blob ``RAW`` (aligned to ``raw_alignment``), so a
      load maps it and hands it to the device with no decoding.
    """

    COMPACT = "compact"
    SERVING = "serving"

"""``convert``: re-lay an existing bundle in another layout, without re-planning.

A bundle's *layout* (spec/FORMAT.md §10.1, recorded in ``summary.layout``) says how its
self-contained blobs are stored: ``compact`` compresses them (the smallest of byte-plane
zstd / zstd / raw), ``serving`` keeps every one ``RAW`` and aligned, so that a load maps
it and hands it to the device with no decoding. Delta blobs are the same in both layouts.

Converting decodes each compressed self-contained blob once (to ``serving``) or encodes
each raw one once (to ``compact``); every delta blob is copied byte for byte, so the
deduplication and delta plan of the original pack are kept exactly. Every blob's stored
checksum is checked before it is used, and every decoded blob's hash after decoding; the
output is written under a temporary name, fsynced and renamed (``BundleWriter``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..errors import OutputExistsError, UsageError
from ..format.bundle.constants import BlobEncoding, BundleLayout
from ..format.bundle.hashing import hash_bytes
from ..format.bundle.manifest import BlobRecord, Manifest
from ..format.bundle.reader import Bundle
from ..format.bundle.writer import BundleWriter
from ..format.checkpoints.dtypes import element_width
from ..format.codecs import DEFAULT_LEVEL
from . import ProgressFn
from .ordered import in_order
from .pack import ROTATED_DTYPES, choose_encoding, parse_layout


@dataclass(slots=True)
class ConvertResult:
    """What ``convert`` wrote."""

    path: Path
    layout: str
    source_bytes: int
    bundle_bytes: int
    seconds: float
    decoded: int = 0  # self-contained blobs decoded to RAW
    encoded: int = 0  # RAW blobs compressed
    copied: int = 0  # blobs copied byte for byte (deltas, blobs already in the layout)
    encodings: dict[str, int] = field(default_factory=dict)


def layout_of(manifest: Manifest) -> str:
    """The layout a bundle records (``summary.layout``); for a bundle written before the
    field existed, ``compact`` when any self-contained blob is compressed, else ``serving``."""
    recorded = manifest.summary.get("layout")
    if recorded in {x.value for x in BundleLayout}:
        return str(recorded)
    compressed = any(r.base is None and r.encoding is not BlobEncoding.RAW
                     for r in manifest.blobs.values())
    return BundleLayout.COMPACT.value if compressed else BundleLayout.SERVING.value


def _dtypes(manifest: Manifest) -> dict[str, str]:
    """The dtype each tensor blob is first used as (it sets the byte-plane width and
    whether the planes are rotated, as pack decides)."""
    out: dict[str, str] = {}
    for m in manifest.models:
        for f in m.files:
            for t in f.tensors:
                out.setdefault(t.hash, t.dtype)
    return out


def _check_paths(source: Path, output: Path, force: bool) -> None:
    if output.exists() or output.is_symlink():
        try:
            same = output.resolve() == source.resolve() or os.path.samefile(output, source)
        except OSError:
            same = False
        if same:
            raise UsageError("the output is the bundle being converted",
                             path=output, hint="write to another file, then rename it")
        if not force:
            raise OutputExistsError("the output exists", path=output,
                                    hint="pass --force to replace it")
        if output.is_dir():
            raise UsageError("the output is a folder", path=output)


def convert(bundle_path: str | os.PathLike, output: str | os.PathLike,
            layout: str | BundleLayout, *,
            force: bool = False, level: int = DEFAULT_LEVEL, workers: int = 2,
            progress: ProgressFn | None = None) -> ConvertResult:
    """Write ``bundle_path``'s models to ``output`` in ``layout`` (``"serving"`` or
    ``"compact"``) without re-planning: same blobs, same deltas, other encodings for the
    self-contained blobs. Refuses an existing output unless ``force``, and the source."""
    t0 = time.perf_counter()
    target = parse_layout(layout)
    source, output = Path(bundle_path), Path(output)
    _check_paths(source, output, force)
    report = progress or (lambda phase, n, total: None)
    with Bundle(source, cache_bytes=0) as b:
        dtypes = _dtypes(b.manifest)
        recs = list(b.manifest.blobs.values())
        total = sum(r.decoded_length for r in recs)
        result = ConvertResult(output, target.value, b.size, 0, 0.0)

        def job(rec: BlobRecord):
            b.check_stored(rec)
            stored = b.stored_bytes(rec)
            if rec.base is not None:
                return rec, rec.encoding, stored, "copied"
            if target is BundleLayout.SERVING:
                if rec.encoding is BlobEncoding.RAW:
                    return rec, rec.encoding, stored, "copied"
                data = b.read_blob(rec.hash)
                if hash_bytes(data) != rec.hash:
                    raise b.corrupt(rec.hash, "decoded bytes do not match their hash "
                                              "(corrupted)")
                return rec, BlobEncoding.RAW, data, "decoded"
            if rec.encoding is not BlobEncoding.RAW:
                return rec, rec.encoding, stored, "copied"
            dtype = dtypes.get(rec.hash, "U8")
            enc, out, _ = choose_encoding(stored, element_width(dtype), level,
                                          rotate=dtype in ROTATED_DTYPES)
            return rec, enc, out, "encoded" if enc is not BlobEncoding.RAW else "copied"

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                BundleWriter(output, alignment=b.manifest.alignment, replace=force) as writer:
            for rec, enc, stored, how in in_order(pool, job, recs, workers=workers,
                                                  size=lambda rec: rec.decoded_length):
                writer.add_blob(rec.hash, enc, stored, rec.decoded_length, base=rec.base)
                setattr(result, how, getattr(result, how) + 1)
                if rec.hash in dtypes:  # tensor blobs, as pack's summary counts them
                    name = enc.name.lower()
                    result.encodings[name] = result.encodings.get(name, 0) + 1
                report("converting", rec.decoded_length, total)
            summary = dict(b.manifest.summary)
            summary.update(layout=target.value, encodings=result.encodings,
                           stored_blob_bytes=sum(r.stored_length
                                                 for r in writer.blobs.values()))
            manifest = Manifest(b.manifest.models, {}, tool_version=__version__,
                                summary=summary)
            result.bundle_bytes = writer.finish(manifest, level=level, validate=True)
    result.seconds = time.perf_counter() - t0
    return result

"""``verify``: check a bundle completely, without writing anything."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .._fs import worker_threads
from ..format.bundle.manifest import FileEntry, ModelEntry
from ..format.bundle.reader import Bundle
from . import ProgressFn


@dataclass(slots=True)
class VerifyResult:
    blobs: int
    files: int
    stored_bytes: int
    logical_bytes: int
    seconds: float


def verify(bundle_path: str | os.PathLike, *, files: bool = True,
           progress: ProgressFn | None = None, workers: int | None = None) -> VerifyResult:
    """Check a bundle completely: structure, padding, every blob's checksum and hash, and
    (``files``) every original file's sha256 as it would be restored.

    Blobs, then files, are checked side by side on ``workers`` threads (every core, up to 8, by
    default: zstd, numpy, blake3 and sha256 release the GIL); when several fail, the
    error is the first in the manifest's order, as one thread would have found it."""
    t0 = time.perf_counter()
    report = progress or (lambda phase, n, total: None)
    with Bundle(bundle_path, mapped=False) as bundle, \
            ThreadPoolExecutor(max(1, workers or worker_threads())) as pool:
        bundle.check_padding()
        blobs = bundle.manifest.blobs
        stored = sum(b.stored_length for b in blobs.values())

        def check_blob(digest: str) -> None:
            bundle.verify_blob(digest)
            report("blobs", blobs[digest].stored_length, stored)

        try:
            list(pool.map(check_blob, blobs))  # raises the first failure in order
            logical = 0
            if files:
                total = sum(m.file_bytes for m in bundle.manifest.models)
                pairs = [(m, f) for m in bundle.manifest.models for f in m.files]
                for size in pool.map(lambda mf: _check_file(bundle, mf[0], mf[1], report, total),
                                     pairs):
                    logical += size
        finally:
            pool.shutdown(cancel_futures=True)
    return VerifyResult(len(blobs), sum(len(m.files) for m in bundle.manifest.models), stored,
                        logical, time.perf_counter() - t0)


def _check_file(bundle: Bundle, m: ModelEntry, f: FileEntry, report, total: int) -> int:
    """Read one original file as it would be restored, against its sha256."""
    for _ in bundle.iter_file_checked(f, f"model {m.name!r} file {f.path!r}"):
        pass
    report("files", f.size, total)
    return f.size

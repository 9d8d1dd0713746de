"""``verify``: check a bundle completely, without writing anything."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

from ..errors import IntegrityError
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
           progress: ProgressFn | None = None) -> VerifyResult:
    """Check a bundle completely: structure, padding, every blob's checksum and hash, and
    (``files``) every original file's sha256 as it would be restored."""
    t0 = time.perf_counter()
    report = progress or (lambda phase, n, total: None)
    with Bundle(bundle_path, mapped=False) as bundle:
        bundle.check_padding()
        blobs = bundle.manifest.blobs
        stored = sum(b.stored_length for b in blobs.values())
        for digest, rec in blobs.items():
            bundle.verify_blob(digest)
            report("blobs", rec.stored_length, stored)
        logical = 0
        if files:
            total = sum(m.file_bytes for m in bundle.manifest.models)
            for m in bundle.manifest.models:
                for f in m.files:
                    h = hashlib.sha256()
                    for chunk in bundle.iter_file_chunks(f):
                        h.update(chunk)
                    if h.hexdigest() != f.sha256:
                        raise IntegrityError(f"model {m.name!r} file {f.path!r} would not "
                                             "restore to its sha256", path=bundle.path)
                    logical += f.size
                    report("files", f.size, total)
    return VerifyResult(len(blobs), sum(len(m.files) for m in bundle.manifest.models), stored,
                        logical, time.perf_counter() - t0)


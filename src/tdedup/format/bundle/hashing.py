"""BLAKE3, as the format uses it (spec §4.5): a blob's name is the hex digest of its
decoded bytes, its checksum that of its stored bytes."""

from __future__ import annotations

import blake3

# Below this, blake3's thread pool costs more than it saves. Measured on the corpus
# (bench/analyze.py --profile): 1 MiB left MiniLM's 590 kB attention matrices on one core
# and cost ~15% of the hashing pass; 64 KiB and 0 were alike.
THREADED_MIN_BYTES = 1 << 16


def hash_bytes(data) -> str:
    """blake3 hex digest of a bytes-like object (threaded when large)."""
    n = memoryview(data).nbytes
    if n >= THREADED_MIN_BYTES:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


def hash_chunks(chunks, max_threads: int = blake3.blake3.AUTO) -> str:
    """blake3 hex digest of the concatenation of ``chunks`` (bytes-like), so that a large
    range is hashed without being held whole; on every core unless ``max_threads`` says
    otherwise (callers that hash several ranges side by side pass 1)."""
    h = blake3.blake3(max_threads=max_threads)
    for c in chunks:
        h.update(c)
    return h.hexdigest()

"""A Hugging Face hub cache built offline, laid out as huggingface_hub lays it out:
``models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>,
refs/<ref>}``, the etag of a weight file being its sha256 (an LFS file) and of another
file its git blob sha1. ``huggingface_hub.scan_cache_dir`` reads it back as a real cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(name: str, data: bytes) -> str:
    lfs = name.endswith((".safetensors", ".bin", ".gguf"))
    return hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)


def add_revision(cache: Path, repo_id: str, commit: str, folder: Path,
                 refs: tuple[str, ...] = ()) -> Path:
    """Put every file of ``folder`` into the cache as revision ``commit`` of ``repo_id``;
    returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        data = src.read_bytes()
        blob = repo / "blobs" / etag(src.name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def build_cache(root: Path, folders: dict[str, Path]) -> Path:
    """A cache of two repos sharing weights and one repo with two revisions:

    - ``org/bert``: ``v1`` = ``folders["base"]`` (ref ``v1``), ``main`` = ``folders["ft"]``;
    - ``other/bert-copy``: ``main`` = ``folders["base"]`` again (same weights, other repo).
    """
    cache = root / "hub"
    add_revision(cache, "org/bert", commit_of("org/bert v1"), folders["base"], ("v1",))
    add_revision(cache, "org/bert", commit_of("org/bert main"), folders["ft"], ("main",))
    add_revision(cache, "other/bert-copy", commit_of("other main"), folders["base"], ("main",))
    return cache

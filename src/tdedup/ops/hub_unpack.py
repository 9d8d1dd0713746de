"""``unpack --hf-cache``: restore models packed from the Hugging Face cache back into a
cache layout, so that ``from_pretrained("org/name", local_files_only=True)`` finds them
offline on the machine that received the bundle.

The layout is huggingface_hub's: ``models--org--name/blobs/<etag>`` holds each file once,
``snapshots/<commit>/<path>`` is a relative symlink to its blob, ``refs/<ref>`` holds the
commit. Files are first restored (sha256-checked) by :func:`unpack` into a temporary folder
inside the cache, then renamed into ``blobs/``; refs are written atomically last, so a
reader never follows a ref to a snapshot that is not complete. A blob already in the
cache is kept only when its sha256 is the manifest's; any other is replaced atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .._fs import fsync_dir, open_regular, open_temp
from ..errors import OutputError, TdedupError, UsageError
from ..format.bundle.manifest import HUB_BLOB_RE, FileEntry, ModelEntry
from ..format.bundle.reader import Bundle
from ..format.checkpoints.records import model_folder
from . import ProgressFn
from .unpack import UnpackResult, unpack

_READ = 1 << 20


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """huggingface_hub's folder name for a model repo: ``models--org--name``."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def _same_content(blob: Path, size: int, sha256: str) -> bool:
    """Whether the cache blob ``blob`` (links followed: hub blobs may link to a shared
    store) is a regular file of ``size`` bytes whose sha256 is ``sha256``."""
    try:
        fd = open_regular(blob)
    except TdedupError:  # missing, unreadable, a folder or a FIFO: not this content
        return False
    try:
        if os.fstat(fd).st_size != size:
            return False
        h = hashlib.sha256()
        while chunk := os.read(fd, _READ):
            h.update(chunk)
        return h.hexdigest() == sha256
    except OSError:
        return False
    finally:
        os.close(fd)


def _link(link: Path, blob: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            raise OutputError("exists and is a folder", path=link)
        link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)


def _write_ref(ref: Path, commit: str) -> None:
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp, f = open_temp(ref)
    with f:
        f.write(commit.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ref)


def _etag(f: FileEntry) -> str:
    """The cache blob name of ``f``: the etag recorded at pack time, else its sha256 (an
    LFS file's etag)."""
    etag = f.info.get("hub_blob")
    return etag if isinstance(etag, str) and HUB_BLOB_RE.fullmatch(etag) else f.sha256


def _restore_model(m: ModelEntry, staged: Path, cache_dir: Path) -> None:
    """Move ``m``'s staged files into its repo's blobs (unless a blob with the same sha256
    is there), link its snapshot, then write its refs."""
    hub = m.hub
    assert hub is not None
    repo = repo_folder(cache_dir, hub["repo_id"])
    snapshot = repo / "snapshots" / hub["commit"]
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    checked: set[str] = set()
    for f in m.files:
        etag = _etag(f)
        blob = repo / "blobs" / etag
        if etag not in checked and not _same_content(blob, f.size, f.sha256):
            try:
                os.replace(staged / f.path, blob)
            except IsADirectoryError:
                raise OutputError("exists and is a folder", path=blob) from None
            except OSError as e:
                raise OutputError(f"cannot rename into place: {e.strerror or e}",
                                  path=blob) from e
        checked.add(etag)
        _link(snapshot / f.path, blob)
    fsync_dir(repo / "blobs")
    for ref in hub["refs"]:
        _write_ref(repo / "refs" / ref, hub["commit"])


def unpack_to_cache(bundle_path: str | os.PathLike, cache_dir: str | os.PathLike, *,
                    models: Sequence[str] | None = None, progress: ProgressFn | None = None
                    ) -> UnpackResult:
    """Restore the chosen models (default: all) into the hub cache ``cache_dir``; every
    file's sha256 is checked, whether restored or found in the cache."""
    t0 = time.perf_counter()
    cache = Path(cache_dir)
    with Bundle(bundle_path) as b:
        chosen = [b.model(n) for n in (models or b.model_names)]
    plain = [m.name for m in chosen if m.hub is None]
    if plain:
        raise UsageError(f"model {plain[0]!r} was not packed from the Hugging Face cache, so "
                         "it has no repo id or commit to restore", path=bundle_path,
                         hint="choose hub models with --model, or unpack into a folder")
    if cache.exists() and not cache.is_dir():
        raise OutputError("the cache is not a folder", path=cache)
    cache.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tdedup-stage-", dir=cache))
    try:
        r = unpack(bundle_path, stage, models=[m.name for m in chosen], progress=progress)
        for m in chosen:
            _restore_model(m, stage / model_folder(m.name), cache)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return UnpackResult(cache, r.models, r.files, r.bytes, time.perf_counter() - t0)

"""``unpack --hf-cache``: restore models packed from the Hugging Face cache back into a
cache layout, so that ``from_pretrained("org/name", local_files_only=True)`` finds them
offline on the machine that received the bundle.

The layout is huggingface_hub's: ``models--org--name/blobs/<etag>`` holds each file once,
``snapshots/<commit>/<path>`` is a relative symlink to its blob, ``refs/<ref>`` holds the
commit. Files are first restored (sha256-checked) by :func:`unpack` into a staging folder
inside each repo folder (where ``scan_cache_dir`` never looks, and on the file system of
its ``blobs/``), then renamed into ``blobs/``; refs are written atomically last, so a
reader never follows a ref to a snapshot that is not complete. A blob already in the
cache is kept only when its sha256 is the manifest's; any other is replaced atomically.

A staging folder is held by a lock file beside it (an :func:`open_temp` temporary: the
run's process id in its name, locked while open). A run killed outright leaves both
behind; later runs remove the folders whose lock :func:`remove_stale_temps` finds stale.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .._fs import (
    TEMP_NAME_RE,
    forget_temp,
    fsync_dir,
    open_regular,
    open_temp,
    remove_stale_temps,
    temp_name_matches,
)
from ..errors import OutputError, TdedupError, UsageError
from ..format.bundle.manifest import HUB_BLOB_RE, FileEntry, ModelEntry
from ..format.bundle.reader import Bundle
from ..format.checkpoints.records import model_folder
from . import ProgressFn
from .unpack import UnpackResult, unpack

#: A staging folder's name: the run's process id and a random tag.
STAGE_RE = re.compile(r"\.tdedup-stage-[0-9]+-[0-9a-f]{8}\Z")
_READ = 1 << 20


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """huggingface_hub's folder name for a model repo: ``models--org--name``."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def remove_stale_stages(repo: Path) -> list[Path]:
    """Remove the staging folders that runs killed outright left in ``repo``: those whose
    lock file is gone or stale (its process dead, its lock free). A live run's lock file
    exists from before its folder is made until after it is removed."""
    try:
        entries = list(os.scandir(repo))
        stages = [e.name for e in entries
                  if STAGE_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        # Locks too whose folder is gone (a run killed between removing the two).
        held = {m["name"] for e in entries if (m := TEMP_NAME_RE.match(e.name))
                and STAGE_RE.fullmatch(m["name"])}
        if not stages and not held:
            return []
        remove_stale_temps(repo, set(stages) | held)
        locks = [e.name for e in os.scandir(repo) if TEMP_NAME_RE.match(e.name)]
    except OSError:
        return []
    removed = []
    for name in stages:
        if not any(temp_name_matches(lock, name) for lock in locks):
            shutil.rmtree(repo / name, ignore_errors=True)
            removed.append(repo / name)
    return removed


@contextmanager
def _staging(repo: Path) -> Iterator[Path]:
    """A fresh staging folder in ``repo`` (made, with ``blobs/`` and ``snapshots/``, if
    missing), held by its lock file while in use."""
    stage = repo / f".tdedup-stage-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        # snapshots/ too: a repo folder without it is "corrupted" to scan_cache_dir.
        for sub in ("blobs", "snapshots"):
            (repo / sub).mkdir(parents=True, exist_ok=True)
        lock, f = open_temp(stage)  # first: the folder never exists without its lock
    except OSError as e:
        raise OutputError(f"cannot write into the cache: {e.strerror or e}", path=repo) from e
    try:
        try:
            try:
                stage.mkdir()
            except OSError as e:
                raise OutputError(f"cannot write into the cache: {e.strerror or e}",
                                  path=stage) from e
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        f.close()
        lock.unlink(missing_ok=True)
        forget_temp(lock)


def _same_content(blob: Path, size: int, sha256: str, advance) -> bool:
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
            advance(len(chunk))
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
    # A killed run's temporary here would read as a ref to scan_cache_dir.
    remove_stale_temps(ref.parent, {ref.name})
    tmp, f = open_temp(ref)
    with f:
        f.write(commit.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ref)
    forget_temp(tmp)


def _etag(f: FileEntry) -> str:
    """The cache blob name of ``f``: the etag recorded at pack time, else its sha256 (an
    LFS file's etag)."""
    etag = f.info.get("hub_blob")
    return etag if isinstance(etag, str) and HUB_BLOB_RE.fullmatch(etag) else f.sha256


def _restore_model(m: ModelEntry, staged: Path, repo: Path, checked: set[str],
                   advance) -> None:
    """Move ``m``'s staged files into ``repo``'s blobs (unless a blob with the same sha256
    is there), link its snapshot, then write its refs. ``checked``: blobs already found
    or made right in this run."""
    hub = m.hub
    assert hub is not None
    snapshot = repo / "snapshots" / hub["commit"]
    for f in m.files:
        etag = _etag(f)
        blob = repo / "blobs" / etag
        if etag not in checked and not _same_content(blob, f.size, f.sha256, advance):
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


def _cached_bytes(repos: dict[Path, list[ModelEntry]]) -> int:
    """Bytes of the blobs already in the cache that would be read to check them."""
    sizes = {}
    for repo, group in repos.items():
        for m in group:
            for f in m.files:
                blob = repo / "blobs" / _etag(f)
                try:
                    if os.stat(blob).st_size == f.size:
                        sizes[blob] = f.size
                except OSError:
                    pass
    return sum(sizes.values())


def unpack_to_cache(bundle_path: str | os.PathLike, cache_dir: str | os.PathLike, *,
                    models: Sequence[str] | None = None, progress: ProgressFn | None = None
                    ) -> UnpackResult:
    """Restore the chosen models (default: all) into the hub cache ``cache_dir``; every
    file's sha256 is checked, whether restored or found in the cache."""
    t0 = time.perf_counter()
    cache = Path(cache_dir)
    report = progress or (lambda phase, n, total: None)
    with Bundle(bundle_path) as b:
        chosen = [b.model(n) for n in (models or b.model_names)]
        plain = [m.name for m in chosen if m.hub is None]
        if plain:
            raise UsageError(f"model {plain[0]!r} was not packed from the Hugging Face cache, "
                             "so it has no repo id or commit to restore", path=bundle_path,
                             hint="choose hub models with --model, or unpack into a folder")
        repos: dict[Path, list[ModelEntry]] = {}
        for m in chosen:
            assert m.hub is not None
            repos.setdefault(repo_folder(cache, m.hub["repo_id"]), []).append(m)
        # One unpack per repo folder: the phases' totals are those of all of them.
        totals = {"checking": sum(b.blob(d).stored_length for g in repos.values()
                                  for d in b.manifest.blobs_of(g)),
                  "restoring": sum(m.file_bytes for m in chosen)}
    if cache.exists() and not cache.is_dir():
        raise OutputError("the cache is not a folder", path=cache)
    if cache.is_dir():
        for repo in cache.glob("models--*"):
            if repo.is_dir() and not repo.is_symlink():
                remove_stale_stages(repo)
    files = written = 0
    with ExitStack() as stack:
        stages = {}
        for repo, group in repos.items():
            stage = stages[repo] = stack.enter_context(_staging(repo))
            r = unpack(bundle_path, stage, models=[m.name for m in group],
                       progress=lambda phase, n, total: report(phase, n,
                                                               totals.get(phase, total)))
            files, written = files + r.files, written + r.bytes
        in_cache = _cached_bytes(repos)
        checked: set[str] = set()
        for repo, group in repos.items():
            checked.clear()
            for m in group:
                _restore_model(m, stages[repo] / model_folder(m.name), repo, checked,
                               lambda n: report("checking cache", n, in_cache))
    return UnpackResult(cache, [m.name for m in chosen], files, written,
                        time.perf_counter() - t0)

"""``unpack``: restore original files byte for byte.

``unpack`` checks everything it can *before* it writes a byte: the manifest (paths
included), the zero padding, and the stored checksum of every blob the chosen models
need. Each file is then written to a temporary name beside its target while its sha256
is computed and compared with the manifest; once every file is staged, all are fsynced
and renamed into place (so a failed run replaces nothing).

Every folder is opened relative to its parent's open descriptor without following links
(``O_NOFOLLOW | O_DIRECTORY``), and every file is created, renamed and removed relative
to its folder's descriptor: a folder swapped for a symbolic link at any moment (after
the checks, between two files) makes the run fail, it can never redirect a write.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .._fs import open_dir_at, open_temp_at, remove_stale_temps
from ..errors import IntegrityError, OutputError, OutputExistsError, UnsafePathError
from ..format.bundle.manifest import FileEntry, ModelEntry
from ..format.bundle.reader import Bundle
from ..format.checkpoints.records import model_folder
from . import ProgressFn, check_output_not_input


@dataclass(slots=True)
class UnpackResult:
    dest: Path
    models: list[str]
    files: int
    bytes: int
    seconds: float


@dataclass(slots=True)
class _Job:
    """One file to restore: its folder (parts below dest), name, and full path (for
    messages)."""

    entry: FileEntry
    folder: tuple[str, ...]
    name: str
    target: Path


def _target_checks(dest: Path, models: list[ModelEntry], force: bool, bundle: Path) -> None:
    """Early, friendly refusals: symlinked paths, a non-empty destination without
    ``force``, a target that is the bundle itself. (The writes below enforce the link
    rule again at every step; these checks only make the common case one clear line.)"""
    if dest.is_symlink():
        raise UnsafePathError("the destination is a symbolic link", path=dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError("the destination exists and is not a folder", path=dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise OutputExistsError("the destination folder is not empty",
                                path=dest, hint="pass --force to write into it; files that "
                                "are not in the bundle are never replaced")
    root = dest.resolve() if dest.exists() else None
    for m in models:
        for f in m.files:
            target = dest / model_folder(m.name) / f.path
            p = dest
            for part in (model_folder(m.name), *f.path.split("/")):
                p = p / part
                if p.is_symlink():
                    raise UnsafePathError(f"{m.name}/{f.path} would be written through the "
                                          f"symbolic link {p}", path=dest)
            if root is not None and target.exists():
                if not target.resolve().is_relative_to(root):
                    raise UnsafePathError(f"{m.name}/{f.path} resolves outside the "
                                          "destination", path=dest)
                if not target.is_file():
                    raise OutputError(f"{m.name}/{f.path} exists and is not a file", path=dest)
                check_output_not_input(target, [bundle])


class _Folders:
    """The folders below ``dest``, each opened relative to its parent without following
    links; remembers which ones this run created so that a failed run removes them."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.fds: dict[tuple[str, ...], int] = {}
        self.created: list[tuple[str, ...]] = []
        # Every temporary file, registered the moment it exists (whatever interrupts the
        # run, even between a job's start and its result, it is known and removed).
        self.temps: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        # dest and any missing folders above it (the user's own path), to remove on failure
        self.created_above = [p for p in (dest, *dest.parents) if not os.path.lexists(p)]
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create: {e.strerror or e}", path=dest) from e
        try:
            self.fds[()] = open_dir_at(str(dest))
        except OSError as e:
            raise self._refusal(e, dest) from e

    def _refusal(self, e: OSError, path: Path) -> Exception:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return UnsafePathError(f"{path} is a symbolic link or not a folder: refusing to "
                                   "write through it", path=self.dest)
        return OutputError(f"cannot open: {e.strerror or e}", path=path)

    def open(self, parts: tuple[str, ...]) -> int:
        """The descriptor of folder ``dest/parts`` (created if missing)."""
        fd = self.fds.get(parts)
        if fd is not None:
            return fd
        parent = self.open(parts[:-1])
        path = self.dest.joinpath(*parts)
        try:
            os.mkdir(parts[-1], dir_fd=parent)
            self.created.append(parts)
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f"cannot create: {e.strerror or e}", path=path) from e
        try:
            fd = open_dir_at(parts[-1], parent)
        except OSError as e:
            raise self._refusal(e, path) from e
        self.fds[parts] = fd
        return fd

    def register(self, dir_fd: int, name: str) -> None:
        with self._lock:
            self.temps.append((dir_fd, name))

    def remove_temps(self) -> None:
        """Remove every temporary file of the run still there (renamed ones are gone)."""
        for dir_fd, name in self.temps:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass

    def remove_created(self) -> None:
        """Remove the folders this run created, deepest first, where empty; a step that
        fails (not empty, gone) does not stop the others."""
        for parts in sorted(self.created, key=len, reverse=True):
            try:
                os.rmdir(parts[-1], dir_fd=self.fds[parts[:-1]])
            except OSError:
                pass
        for folder in self.created_above:
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def _stage(folders: _Folders, dir_fd: int, job: _Job, fill: Callable[[object], None]) -> str:
    """Write a file's contents into a temporary file in its folder; return its name.

    No fsync here: the whole run is flushed and renamed in :func:`_commit`, so that the
    kernel writes back early files while later ones are being decoded. OS errors (disk
    full, file too large) become :class:`OutputError` naming the target."""
    try:
        tmp, out = open_temp_at(dir_fd, job.name)
    except OSError as e:
        raise OutputError(f"cannot create: {e.strerror or e}", path=job.target) from e
    folders.register(dir_fd, tmp)
    try:
        with out:
            fill(out)
    except BaseException as e:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"writing failed: {e.strerror or e}", path=job.target) from e
        raise
    return tmp


def _fsync_at(dir_fd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_file(folders: _Folders, bundle: Bundle, job: _Job, dir_fd: int, advance) -> str:
    """Stage one original file from the bundle, its sha256 checked before it is kept."""
    f = job.entry

    def fill(out) -> None:
        for chunk in bundle.iter_file_checked(f, f"restored {f.path}"):
            out.write(chunk)
            advance(memoryview(chunk).nbytes)

    return _stage(folders, dir_fd, job, fill)


def _copy_file(folders: _Folders, src_fd: int, src_name: str, job: _Job, dir_fd: int,
               advance) -> str:
    """Stage a file identical to one already staged (same sha256 *and* blobs): a kernel
    copy of the staged original."""

    def fill(out) -> None:
        src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            remaining = job.entry.size
            while remaining:
                n = os.copy_file_range(src, out.fileno(), remaining)
                if n == 0:
                    raise IntegrityError(f"{src_name} shrank while being copied")
                remaining -= n
        finally:
            os.close(src)
        advance(job.entry.size)

    return _stage(folders, dir_fd, job, fill)


def _run_all(pool: ThreadPoolExecutor, calls: list[tuple]) -> list:
    """Run every call on the pool and wait for all; results in order; raise the first
    error once every call has ended."""
    futures = [pool.submit(*call) for call in calls]
    results, errors = [], []
    interrupt: BaseException | None = None
    # (An interrupt while submitting propagates at once: the caller shuts the pool down,
    # waiting for running jobs, and removes every registered temporary file.)
    for fut in futures:
        while True:
            try:
                result = fut.result()
            except BaseException as e:  # let the others finish (and clean up) first
                if not fut.done():
                    # The wait was interrupted (Ctrl-C, SIGTERM), not the job: it runs on
                    # and its file must be known to be removed. Start no more jobs.
                    interrupt = interrupt or e
                    for other in futures:
                        other.cancel()
                    continue
                errors.append(e)
            else:
                results.append(result)
            break
    if interrupt is not None:
        raise interrupt
    if errors:
        raise errors[0]
    return results


def _same_content_key(f: FileEntry) -> tuple:
    """Files with this key are byte-identical *as stored*: the same sha256 and the same
    blobs. Two files with one sha256 but different blobs are each decoded and checked
    (one of them is corrupted if they differ; verify says the same)."""
    return (f.sha256, f.size, f.layout, tuple((t.offset, t.hash) for t in f.tensors))


def unpack(bundle_path: str | os.PathLike, dest: str | os.PathLike, *,
           models: Sequence[str] | None = None, force: bool = False, workers: int = 2,
           progress: ProgressFn | None = None) -> UnpackResult:
    """Restore each model under ``dest/NAME/`` with its original relative paths.

    Every restored file's sha256 is checked before it takes its name; a run that fails
    removes the files and folders it created (and leaves files that were there before
    untouched or replaced by their verified contents). Raises :class:`OutputExistsError`
    if ``dest`` holds files and not ``force``.
    """
    t0 = time.perf_counter()
    dest = Path(dest)
    report = progress or (lambda phase, n, total: None)
    with Bundle(bundle_path, mapped=False) as bundle:
        chosen = [bundle.model(n) for n in (models or bundle.model_names)]
        _target_checks(dest, chosen, force, bundle.path)
        bundle.check_padding()
        needed = bundle.manifest.blobs_of(chosen)
        stored_total = sum(bundle.blob(d).stored_length for d in needed)
        for d in needed:
            bundle.check_stored(bundle.blob(d))
            report("checking", bundle.blob(d).stored_length, stored_total)
        total = sum(m.file_bytes for m in chosen)
        jobs = []
        for m in chosen:
            for f in m.files:
                *folder, name = (model_folder(m.name), *f.path.split("/"))
                jobs.append(_Job(f, tuple(folder), name, dest / model_folder(m.name) / f.path))
        folders = _Folders(dest)
        fresh: list[_Job] = []
        renamed: set[int] = set()
        try:
            try:
                for job in jobs:
                    fd = folders.open(job.folder)
                    try:
                        os.lstat(job.name, dir_fd=fd)
                    except FileNotFoundError:
                        fresh.append(job)
                # Temporary files that a killed unpack left beside these targets.
                names: dict[tuple[str, ...], set[str]] = {}
                for job in jobs:
                    names.setdefault(job.folder, set()).add(job.name)
                for parts, targets in names.items():
                    if parts not in folders.created:
                        remove_stale_temps(folders.fds[parts], targets)
                advance = lambda n: report("restoring", n, total)  # noqa: E731
                # Identical files are restored once and then copied by the kernel.
                first: dict[tuple, _Job] = {}
                copies, originals = [], []
                for job in jobs:
                    key = _same_content_key(job.entry)
                    if key in first and job.entry.size and hasattr(os, "copy_file_range"):
                        copies.append((first[key], job))
                    else:
                        first.setdefault(key, job)
                        originals.append(job)
                fds = folders.fds
                pool = ThreadPoolExecutor(max_workers=max(1, workers))
                # Each staged file is flushed on a thread of its own while later files
                # decode: a flush waits on the disk, not the CPU (the flushes after the
                # last file took ~0.2 s of 1.0 on the MiniLM family).
                syncer = ThreadPoolExecutor(max_workers=2)
                flushes: list = []

                def staged(fn, j: _Job, *args) -> str:
                    tmp = fn(*args)
                    flushes.append(syncer.submit(_fsync_at, fds[j.folder], tmp))
                    return tmp

                failed = True
                try:
                    tmps = _run_all(pool, [(staged, _restore_file, j, folders, bundle, j,
                                            fds[j.folder], advance) for j in originals])
                    tmp_of = {id(j): t for j, t in zip(originals, tmps)}
                    # Copies read the staged originals, so they start once those are done.
                    tmps += _run_all(pool, [(staged, _copy_file, j, folders, fds[src.folder],
                                             tmp_of[id(src)], j, fds[j.folder], advance)
                                            for src, j in copies])
                    order = originals + [j for _, j in copies]
                    try:
                        for fut in flushes:
                            fut.result()
                    except OSError as e:
                        raise OutputError("flushing the restored files failed: "
                                          f"{e.strerror or e}", path=dest) from e
                    failed = False
                finally:
                    # Running jobs end (their files are registered); queued ones never start.
                    pool.shutdown(wait=True, cancel_futures=failed)
                    syncer.shutdown(wait=True, cancel_futures=failed)
                for j, tmp in zip(order, tmps):
                    at = fds[j.folder]
                    try:
                        os.replace(tmp, j.name, src_dir_fd=at, dst_dir_fd=at)
                    except OSError as e:
                        raise OutputError(f"cannot rename into place: {e.strerror or e}",
                                          path=j.target) from e
                    renamed.add(id(j))
                for fd in {fds[j.folder] for j in jobs}:
                    try:
                        os.fsync(fd)
                    except OSError:
                        pass
            except BaseException:
                # Each step on its own: one that fails does not stop the others.
                folders.remove_temps()
                for job in fresh:
                    if id(job) in renamed:
                        try:
                            os.unlink(job.name, dir_fd=folders.fds[job.folder])
                        except (OSError, KeyError):
                            pass
                folders.remove_created()
                raise
        finally:
            folders.close()
        written = sum(j.entry.size for j in jobs)
    return UnpackResult(dest, [m.name for m in chosen], len(jobs), written,
                        time.perf_counter() - t0)

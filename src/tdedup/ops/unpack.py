"""``unpack``: restore original files byte for byte.

``unpack`` checks everything it can *before* it writes a byte: the manifest (paths
included), the zero padding, and the stored checksum of every blob the chosen models
need. Each file is then written to a temporary name beside its target while its sha256
is computed and compared with the manifest; once every file is staged, all are fsynced
and renamed into place (so a failed run replaces nothing).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .._fs import fsync_dir, open_temp, remove_stale_temps
from ..errors import IntegrityError, OutputError, OutputExistsError, UnsafePathError
from ..format.bundle.manifest import FileEntry, ModelEntry
from ..format.bundle.reader import Bundle
from . import ProgressFn


@dataclass(slots=True)
class UnpackResult:
    dest: Path
    models: list[str]
    files: int
    bytes: int
    seconds: float


def _target_checks(dest: Path, models: list[ModelEntry], force: bool) -> None:
    """Refuse symlinked paths and, without ``force``, a non-empty destination."""
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
            target = dest / m.name / f.path
            # Each existing component must be a real folder (the last a regular file),
            # never a link that could lead outside dest.
            p = dest
            for part in (m.name, *f.path.split("/")):
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


def _stage(target: Path, fill: Callable[[object], None]) -> Path:
    """Write ``target``'s contents into a temporary file beside it; return its path.

    No fsync here: the whole run is flushed and renamed in :func:`_commit`, so that the
    kernel writes back early files while later ones are being decoded. OS errors (disk
    full, file too large) become :class:`OutputError` naming ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, out = open_temp(target)
    except OSError as e:
        raise OutputError(f"cannot create: {e.strerror or e}", path=target) from e
    try:
        with out:
            fill(out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"writing failed: {e.strerror or e}", path=target) from e
        raise
    return tmp


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(pool: ThreadPoolExecutor, staged: list[tuple[Path, Path]]) -> None:
    """fsync every staged file, then rename each over its target (atomic per file)."""
    try:
        _run_all(pool, [(_fsync_path, tmp) for tmp, _ in staged])
    except OSError as e:
        raise OutputError(f"flushing the restored files failed: {e.strerror or e}",
                          path=e.filename) from e
    for tmp, target in staged:
        os.replace(tmp, target)


def _restore_file(bundle: Bundle, f: FileEntry, target: Path, advance) -> Path:
    """Stage one original file from the bundle, its sha256 checked before it is kept."""

    def fill(out) -> None:
        h = hashlib.sha256()
        for chunk in bundle.iter_file_chunks(f):
            h.update(chunk)
            out.write(chunk)
            advance(memoryview(chunk).nbytes)
        if h.hexdigest() != f.sha256:
            raise IntegrityError(f"restored {f.path} fails its sha256 (corrupted bundle)",
                                 path=bundle.path)

    return _stage(target, fill)


def _copy_file(source: Path, f: FileEntry, target: Path, advance) -> Path:
    """Stage a file whose sha256 equals one already staged (``source``): a kernel copy."""

    def fill(out) -> None:
        with open(source, "rb") as src:
            remaining = f.size
            while remaining:
                n = os.copy_file_range(src.fileno(), out.fileno(), remaining)
                if n == 0:
                    raise IntegrityError(f"{source} shrank while being copied")
                remaining -= n
        advance(f.size)

    return _stage(target, fill)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, where they are empty."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (a file restored before the failure) or already gone


def _run_all(pool: ThreadPoolExecutor, calls: list[tuple], done: list | None = None) -> list:
    """Run every call on the pool and wait for all; results in order (also appended to
    ``done`` as they succeed, so a caller can clean up after a failure); raise the first
    error once every call has ended."""
    futures = [pool.submit(*call) for call in calls]
    results, errors = [], []
    for fut in futures:
        try:
            results.append(fut.result())
            if done is not None:
                done.append(results[-1])
        except BaseException as e:  # let the others finish (and clean up) first
            errors.append(e)
    if errors:
        raise errors[0]
    return results


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
        _target_checks(dest, chosen, force)
        bundle.check_padding()
        needed = bundle.manifest.blobs_of(chosen)
        stored_total = sum(bundle.blob(d).stored_length for d in needed)
        for d in needed:
            bundle.check_stored(bundle.blob(d))
            report("checking", bundle.blob(d).stored_length, stored_total)
        total = sum(m.file_bytes for m in chosen)
        jobs = [(f, dest / m.name / f.path) for m in chosen for f in m.files]
        # Files and folders this run creates, so that a failed run removes them again
        # (files that were there before are replaced only by their verified contents).
        fresh = [t for _, t in jobs if not t.exists()]
        created = sorted({p for _, t in jobs for p in (t.parent, *t.parent.parents)
                          if not p.exists() and (p == dest or dest in p.parents)},
                         key=lambda p: len(p.parts))
        try:
            for folder in created:
                folder.mkdir(exist_ok=True)
        except OSError as e:
            _remove_empty(created)
            raise OutputError(f"cannot create: {e.strerror or e}", path=dest) from e
        # Temporary files that a killed unpack left beside these targets.
        names: dict[Path, set[str]] = {}
        for _, t in jobs:
            names.setdefault(t.parent, set()).add(t.name)
        for folder, targets in names.items():
            if folder not in created:
                remove_stale_temps(folder, targets)
        advance = lambda n: report("restoring", n, total)  # noqa: E731 (a closure is clearer)
        # Files with the same content are restored once and then copied by the kernel.
        first: dict[tuple[str, int], Path] = {}
        copies = []
        originals = []
        for f, t in jobs:
            key = (f.sha256, f.size)
            if key in first and f.size and hasattr(os, "copy_file_range"):
                copies.append((first[key], f, t))
            else:
                first.setdefault(key, t)
                originals.append((f, t))
        staged: list[Path] = []
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                tmps = _run_all(pool, [(_restore_file, bundle, f, t, advance)
                                       for f, t in originals], staged)
                tmp_of = {t: tmp for (_, t), tmp in zip(originals, tmps)}
                # Copies read the staged originals, so they start once those are done.
                tmps += _run_all(pool, [(_copy_file, tmp_of[src], f, t, advance)
                                        for src, f, t in copies], staged)
                _commit(pool, list(zip(tmps, [t for _, t in originals]
                                       + [t for _, _, t in copies])))
        except BaseException:
            for tmp in staged:
                tmp.unlink(missing_ok=True)
            for t in fresh:
                t.unlink(missing_ok=True)
            _remove_empty(created)
            raise
        written = sum(f.size for f, _ in jobs)
        for folder in {t.parent for _, t in jobs}:
            fsync_dir(folder)
    return UnpackResult(dest, [m.name for m in chosen], len(jobs), written,
                        time.perf_counter() - t0)

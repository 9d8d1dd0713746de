"""The file-system primitives every writer and reader shares.

- Atomic output: a hidden temporary name beside the target (same file system, so the
  final rename is atomic), created exclusively and locked while open, fsynced, renamed;
  leftovers of killed writers are recognised by name and removed once their process and
  lock are gone. Nothing partial ever sits at a target's name.
- Read-only maps of whole files whose slices may outlive the map without turning an
  error in flight into a ``BufferError``.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

from .errors import InputError

#: The names :func:`temp_path_for` makes: the target's name and the writer's process id.
#: Folder scans skip such leftovers of a killed write; :func:`remove_stale_temps` removes them.
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.tdedup-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp\Z")


def temp_path_for(target: Path) -> Path:
    """A hidden temporary name beside ``target`` (same file system, so rename is atomic)."""
    return target.with_name(f".{target.name}.tdedup-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def open_temp(target: Path):
    """Create ``target``'s temporary file (exclusively) and hold a lock on it while it is
    open, so that :func:`remove_stale_temps` never takes a live writer's file for stale.
    Returns ``(path, binary file)``."""
    tmp = temp_path_for(target)
    f = open(tmp, "xb")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a file system without locks: the process check alone decides
    return tmp, f


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path, names: set[str] | None = None) -> list[Path]:
    """Remove the temporary files that a killed tdedup left in ``folder`` (for targets
    named in ``names``, or all): those whose writing process is gone and whose lock is
    free (a writer on another host sharing the folder still holds its lock)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_NAME_RE.match(e.name)
        if not m or (names is not None and m["name"] not in names) or _alive(int(m["pid"])):
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (best effort where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- maps -----------------------------------------------------------------------------

def close_map(m: mmap.mmap, view: memoryview | None = None) -> None:
    """Close a map unless slices of it are still alive (in an exception's frames, a
    pending job): then it closes when the last of them goes, and the error in flight
    (disk full, say) is not replaced by a ``BufferError``."""
    try:
        if view is not None:
            view.release()
        m.close()
    except BufferError:
        pass


def map_file(path: str | os.PathLike) -> mmap.mmap | None:
    """A read-only map of a whole file (``None`` for an empty file); :class:`InputError`
    naming the file if it cannot be read."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=path) from e


@contextmanager
def mapped(path: str | os.PathLike) -> Iterator[memoryview]:
    """A read-only memoryview of a whole file through mmap (empty files allowed), read
    front to back (the kernel is told so)."""
    m = map_file(path)
    if m is None:
        yield memoryview(b"")
        return
    if hasattr(m, "madvise"):
        m.madvise(mmap.MADV_SEQUENTIAL)
    view = memoryview(m)
    try:
        yield view
    finally:
        close_map(m, view)

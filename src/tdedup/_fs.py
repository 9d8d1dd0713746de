"""The file-system primitives every writer and reader shares.

- Atomic output: a hidden temporary name beside the target (same file system, so the
  final rename is atomic), created exclusively and locked while open, fsynced, renamed;
  leftovers of killed writers are recognised by name and removed once their process and
  lock are gone. Nothing partial ever sits at a target's name.
- Read-only maps of whole files whose slices may outlive the map without turning an
  error in flight into a ``BufferError``.
- :class:`InputFile`: reads of a file that may change underneath (a pack input): pread,
  never a map, so a file that shrinks gives a short read and one line instead of SIGBUS,
  and an identity (device, inode, size, mtime) that tells when the file was replaced
  or rewritten since it was opened.
- :func:`check_allocation`: refuse an allocation that cannot fit before making it.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

from .errors import InputError, OutputError, TdedupError

#: The names :func:`temp_path_for` makes: the target's name and the writer's process id.
#: Folder scans skip such leftovers of a killed write; :func:`remove_stale_temps` removes them.
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.tdedup-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp\Z")


#: Bytes a temporary name adds to its target's name (``.`` + ``.tdedup-PID-XXXXXXXX.tmp``).
_TEMP_EXTRA = len(".") + len(".tdedup-") + 10 + len("-") + 8 + len(".tmp")


def _name_max(folder: Path | int) -> int:
    try:
        if isinstance(folder, int):
            return os.fpathconf(folder, "PC_NAME_MAX")
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temp_name_for(name: str, name_max: int = 255) -> str:
    """A hidden temporary name for a file called ``name``.

    Where ``name`` is so long that the temporary name would pass the file system's name
    limit, it is shortened to a prefix plus a digest of the whole name, so that a
    temporary name fits wherever its final name fits."""
    if len(os.fsencode(name)) + _TEMP_EXTRA > name_max:
        import hashlib

        tag = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        keep = max(1, name_max - _TEMP_EXTRA - len(tag) - 1)
        head = os.fsencode(name)[:keep].decode("utf-8", "ignore") or "x"
        name = f"{head}~{tag}"
    return f".{name}.tdedup-{os.getpid()}-{os.urandom(4).hex()}.tmp"


def temp_path_for(target: Path) -> Path:
    """A hidden temporary name beside ``target`` (same file system, so rename is atomic)."""
    return target.with_name(temp_name_for(target.name, _name_max(target.parent)))


def temp_name_matches(temp: str, target: str) -> bool:
    """Whether ``temp`` (matched by :data:`TEMP_NAME_RE`) is a temporary of ``target``."""
    m = TEMP_NAME_RE.match(temp)
    if not m:
        return False
    if m["name"] == target:
        return True
    head, _, tag = m["name"].rpartition("~")
    if not head or len(tag) != 16:
        return False
    import hashlib

    return (hashlib.sha256(os.fsencode(target)).hexdigest()[:16] == tag
            and target.startswith(head))


#: Temporary files this process created through :func:`open_temp` and has not yet renamed
#: or removed; :func:`remove_own_temps` clears them when a run is interrupted.
_OWN_TEMPS: set[Path] = set()


def forget_temp(tmp: Path) -> None:
    """``tmp`` was renamed into place or removed: it is no longer ours to clean up."""
    _OWN_TEMPS.discard(tmp)


def remove_own_temps() -> None:
    """Remove every temporary file of this process still lying around (after Ctrl-C or
    SIGTERM, whatever bytecode the interrupt landed on)."""
    for tmp in list(_OWN_TEMPS):
        try:
            tmp.unlink()
        except OSError:
            pass
        _OWN_TEMPS.discard(tmp)


def open_temp(target: Path):
    """Create ``target``'s temporary file (exclusively) and hold a lock on it while it is
    open, so that :func:`remove_stale_temps` never takes a live writer's file for stale.
    Returns ``(path, binary file)``."""
    tmp = temp_path_for(target)
    _OWN_TEMPS.add(tmp)  # before it exists: an interrupt at any point can find it
    f = open(tmp, "xb")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without locks: the process check alone decides
    except BaseException:  # interrupted before the caller holds the file: leave nothing
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    return tmp, f


def open_temp_at(dir_fd: int, name: str):
    """:func:`open_temp` relative to an open folder: the temporary file for ``name`` is
    created in ``dir_fd`` without following a link (whatever the folder's path now leads
    to). Returns ``(temporary name, binary file)``."""
    tmp = temp_name_for(name, _name_max(dir_fd))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666, dir_fd=dir_fd)
    f = os.fdopen(fd, "wb")
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
    return tmp, f


def open_dir_at(name: str, dir_fd: int | None = None) -> int:
    """Open folder ``name`` (in ``dir_fd``) without following a link: a symbolic link
    swapped in at any moment makes this fail (ELOOP/ENOTDIR) instead of leading elsewhere."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dir_fd)


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


def remove_stale_temps(folder: Path | int, names: set[str] | None = None) -> list[Path]:
    """Remove the temporary files that a killed tdedup left in ``folder`` (a path, or an
    open folder's descriptor) for targets named in ``names`` (or all): those whose writing
    process is gone and whose lock is free (a writer on another host sharing the folder
    still holds its lock)."""
    removed: list[Path] = []
    at = folder if isinstance(folder, int) else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_NAME_RE.match(e.name)
        if (not m or _alive(int(m["pid"])) or (names is not None and not any(
                temp_name_matches(e.name, n) for n in names))):
            continue
        try:
            fd = os.open(e.name if at is not None else e.path,
                         os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=at)
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
            os.unlink(e.name if at is not None else e.path, dir_fd=at)
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


# -- inputs that may change ----------------------------------------------------------

def require_regular(fd: int, path: str | os.PathLike, what: str = "file",
                    cls: type[TdedupError] = InputError) -> os.stat_result:
    """fstat ``fd`` and refuse anything but a regular file (a FIFO would block every
    read, a device would never end)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise cls(f"not a regular {what} (a FIFO, device, socket or folder)", path=path)
    return st


def open_regular(path: str | os.PathLike, what: str = "file",
                 cls: type[TdedupError] = InputError) -> int:
    """Open ``path`` for reading without blocking on a FIFO; refuse non-regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise cls(f"cannot open: {e.strerror or e}", path=path) from e
    try:
        require_regular(fd, path, what, cls)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns): what tells a replaced or rewritten file from the
    one opened or read earlier."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InputFile:
    """A file read by offset (``os.pread``) and checked for change.

    Why not a map: a mapped file that another process truncates kills the reader with
    SIGBUS, with no message and temporary files left behind. A read returns short
    instead, which becomes one line naming the file. :meth:`check_unchanged` compares the
    file's identity now (through the open descriptor and through the path) with the one
    it had when opened: an ``os.replace`` of a same-size file (a trainer's atomic save)
    changes the inode, a rewrite in place changes the mtime."""

    def __init__(self, path: str | os.PathLike, *, expect_size: int | None = None) -> None:
        self.path = Path(path)
        self.fd = open_regular(path)
        st = os.fstat(self.fd)
        self.identity = file_identity(st)
        if expect_size is not None and st.st_size != expect_size:
            self.close()
            raise self.changed(f"its size is {st.st_size} bytes, {expect_size} when indexed")

    def changed(self, how: str) -> InputError:
        return InputError(f"changed while tdedup was reading it ({how}); try again once "
                          "it is no longer being written", path=self.path)

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; one line if the file has shrunk."""
        parts, pos, end = [], offset, offset + length
        while pos < end:
            try:
                chunk = os.pread(self.fd, min(end - pos, 1 << 30), pos)
            except OSError as e:
                raise InputError(f"cannot read: {e.strerror or e}", path=self.path) from e
            if not chunk:
                raise self.changed(f"it shrank to {pos} bytes")
            parts.append(chunk)
            pos += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` (a writable byte view) with the bytes at ``offset``; one line if
        the file has shrunk."""
        got = 0
        while got < len(buf):
            try:
                n = os.preadv(self.fd, [buf[got:]], offset + got)
            except OSError as e:
                raise InputError(f"cannot read: {e.strerror or e}", path=self.path) from e
            if not n:
                raise self.changed(f"it shrank to {offset + got} bytes")
            got += n

    def chunks(self, offset: int, length: int, chunk: int = 16 << 20) -> Iterator[memoryview]:
        """``length`` bytes at ``offset`` as views of one reused buffer (each valid until
        the next is taken): bounded memory however large the range."""
        buf = bytearray(min(chunk, length))
        view = memoryview(buf)
        pos, end = offset, offset + length
        while pos < end:
            want = view[:min(len(buf), end - pos)]
            self.read_into(want, pos)
            yield want
            pos += len(want)

    def check_unchanged(self) -> None:
        """Raise if the file was replaced, resized or rewritten since it was opened."""
        now = file_identity(os.fstat(self.fd))
        try:
            at_path = file_identity(os.stat(self.path))
        except OSError:
            raise self.changed("it was removed or renamed") from None
        if at_path[:2] != self.identity[:2]:
            raise self.changed("another file was moved to its name")
        if now != self.identity:
            raise self.changed("it was rewritten")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- cores ----------------------------------------------------------------------------

def worker_threads(limit: int = 8) -> int:
    """Threads for work whose steps release the GIL (reads, zstd, blake3, numpy): every
    core, up to ``limit`` (past 8, reading the files limits)."""
    return max(1, min(limit, os.cpu_count() or 1))


# -- memory ---------------------------------------------------------------------------

#: Below this many bytes :func:`check_allocation` does not look (see there).
SMALL_ALLOCATION = 16 << 20


def _available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the free address space under
    ``RLIMIT_AS`` and what the system has (available memory plus free swap: a refusal must
    be certain). None when neither is known."""
    limits = []
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(0, soft - used))
    except (ImportError, OSError, ValueError):
        pass
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        if "MemAvailable" in fields:
            limits.append(fields["MemAvailable"] + fields.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


def check_allocation(nbytes: int, what: str, *, path: str | os.PathLike | None = None,
                     cls: type[TdedupError] = OutputError) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when this process cannot have them, so
    a crafted size becomes one line before the allocation, not a MemoryError (or the
    OOM killer) after it.

    Allocations under :data:`SMALL_ALLOCATION` are not checked: no header can make one
    large, and reading ``/proc/meminfo`` per blob cost unpack ~10 % of its CPU."""
    if nbytes < SMALL_ALLOCATION:
        return
    avail = _available_memory()
    if avail is not None and nbytes > avail:
        raise cls(f"{what} needs {nbytes} bytes of memory, more than the {avail} available",
                  path=path)

"""Low-level bundle writer: header, aligned blobs as they come, manifest, footer.

Blobs are appended as they are produced, so nothing has to be held in memory beyond the
blob in hand; the manifest goes last with a fixed-size footer that points at it. The
bundle is written to a temporary name in the target's folder, fsynced, and only then
renamed over the target, so an interrupted write never leaves a file at the target path
(and an existing bundle there is replaced atomically or left untouched).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import blake3

from ..._fs import file_identity, forget_temp, fsync_dir, open_temp, remove_stale_temps
from ...errors import BundleError, OutputError, OutputExistsError
from ..codecs.zstd import zstd_compress
from .constants import (
    BLOB_ALIGNMENT,
    FOOTER_BODY_STRUCT,
    FOOTER_CHECK_SIZE,
    FOOTER_MAGIC,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_STRUCT,
    MAGIC,
    RAW_ALIGNMENT,
    BlobEncoding,
    ManifestEncoding,
)
from .hashing import hash_bytes
from .manifest import BlobRecord, Manifest

_ZEROS = bytes(RAW_ALIGNMENT)


class BundleWriter:
    """Append blobs, then :meth:`finish` with the manifest. Use as a context manager:
    leaving the block with an exception removes the temporary file.

    How the finished bundle takes the target's name: ``replace=False`` never replaces a
    file (one that appeared while the bundle was written makes :meth:`finish` fail);
    ``expect``, the identity (``_fs.file_identity``) the target had when the caller read
    it, makes :meth:`finish` fail if another process replaced it meanwhile (an ``add``
    racing another ``add`` would drop that one's model); ``mode`` sets the permissions
    (an edit in place keeps the bundle's own)."""

    def __init__(self, target: str | os.PathLike, *, alignment: int = RAW_ALIGNMENT,
                 replace: bool = True, expect: tuple | None = None,
                 mode: int | None = None) -> None:
        self.target = Path(target)
        self.replace, self.expect, self.mode = replace, expect, mode
        self.alignment = alignment
        self.blobs: dict[str, BlobRecord] = {}
        remove_stale_temps(self.target.parent, {self.target.name})
        try:
            self.tmp, self.f = open_temp(self.target)
        except OSError as e:
            raise OutputError(f"cannot create the bundle: {e.strerror or e}",
                              path=self.target) from e
        self.pos = 0
        self.finished = False
        try:
            self._write(HEADER_STRUCT.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, alignment))
        except BaseException:  # Ctrl-C or SIGTERM before the caller's ``with`` holds us
            self.abort()
            raise

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self.abort()

    def _write(self, data) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise OutputError(f"writing the bundle failed: {e.strerror or e}",
                              path=self.target) from e
        self.pos += memoryview(data).nbytes

    def _pad_to(self, alignment: int) -> None:
        pad = -self.pos % alignment
        while pad:
            n = min(pad, len(_ZEROS))
            self._write(_ZEROS[:n])
            pad -= n

    def __contains__(self, digest: str) -> bool:
        return digest in self.blobs

    def add_blob(self, digest: str, encoding: BlobEncoding, stored, decoded_length: int, *,
                 base: str | None = None) -> BlobRecord:
        """Append one blob (its stored bytes) and record it; a known digest is a no-op."""
        if digest in self.blobs:
            return self.blobs[digest]
        self._pad_to(self.alignment if encoding is BlobEncoding.RAW else BLOB_ALIGNMENT)
        stored_len = memoryview(stored).nbytes
        checksum = digest if encoding is BlobEncoding.RAW else hash_bytes(stored)
        rec = BlobRecord(digest, encoding, self.pos, stored_len, decoded_length, checksum, base)
        self._write(stored)
        self.blobs[digest] = rec
        return rec

    def copy_blob(self, rec: BlobRecord, src_fd: int) -> BlobRecord:
        """Append a blob another bundle (open as ``src_fd``) holds, stored bytes unchanged:
        a kernel copy (``copy_file_range``, a reflink where the file system shares extents),
        never through Python buffers. Its checksum and decoded hash carry over; a known
        digest is a no-op."""
        if rec.hash in self.blobs:
            return self.blobs[rec.hash]
        self._pad_to(self.alignment if rec.encoding is BlobEncoding.RAW else BLOB_ALIGNMENT)
        try:
            self.f.flush()
            dst, src_off, left = self.f.fileno(), rec.offset, rec.stored_length
            while left:
                n = os.copy_file_range(src_fd, dst, left, src_off, self.pos)
                if n == 0:
                    raise OSError(0, "the source bundle ended inside a blob")
                src_off += n
                self.pos += n
                left -= n
            self.f.seek(self.pos)
        except OSError as e:
            raise OutputError(f"copying a blob failed: {e.strerror or e}",
                              path=self.target) from e
        new = BlobRecord(rec.hash, rec.encoding, self.pos - rec.stored_length,
                         rec.stored_length, rec.decoded_length, rec.checksum, rec.base)
        self.blobs[rec.hash] = new
        return new

    def finish(self, manifest: Manifest, *, level: int = 3, validate: bool = False) -> int:
        """Write manifest and footer, fsync, rename over the target. Returns the size.

        ``validate``: parse the manifest as a reader would first and refuse to write a
        bundle it would not open (pack does; tests that craft hostile bundles do not)."""
        manifest.blobs = self.blobs
        manifest.alignment = self.alignment
        raw = manifest.dumps()
        self._pad_to(BLOB_ALIGNMENT)
        offset = self.pos
        if validate:  # never leave a bundle behind that a reader would refuse
            try:
                Manifest.from_json_bytes(raw, data_end=offset)
            except BundleError as e:
                raise OutputError(f"refusing to write an unreadable bundle ({e.problem})",
                                  path=self.target) from e
        stored = zstd_compress(raw, level)
        self._write(stored)
        body = FOOTER_BODY_STRUCT.pack(FOOTER_MAGIC, FORMAT_MAJOR, FORMAT_MINOR,
                                       int(ManifestEncoding.ZSTD_JSON), offset, len(stored),
                                       len(raw), blake3.blake3(stored).digest())
        self._write(body + blake3.blake3(body).digest()[:FOOTER_CHECK_SIZE])
        try:
            if self.mode is not None:
                os.fchmod(self.f.fileno(), self.mode)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self._publish()
            forget_temp(self.tmp)
        except OSError as e:
            self.abort()
            raise OutputError(f"finishing the bundle failed: {e.strerror or e}",
                              path=self.target) from e
        except OutputError:
            self.abort()
            raise
        fsync_dir(self.target.parent)
        self.finished = True
        return self.pos

    def _publish(self) -> None:
        """The temporary file takes the target's name (see the class docstring)."""
        if not self.replace:
            appeared = OutputExistsError("the output appeared while the bundle was being "
                                         "written; it was left as it is", path=self.target,
                                         hint="pass --force to replace it")
            try:
                os.link(self.tmp, self.target)  # atomic, and never over an existing file
            except FileExistsError:
                raise appeared from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK, errno.ENOSYS):
                    raise
                # No hard links here (vfat, exFAT, some network and FUSE file systems):
                # check, then rename (a file appearing in between is replaced).
                if os.path.lexists(self.target):
                    raise appeared from None
                os.replace(self.tmp, self.target)
                return
            self.tmp.unlink()
            return
        if self.expect is not None:
            try:
                now = file_identity(os.stat(self.target))
            except FileNotFoundError:
                now = None
            if now != self.expect:
                raise OutputError("the bundle was changed by another process while this one "
                                  "was written (another add or remove?); it was left as it is",
                                  path=self.target, hint="run the command again")
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        """Drop the temporary file; the target is untouched."""
        try:
            self.f.close()
        except OSError:
            pass
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass
        forget_temp(self.tmp)
        self.finished = True


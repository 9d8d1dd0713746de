"""Tensors' bytes for the planners and reports: a whole tensor, or only the rows a sample
takes, read by offset.

The delta planner, the derivation planner and the drift report look at samples of
tensors they have hashed already (runs of elements, a few rows, a corner block). They used
to take views of a map of each file; a file that another process truncated while they
ran then killed the process with SIGBUS, with no message and temporary files left behind.
Reads by offset (:class:`_fs.InputFile`) return short instead, which becomes one line
naming the file. Only the bytes a sample needs are read, as the map only faulted those in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._fs import InputFile
from .scan import ScannedModels
from .tensor_hashes import HashedTensor


class TensorBytes:
    """Reads tensors of ``scanned`` through one :class:`InputFile` per file (a context).
    Every array returned is a fresh uint8 copy."""

    def __init__(self, scanned: ScannedModels) -> None:
        self.scanned = scanned
        self._files: dict[Path, InputFile] = {}

    def __enter__(self) -> TensorBytes:
        return self

    def __exit__(self, *exc) -> None:
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def _file(self, path: Path) -> InputFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = InputFile(path)
        return f

    def __call__(self, h: HashedTensor) -> np.ndarray:
        """The whole tensor."""
        path, off, length = self.scanned.locate(h)
        out = np.empty(length, dtype=np.uint8)
        if length:
            self._file(path).read_into(out.data, off)
        return out

    def rows(self, h: HashedTensor, row_bytes: int, index) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) of the tensor read as rows of
        ``row_bytes`` bytes: a ``(len(index), row_bytes)`` array. Consecutive rows are read
        at once."""
        path, off, length = self.scanned.locate(h)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        ordered = idx.size < 2 or bool((idx[1:] > idx[:-1]).all())
        wanted = idx if ordered else np.unique(idx)
        if row_bytes <= 0 or length % row_bytes or (
                wanted.size and (wanted[0] < 0 or wanted[-1] >= length // row_bytes)):
            raise ValueError(f"rows of {row_bytes} bytes out of a {length}-byte tensor")
        buf = np.empty((len(wanted), row_bytes), dtype=np.uint8)
        if wanted.size:
            f = self._file(path)
            flat = buf.reshape(-1).data
            breaks = (np.flatnonzero(wanted[1:] != wanted[:-1] + 1) + 1).tolist()
            first = wanted[[0, *breaks]].tolist()
            for a, b, row in zip([0, *breaks], [*breaks, len(wanted)], first):
                f.read_into(flat[a * row_bytes:b * row_bytes], off + row * row_bytes)
        return buf if ordered else buf[np.searchsorted(wanted, idx)]

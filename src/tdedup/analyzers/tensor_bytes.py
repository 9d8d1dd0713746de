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

import functools
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
        key = tuple(index.reshape(-1).tolist() if isinstance(index, np.ndarray) else index)
        runs, back, lo, hi = (_row_plan(key) if len(key) <= _PLANNED_ROWS
                              else _row_plan.__wrapped__(key))
        if row_bytes <= 0 or length % row_bytes or (
                runs and (lo < 0 or hi >= length // row_bytes)):
            raise ValueError(f"rows of {row_bytes} bytes out of a {length}-byte tensor")
        n = sum(count for _, _, count in runs)
        buf = np.empty((n, row_bytes), dtype=np.uint8)
        if runs:
            f = self._file(path)
            flat = buf.reshape(-1).data
            for first, at, count in runs:
                f.read_into(flat[at * row_bytes:(at + count) * row_bytes],
                            off + first * row_bytes)
        return buf if back is None else buf[back]


#: Longer indexes are planned afresh each time (a cached plan keeps its index).
_PLANNED_ROWS = 4096


@functools.lru_cache(maxsize=1024)
def _row_plan(index: tuple[int, ...]
              ) -> tuple[tuple[tuple[int, int, int], ...], np.ndarray | None, int, int]:
    """How to read rows ``index``: runs of consecutive distinct rows in increasing order
    as ``(first row, place in the buffer, count)``; the order to take the buffer's rows
    back in (None when ``index`` is increasing already); the lowest and highest row.
    The samples a report takes repeat (the same rows of every tensor of one shape), so
    the plan is worked out once per index."""
    if not index:
        return (), None, 0, -1
    ordered = all(a < b for a, b in zip(index, index[1:]))
    wanted = index if ordered else tuple(sorted(set(index)))
    runs = []
    start = at = 0
    for i in range(1, len(wanted) + 1):
        if i == len(wanted) or wanted[i] != wanted[i - 1] + 1:
            runs.append((wanted[start], at, i - start))
            at += i - start
            start = i
    back = None
    if not ordered:
        place = {row: i for i, row in enumerate(wanted)}
        back = np.array([place[row] for row in index], dtype=np.intp)
        back.flags.writeable = False
    return tuple(runs), back, wanted[0], wanted[-1]

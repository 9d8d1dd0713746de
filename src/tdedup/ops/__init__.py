"""The operations: pack, unpack, verify. They sit above the format (readers, codecs,
bundle container) and the analyzers (hashing, planning), and below the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import OutputError, UsageError

#: Progress callbacks of long operations: ``(phase, bytes advanced, phase total)``.
ProgressFn = Callable[[str, int, int], None]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def check_output_not_input(output: str | os.PathLike,
                           inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is one of the inputs (the same file by path, link or hard
    link) or lies inside an input folder: writing it would destroy what is being read
    (``pack -o model.safetensors``, ``pack -o folder/b.tdd folder``, ``unpack --force``
    over the bundle being read)."""
    out = Path(output)
    try:
        out_real = out.resolve()
    except (OSError, RuntimeError, ValueError):
        return
    out_id = _identity(out)
    for given in inputs:
        src = Path(given)
        try:
            src_real = src.resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if out_real == src_real or (out_id is not None and out_id == _identity(src)):
            raise UsageError(f"the output is the input {src}: writing it would destroy "
                             "what is being read", path=out,
                             hint="write the output somewhere else")
        if src.is_dir() and out_real.is_relative_to(src_real):
            raise UsageError(f"the output lies inside the input folder {src}: it would be "
                             "read as part of the model next time", path=out,
                             hint="write the output outside the model folders")


def check_output_file(output: str | os.PathLike) -> Path:
    """An output file's path, refused when it cannot be one: empty, ``.``, ``/``, a name
    ending in a separator, or an existing folder (one line, before any work is done)."""
    text = os.fspath(output)
    path = Path(text)
    if not text or text.endswith(("/", os.sep)) or path.name in ("", ".", "..") \
            or path.is_dir():
        raise OutputError("the output must be a file name (such as models.tdd), not a "
                          "folder", path=text or "''")
    return path

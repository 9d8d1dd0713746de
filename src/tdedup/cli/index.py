"""``tdedup index PATH --stats``, and the ``--index`` / ``--dask`` plumbing of analyze.

The index and the Dask client live only as long as one command: :func:`scan_backends`
opens both (either may be absent) and closes them, whatever the hashing ends with. The
analyzers are imported by the functions that use them (``tdedup --help`` starts fast).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import UsageError
from .common import (
    Quiet,
    clean,
    guarded,
    human_bytes,
    stderr_console,
    stdout_console,
    warn,
)

if TYPE_CHECKING:
    from ..analyzers.distributed import DaskRunner
    from ..analyzers.index import TensorIndex
    from ..analyzers.scan import ScannedModels


@contextmanager
def scan_backends(dask: str | None, index: Path | None
                  ) -> Iterator[tuple[TensorIndex | None, DaskRunner | None]]:
    """The index (``--index``) and the Dask runner (``--dask``) a scan uses, if given."""
    with ExitStack() as stack:
        idx = None
        if index is not None:
            from ..analyzers.index import TensorIndex
            idx = stack.enter_context(TensorIndex(index))
        runner = None
        if dask is not None:
            from ..analyzers.distributed import dask_runner
            from rich.markup import escape
            with stderr_console().status(f"connecting to Dask ({escape(dask)})"):
                runner = stack.enter_context(dask_runner(dask))
            print(f"dask: hashing on {runner.address} ({runner.workers} workers)",
                  file=sys.stderr)
        yield idx, runner


def report_counts(scanned: ScannedModels, index: Path | None) -> None:
    """On stderr: files that moved while hashed, and what the index saved."""
    c = scanned.counts
    for path in c.changed:
        warn(f"{path}: changed while it was hashed; the report covers the bytes read, and "
             "the index does not record it")
    if index is not None:
        total = c.hashed_files + c.indexed_files
        print(clean(f"index: {c.indexed_files} of {total} weight files taken from "
                        f"{index} ({human_bytes(c.indexed_bytes)}), {c.hashed_files} hashed "
                        f"({human_bytes(c.hashed_bytes)})"), file=sys.stderr)


@guarded
def index_command(
    path: Annotated[Path, typer.Argument(
        help="An index written by 'tdedup analyze --index PATH'.", show_default=False)],
    stats: Annotated[bool, typer.Option(
        "--stats", help="Say what the index holds: files, tensors, distinct tensors, "
        "and recorded files that are now missing or changed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
    quiet: Quiet = False,  # every command takes -q; this one draws no progress bar
) -> None:
    """Inspect an incremental tensor-hash index (docs/SCALE.md)."""
    from rich.markup import escape
    from rich.table import Table

    from ..analyzers.index import TensorIndex

    if not stats:
        raise UsageError("nothing to do: give --stats")
    with TensorIndex(path, create=False) as idx:
        s = idx.stats()
    if as_json:
        print(json.dumps(s.to_dict(), indent=2))
        return
    t = Table(title=None, show_header=False, box=None)
    t.add_column("what")
    t.add_column("value", justify="right")
    ratio = s.tensor_bytes / s.distinct_tensor_bytes if s.distinct_tensor_bytes else 1.0
    for what, value in (
            ("index", escape(s.path)), ("schema version", str(s.schema_version)),
            ("weight files", f"{s.files:,}"),
            ("tensors", f"{s.tensors:,} ({human_bytes(s.tensor_bytes)})"),
            ("distinct tensors", (f"{s.distinct_tensors:,} "
                                  f"({human_bytes(s.distinct_tensor_bytes)}, {ratio:.2f}x)")),
            ("stale files", f"{s.stale_files:,} (missing or changed since recorded)"),
            ("database", human_bytes(s.database_bytes))):
        t.add_row(what, value)
    stdout_console().print(t)

"""``tdedup load``: load a bundle's models onto a torch device and report the memory."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import TdedupError
from .common import counted, guarded, human_bytes, phased_progress, plain, stdout_console

#: A load shorter than this shows no progress bar.
PROGRESS_AFTER_S = 1.0


class _LateBar:
    """A ``progress(done, total)`` callback that opens the stderr bytes bar only once the
    load has run for :data:`PROGRESS_AFTER_S` (short loads stay quiet)."""

    def __init__(self, stack: ExitStack, quiet: bool) -> None:
        self.stack, self.quiet = stack, quiet
        self.t0 = time.monotonic()
        self.update: Callable[[str, int, int], None] | None = None
        self.shown = 0
        self.lock = threading.Lock()  # called from the decoding threads

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if self.update is None:
                if time.monotonic() - self.t0 < PROGRESS_AFTER_S:
                    return
                self.update = self.stack.enter_context(phased_progress(self.quiet))
            self.update("load", done - self.shown, total)
            self.shown = done


@guarded
def load(
    bundle: Annotated[Path, typer.Argument(help="The bundle (.tdd).")],
    device: Annotated[str, typer.Option("--device", "-d", help="cpu, cuda, cuda:N, or auto (cuda when available).")] = "auto",
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Load only this model (repeatable).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every blob read against its stored checksum before any tensor is used.")] = True,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Quantized GGUF tensors as float32.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Load every model (each distinct tensor once) and print what it takes in memory."""
    from ..loaders.sharing import model_sharing
    from ..loaders.torch import load as load_bundle

    with ExitStack() as stack:
        try:
            loaded = load_bundle(bundle, device=device, models=model, verify=verify,
                                 dequantize=dequantize, progress=_LateBar(stack, quiet))
        except TdedupError as e:  # every problem of a load is about this bundle
            raise e.locate(path=bundle) from None
    s = loaded.stats
    rows = model_sharing(loaded)
    added = sum(r.added_bytes for r in rows)
    if as_json:
        print(json.dumps({"bundle": str(bundle), "device": str(loaded.device),
                          "models": {r.model: {"tensors": r.tensors,
                                               "logical_bytes": r.alone_bytes,
                                               "with_sharing_bytes": r.added_bytes,
                                               "saved_bytes": r.saved_bytes}
                                     for r in rows},
                          "logical_bytes": s.logical_bytes, "device_bytes": s.device_bytes,
                          "mapped_bytes": s.mapped_bytes, "saved_bytes": s.saved_bytes,
                          "distinct_blobs": s.distinct_blobs, "read_bytes": s.read_bytes,
                          "verified": s.verified, "seconds": round(s.seconds, 4),
                          "gb_per_s": round(s.gb_per_s, 3)}, indent=2))
        return
    from rich.table import Table
    out = stdout_console()
    t = Table(title=None, caption="with sharing: what each model adds to the ones above it")
    t.add_column("model")
    t.add_column("tensors", justify="right")
    t.add_column("without sharing", justify="right")
    t.add_column("with sharing", justify="right")
    t.add_column("saved", justify="right")
    for r in rows:
        t.add_row(plain(r.model), str(r.tensors), human_bytes(r.alone_bytes),
                  human_bytes(r.added_bytes), human_bytes(r.saved_bytes))
    if s.device_bytes > added:  # delta bases no tensor uses, dequantized copies
        t.add_row("(other blobs)", "", "", human_bytes(s.device_bytes - added), "")
    t.add_section()
    t.add_row("total", str(s.tensors), human_bytes(s.logical_bytes),
              human_bytes(s.device_bytes), human_bytes(s.saved_bytes))
    out.print(t)
    ratio = s.logical_bytes / s.device_bytes if s.device_bytes else 1.0
    mapped = (f" ({human_bytes(s.mapped_bytes)} of it mapped from the bundle)"
              if s.mapped_bytes else "")
    checked = "checksums verified" if s.verified else "not verified"
    out.print(plain(f"loaded {counted(len(s.models), 'model')} on {loaded.device} in {s.seconds:.2f} s "
                    f"({s.gb_per_s:.2f} GB/s logical; {checked})"))
    out.print(f"  logical {human_bytes(s.logical_bytes)} -> device "
              f"{human_bytes(s.device_bytes)}{mapped}: saved {human_bytes(s.saved_bytes)} "
              f"({ratio:.2f}x less)")

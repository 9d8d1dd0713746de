"""``tdedup demo``: build a real model family, then analyze, pack, verify and unpack it."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from .analyze import analyze
from .bundle_commands import inspect, pack, unpack, verify
from .common import Json, Quiet, guarded, hint, plain, print_json, stderr_console, stdout_console


def _step(title: str) -> None:
    stdout_console().rule(plain(title, "bold"))


@guarded
def demo(
    workdir: Annotated[Optional[Path], typer.Argument(help="Folder for the demo's files (default: a new temporary folder).")] = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train a small model family (numpy, seconds), then analyze, pack, verify, unpack it."""
    if as_json or quiet:
        # The walkthrough is for reading; here only its outcome is printed.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            root = _run(workdir)
        bundle = root / "family.tdd"
        if as_json:
            print_json({"workdir": str(root), "bundle": str(bundle),
                        "bundle_bytes": bundle.stat().st_size,
                        "restored": str(root / "restored")})
        return
    _run(workdir)


def _run(workdir: Path | None) -> Path:
    from ..demo import build_demo_family  # numpy: not imported for --help

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tdedup-demo-"))
    _step("1. build a model family (real gradient steps, saved as safetensors and GGUF)")
    with stderr_console().status("training base, full and frozen fine-tunes..."):
        family = build_demo_family(root / "models")
    out = stdout_console()
    for name, (first, last) in family.losses.items():
        out.print(f"  {name}: loss {first:.4f} -> {last:.4f}")
    paths = [f"{name}={path}" for name, path in family.models.items()]
    out.print(plain("  models: " + ", ".join(f"{n} ({p.relative_to(root)})"
                                             for n, p in family.models.items())))

    _step("2. tdedup analyze")
    analyze(paths=paths)
    bundle = root / "family.tdd"
    _step(f"3. tdedup pack -o {bundle}")
    pack(paths=paths, output=bundle, quiet=True)
    _step("4. tdedup inspect")
    inspect(bundle=bundle)
    _step("5. tdedup verify")
    verify(bundle=bundle, quiet=True)
    _step("6. tdedup unpack (every file byte for byte, sha256 checked)")
    unpack(bundle=bundle, dest=root / "restored", quiet=True)
    try:
        import torch  # noqa: F401

        from .load import load as load_cmd
    except ImportError:
        hint("install the torch extra (pip install 'tdedup[torch]') to try tdedup.load")
    else:
        _step("7. tdedup load --device cpu (each distinct tensor in memory once)")
        load_cmd(bundle=bundle, device="cpu")
    out.print()
    out.print(plain(f"all files are in {root}"))
    return root

"""Untrusted strings are printed as they are (issue 14, cause 5): a path, tensor name,
manifest layout or ``tool_version`` holding rich markup (``[/i]``, ``[red]``), an emoji
code, a terminal escape or a lone surrogate is shown literally by ``pack``, ``analyze``,
``analyze --drift``, ``--markdown``, ``inspect``, ``unpack``, ``verify`` and ``load``: exit
0, no traceback, no character dropped, no escape sequence reaching the terminal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import hostile_helpers as hh
from typer.testing import CliRunner

import tdedup
from tdedup.cli.app import app

runner = CliRunner()

#: Markup that closes a tag never opened (rich raised MarkupError), markup that would be
#: eaten (``[red]``), an emoji code, a terminal escape (ESC, BEL), a C1 control.
HOSTILE = "[/i]x[red]y[/red]:smile:[bold]\x1b]0;pwn\x07\x1b[31m\x9b"
#: What any printed form of HOSTILE must keep (the markup, literally).
KEPT = ("[/i]x[red]y[/red]:smile:[bold]",)


def run_ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    assert "Traceback" not in result.output
    out = (result.stdout + result.stderr).replace("\n", "")  # rich wraps long lines
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out, repr(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Two models in folders whose paths hold HOSTILE, with HOSTILE tensor names: one
    tensor shared, one that drifted."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("strings") / f"dir{HOSTILE}"
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((32, 32)).astype(np.float32)
    out = {}
    for name, bump in (("a", 0.0), ("b", 1e-3)):
        folder = root / f"m{name}{HOSTILE}"
        folder.mkdir(parents=True)
        drifted = (shared * (1 + bump)).astype(np.float32)
        save_file({f"layer.0.{HOSTILE}.weight": shared,
                   f"layer.1.{HOSTILE}.weight": drifted}, str(folder / "model.safetensors"),
                  metadata={"note": HOSTILE})
        out[name] = folder
    return out


def test_pack_analyze_drift_markdown_print_hostile_strings_literally(family, tmp_path):
    args = [f"a={family['a']}", f"b={family['b']}"]
    out = run_ok(["analyze", *args, "--drift", "--top", "5"])
    assert all(k in out for k in KEPT), out
    md = run_ok(["analyze", *args, "--drift", "--markdown", "-"])
    assert "\\[/i\\]" in md or "[/i]" in md
    out = run_ok(["pack", *args, "-o", str(tmp_path / "b[red]x[i]:smile:\x1b[31m.tdd")])
    assert "b[red]x[i]:smile:\\x1b[31m.tdd" in out


def test_inspect_unpack_verify_load_print_manifest_strings_literally(family, tmp_path):
    bundle = tmp_path / "b.tdd"
    tdedup.pack([f"a={family['a']}", f"b={family['b']}"], bundle)

    def edit(doc, offsets):
        doc["tool_version"] = HOSTILE
        for m in doc["models"]:
            m["layout"] = HOSTILE
    bad = hh.rewrite_manifest(bundle, tmp_path / "hostile.tdd", edit)
    out = run_ok(["inspect", str(bad)])
    assert out.count("[/i]x[red") >= 3, out  # the two layouts (cut to fit) and the version
    dest = tmp_path / f"d[/i][red]{HOSTILE[-12:]}"
    out = run_ok(["unpack", "-q", str(bad), str(dest)])
    assert "d[/i][red]" in out
    run_ok(["verify", "-q", str(bad)])
    pytest.importorskip("torch")
    run_ok(["load", "--device", "cpu", str(bad)])


def test_a_surrogate_in_a_path_is_shown_escaped(family, tmp_path):
    """A file name that is not valid UTF-8 (a lone surrogate in Python) prints as an
    escape instead of failing to encode."""
    weird = tmp_path / "m\udcff"
    try:
        shutil.copytree(family["a"], weird)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses such names")
    out = run_ok(["pack", f"w={weird}", "-o", str(tmp_path / "w\udcff.tdd")])
    assert "\\udcff" in out

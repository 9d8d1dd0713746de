"""The CLI imports only what a command uses (issue 15: ``tdedup --help`` under 150 ms).

Not a timed test (times are measured by bench/startup.py): it checks which modules a fresh
interpreter has loaded, which is what the start-up time follows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("numpy", "gguf", "yaml", "torch", "zstandard", "blake3",
         "tdedup.analyzers.delta_planning", "tdedup.ops.pack", "tdedup.format.bundle.reader")


def loaded_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["pack", "--help"],
                                  ["analyze", "--help"], ["unpack", "--help"],
                                  ["index", "--help"]])
def test_help_and_version_import_no_heavy_module(argv):
    code = ("import sys\nfrom tdedup.cli.app import app\n"
            f"try:\n    app({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass")
    heavy = sorted(m for m in loaded_after(code) if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []


def test_package_import_is_light_and_names_resolve_lazily():
    assert not {"numpy", "gguf", "yaml"} & loaded_after("import tdedup")
    import tdedup
    assert callable(tdedup.pack) and callable(tdedup.unpack) and callable(tdedup.verify)
    assert tdedup.Bundle is tdedup.format.bundle.reader.Bundle
    assert "pack" in dir(tdedup)
    with pytest.raises(AttributeError):
        tdedup.no_such_name  # noqa: B018


def test_output_for_scripts_imports_no_rich(tmp_path):
    """rich draws tables and bars; ``--version`` and ``analyze --json`` into a pipe draw
    neither, and skip its import (15 ms of each start)."""
    from helpers.factory import make_safetensors
    import numpy as np

    a = make_safetensors(tmp_path / "a.safetensors", {"w": np.ones((64, 64), np.float32)})
    b = make_safetensors(tmp_path / "b.safetensors", {"w": np.ones((64, 64), np.float32)})
    for argv in (["--version"], ["analyze", "--json", str(a), str(b)]):
        code = ("import sys\nfrom tdedup.cli.app import app\n"
                f"try:\n    app({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass")
        loaded = loaded_after(code)
        assert "tdedup.analyzers.overlap" in loaded or argv == ["--version"]  # it ran
        assert not {m for m in loaded if m.split(".")[0] == "rich"}, argv

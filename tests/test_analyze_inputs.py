"""``tdedup analyze``'s inputs after the third QA pass: a folder that cannot be listed is
reported. (Split GGUF inputs: test_analyze_split.py.)"""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from helpers.factory import make_safetensors, random_tensors
from tdedup.cli.app import app

runner = CliRunner()


def run(*args, env: dict | None = None):
    return runner.invoke(app, ["analyze", *map(str, args)],
                         env={"NO_COLOR": "1", "COLUMNS": "200", **(env or {})})


def names(*args) -> list[str]:
    result = run("--json", "-q", *args)
    assert result.exit_code == 0, result.output
    return [m["name"] for m in json.loads(result.stdout)["models"]]


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines
    assert all(n in lines[0] for n in needles), lines
    return lines[0]


# -- 5: a folder that cannot be listed is reported --------------------------------------


def test_an_unlistable_subfolder_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "m"
    make_safetensors(root / "model.safetensors", random_tensors(0, {"x": (8,)}))
    locked = root / "locked"
    make_safetensors(locked / "more.safetensors", random_tensors(1, {"y": (8,)}))
    locked.chmod(0)
    try:
        if os.geteuid() == 0:  # root lists anything: make the listing fail as it would
            real = os.scandir

            def scandir(path="."):
                if os.fspath(path) == str(locked):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real(path)

            monkeypatch.setattr(os, "scandir", scandir)
        result = run("--json", "-q", f"m={root}")
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped"] == {"m": ["locked/ (cannot be listed: Permission denied)"]}
    assert report["models"][0]["tensors"] == 1
    assert "warning: m: skipped locked/ (cannot be listed: Permission denied)" in result.stderr


def test_an_unlistable_model_folder_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "m"
    make_safetensors(root / "model.safetensors", random_tensors(0, {"x": (8,)}))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(root):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    one_error_line(run(root), str(root), "cannot list this folder: Permission denied")

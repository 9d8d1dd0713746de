"""The CLI basics: refusals (exit 2, one error line, nothing written), globs, dry runs,
Unicode names, -q/--json everywhere, and golden files of every command's help and of a
wide report at 80 and 120 columns.

Regenerate the golden files after an intended change with
``TDEDUP_UPDATE_GOLDEN=1 python -m pytest tests/test_cli_basics.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.factory import make_safetensors, random_tensors
from tdedup.cli.app import app

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ["analyze", "index", "pack", "add", "remove", "convert", "unpack", "verify", "inspect", "load", "demo"]
runner = CliRunner()


def run(args, columns: int = 100):
    return runner.invoke(app, args, env={"COLUMNS": str(columns), "NO_COLOR": "1",
                                         "TERM": "dumb", "TERMINAL_WIDTH": str(columns)})


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TDEDUP_UPDATE_GOLDEN") or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed (see module docstring)"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """14 small models: a base, 12 variants each changing some layers, one unrelated."""
    root = tmp_path_factory.mktemp("wide")
    shapes = {f"model.encoder.layer.{i}.attention.output.dense.weight": (16, 16)
              for i in range(4)}
    base = random_tensors(0, shapes)
    out = {}
    for k in range(14):
        t = dict(base) if k < 13 else random_tensors(99, shapes)
        if 0 < k < 13:
            name = f"model.encoder.layer.{k % 4}.attention.output.dense.weight"
            t[name] = (t[name] + np.float32(1e-3 * k)).astype(np.float32)
        name = "Ünï-côde" if k == 5 else f"variant-{k:02d}"
        out[name] = make_safetensors(root / f"{k:02d}.safetensors", t)
    return out


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_text_golden(command):
    res = run([command, "--help"] if command else ["--help"])
    assert res.exit_code == 0, res.output
    check_golden(f"help_{command or 'tdedup'}.txt", res.stdout)


@pytest.mark.parametrize("columns", [80, 120])
def test_wide_report_golden(models, columns):
    res = run(["analyze", *[f"{n}={p}" for n, p in models.items()], "--drift", "-q"],
              columns=columns)
    assert res.exit_code == 0, res.output
    assert "Pairs of models that share bytes" in res.stdout  # 14 models: a ranked list
    for line in res.stdout.splitlines():
        assert len(line) <= columns, line
        if line[:1] in "┏┃┡│└┌":  # every table fits: its right border is there
            assert line.rstrip()[-1] in "┓┃┩│┘┐", line
    assert "model.encoder.layer.3 " in res.stdout  # the layer number is never cut
    assert "Ünï-côde" in res.stdout
    check_golden(f"report_{columns}.txt", res.stdout)


def test_unicode_names_keep_their_letters(models, tmp_path):
    src = models["Ünï-côde"]
    named = tmp_path / "Ünï côde.safetensors"
    named.write_bytes(src.read_bytes())
    res = run(["pack", str(named), "ünï=" + str(src), "-o", str(tmp_path / "u.tdd"),
               "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["Ünï_côde", "ünï"]


def test_include_exclude_and_dry_run(models, tmp_path):
    args = [f"{n}={p}" for n, p in models.items()]
    res = run(["pack", *args, "--include", "variant-0*", "--exclude", "variant-00",
               "--dry-run", "--json", "-o", str(tmp_path / "x.tdd")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["estimate"] is True
    assert doc["model_names"] == [f"variant-{k:02d}" for k in range(1, 10) if k != 5]
    assert doc["estimated_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_every_command_has_quiet_and_json():
    for command in COMMANDS:
        text = run([command, "--help"]).stdout
        assert "--quiet" in text and "--json" in text, command


def test_completion_is_offered():
    assert "--install-completion" in run(["--help"]).stdout


def _assert_refused(args, folder: Path, before: dict) -> None:
    res = run(args)
    assert res.exit_code == 2, (args, res.output)
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and all(x.startswith("hint: ") for x in lines[1:]), \
        res.stderr
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before, args


def test_refusals_write_nothing(models, tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(models["variant-01"].read_bytes())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(models["variant-02"].read_bytes())
    existing = tmp_path / "old.tdd"
    assert run(["pack", str(a), "-o", str(existing), "-q"]).exit_code == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args in (
        ["pack", str(a), "-o", str(existing)],  # exists, no --force
        ["pack", str(a), "-o", str(a), "--force"],  # the output is an input
        ["pack", str(folder), "-o", str(folder / "x.tdd"), "--force"],  # inside an input
        ["pack", str(a), str(tmp_path / "." / "a.safetensors"), "-o", str(tmp_path / "n.tdd")],
        ["pack", f"../x={a}", "-o", str(tmp_path / "n.tdd")],  # not a model name
        ["pack", str(a), "-o", str(tmp_path / "n.tdd"), "--include", "nothing*"],
        ["unpack", str(existing), str(tmp_path), "--force"],  # DEST holds the bundle
        ["unpack", str(existing)],  # neither DEST nor --hf-cache
    ):
        _assert_refused(args, tmp_path, before)


def test_same_input_twice_names_both(models, tmp_path):
    a = str(models["variant-01"])
    res = run(["analyze", a, a.replace("/", "//", 1)])
    assert res.exit_code == 2
    assert a in res.stderr and a.replace("/", "//", 1) in res.stderr


def test_runs_with_stdout_or_stderr_closed(tmp_path):
    """Run from cron or a daemon with fd 2 closed (``sys.stderr`` is None): the report
    still comes out, as it did while rich decided whether to draw a bar."""
    import subprocess
    import sys

    a = make_safetensors(tmp_path / "a.safetensors", {"w": np.ones((64, 64), np.float32)})
    b = make_safetensors(tmp_path / "b.safetensors", {"w": np.zeros((64, 64), np.float32)})
    res = subprocess.run(["sh", "-c", 'exec "$0" -m tdedup analyze --json "$1" "$2" 2>&-',
                          sys.executable, str(a), str(b)], capture_output=True, text=True)
    assert res.returncode == 0
    assert json.loads(res.stdout)["models"][0]["name"] == "a"
    # And stdout closed: nothing to write the report to, no crash either.
    for argv in (["analyze", "--json"], ["analyze", "--markdown", "-"], ["analyze"]):
        res = subprocess.run(["sh", "-c", 'exec "$0" -m tdedup "$@" >&-', sys.executable,
                              *argv, str(a), str(b)], capture_output=True, text=True)
        assert res.returncode == 0, (argv, res.stderr)
        assert "Traceback" not in res.stderr

"""Usage errors typer/click detect (missing option or argument, invalid choice, number out
of range, unknown option or command) look like every other error of tdedup: one
``error:`` line on stderr, a ``hint:`` line naming the help, exit 2; not typer's box of
usage lines."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers.cli_checks import one_line
from tdedup.cli.app import app

runner = CliRunner()

CASES = [
    # (argv, words the error line holds, the command whose help the hint names)
    (["pack", "base/"], ("missing option", "--output"), "pack"),
    (["pack", "base/", "-o", "x.tdd", "--layout", "fast"], ("--layout", "'fast'"), "pack"),
    (["pack", "base/", "-o", "x.tdd", "--level", "99"], ("--level", "22"), "pack"),
    (["pack", "base/", "-o", "x.tdd", "--level", "abc"], ("--level", "'abc'"), "pack"),
    (["pack", "base/", "-o"], ("'-o'", "requires an argument"), "pack"),  # no context
    (["pack"], ("missing argument", "paths"), "pack"),
    (["verify"], ("missing argument", "bundle"), "verify"),
    (["verify", "a.tdd", "b.tdd"], ("unexpected extra argument", "b.tdd"), "verify"),
    (["verify", "--bogus", "a.tdd"], ("no such option", "--bogus"), "verify"),
    (["--bogus"], ("no such option", "--bogus"), None),
    (["nosuch"], ("no such command", "nosuch"), None),
]


def _usage_error(result, *needles: str, command: str | None) -> str:
    line = one_line(result, *needles)
    assert result.stdout == ""
    assert "Usage:" not in result.output and "╭" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[1:] == [f"hint: tdedup {command + ' ' if command else ''}--help"], lines
    return line


@pytest.mark.parametrize("argv, needles, command", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_usage_error_is_one_line(argv, needles, command):
    line = _usage_error(runner.invoke(app, argv), *needles, command=command)
    assert not line.endswith("."), line  # the project's style: no capital, no full stop
    assert line[len("error: ")].islower(), line


def test_user_text_is_escaped_and_never_markup():
    hostile = "[bold red]x\x1b[31m\ny"
    result = runner.invoke(app, ["pack", "base/", "-o", "x.tdd", "--layout", hostile],
                           env={"NO_COLOR": "1"}, color=True)
    line = _usage_error(result, "--layout", "[bold red]x\\x1b[31m\\ny", command="pack")
    assert "\x1b" not in result.stderr and "\x1b" not in line


def test_colour_forced_still_plain():
    result = runner.invoke(app, ["pack", "base/"], env={"FORCE_COLOR": "1"}, color=True)
    _usage_error(result, "--output", command="pack")
    assert "\x1b" not in result.stderr


def test_debug_shows_the_traceback_then_the_line():
    result = runner.invoke(app, ["verify"], env={"TDEDUP_DEBUG": "1"})
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    tail = result.stderr.strip().splitlines()[-2:]
    assert tail == ["error: missing argument 'bundle'", "hint: tdedup verify --help"], tail


def test_bare_command_still_shows_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage:" in result.stdout and "pack" in result.stdout
    assert "error:" not in result.output


def test_help_and_version_unchanged():
    result = runner.invoke(app, ["pack", "--help"])
    assert result.exit_code == 0 and "Usage:" in result.stdout and result.stderr == ""
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("tdedup ")

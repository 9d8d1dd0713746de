"""How a refused CLI call must look: exit 2, one ``error:`` line (``hint:`` lines aside),
no traceback."""

from __future__ import annotations


def one_line(result, *needles: str) -> str:
    """The CLI failed as it must: exit 2, one ``error:`` line holding ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("hint: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def analyze(*args, env: dict | None = None):
    """``tdedup analyze ARGS`` through typer's CliRunner, wide and without colour."""
    from typer.testing import CliRunner

    from tdedup.cli.app import app

    return CliRunner().invoke(app, ["analyze", *map(str, args)],
                              env={"NO_COLOR": "1", "COLUMNS": "200", **(env or {})})

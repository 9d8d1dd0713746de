"""``tdedup analyze --drift`` on a real fine-tuned family: the drift section in every
rendering, and the hint that points at it when it is not asked for."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tdedup.cli.app import app

pytest.importorskip("torch")


def run(*args: str):
    return CliRunner().invoke(app, ["analyze", *args])


def test_drift_json_markdown_and_table(bert_family, tmp_path):
    models = [f"{n}={bert_family[n]}" for n in ("base", "finetune", "frozen")]
    r = run(*models, "--json", "--drift")
    assert r.exit_code == 0, r.output
    drift = json.loads(r.stdout)["drift"]
    by_model = {m["model"]: m for m in drift["models"]}
    assert by_model["finetune"]["differing"] > 0
    # The frozen fine-tune shares its frozen layers with base: fewer slots differ.
    assert by_model["frozen"]["identical"] > by_model["finetune"]["identical"]
    assert drift["layers"] and all(0 < g["bytes_changed"] <= 1 for g in drift["layers"])
    est = drift["estimate"]
    assert est["with_deltas_bytes"] < est["without_deltas_bytes"]

    md = tmp_path / "report.md"
    r = run(*models, "--drift", "--markdown", str(md))
    assert r.exit_code == 0, r.output
    assert "Drift of differing tensors" in r.stdout
    assert "### Drift of differing tensors, by layer" in md.read_text()


def test_hint_points_at_drift(bert_family):
    r = run(str(bert_family["base"]), str(bert_family["finetune"]), "--json")
    assert r.exit_code == 0
    assert "drift" not in json.loads(r.stdout)
    assert "hint:" in r.stderr and "--drift" in r.stderr

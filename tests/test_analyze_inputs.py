"""``tdedup analyze``'s inputs after the third QA pass: globs match the names models get
(derived ones, a bundle's models) and paths; a folder that cannot be listed is reported;
a hub id missing from the cache is named; a bundle's model is reported at the bundle.
(Split GGUF inputs: test_analyze_split.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.factory import make_gguf, make_safetensors, random_tensors
from tdedup.cli.app import app
from helpers.cli_checks import analyze, one_line

runner = CliRunner()


def names(*args) -> list[str]:
    result = analyze("--json", "-q", *args)
    assert result.exit_code == 0, result.output
    return [m["name"] for m in json.loads(result.stdout)["models"]]


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    t = random_tensors(0, {"a": (16, 8), "b": (8,)})
    return {"sdA": make_safetensors(tmp_path / "sdA" / "model.safetensors", t).parent,
            "whole": make_gguf(tmp_path / "whole.gguf", random_tensors(1, {"x": (32,)})),
            "my_model_ü": make_safetensors(tmp_path / "my model ü.safetensors",
                                           random_tensors(2, {"q": (16,)}))}


# -- 3: --include/--exclude match the names models get ----------------------------------


def test_globs_match_derived_names(inputs):
    args = list(inputs.values())
    assert names(*args) == ["sdA", "whole", "my_model_ü"]
    assert names(*args, "--include", "whole") == ["whole"]
    assert names(*args, "--exclude", "my_*") == ["sdA", "whole"]
    assert names(*args, "--include", "*.gguf") == ["whole"]  # the path still matches
    assert names(*args, "--exclude", "sd?") == ["whole", "my_model_ü"]


def test_globs_match_a_bundles_models(inputs, tmp_path):
    bundle = tmp_path / "fam.tdd"
    r = runner.invoke(app, ["pack", str(inputs["sdA"]), str(inputs["whole"]), "-o", str(bundle),
                            "-q"])
    assert r.exit_code == 0, r.output
    assert names(bundle) == ["sdA", "whole"]
    assert names(bundle, "--exclude", "whole") == ["sdA"]
    assert names(bundle, "--include", "sdA") == ["sdA"]
    assert names(bundle, "--include", "fam.tdd") == ["sdA", "whole"]
    one_line(analyze(bundle, "--include", "nothing"), "no models left")
    # pack takes a bundle whole: a glob that keeps part of it is refused, not ignored.
    r = runner.invoke(app, ["pack", str(bundle), str(inputs["my_model_ü"]), "--exclude",
                            "whole", "-o", str(tmp_path / "x.tdd")])
    one_line(r, "fam.tdd", "leave out whole")
    assert not (tmp_path / "x.tdd").exists()


def test_a_bundles_model_is_reported_at_the_bundle(inputs, tmp_path):
    bundle = tmp_path / "fam.tdd"
    runner.invoke(app, ["pack", str(inputs["sdA"]), str(inputs["whole"]), "-o", str(bundle)])
    result = analyze("--json", "-q", bundle, inputs["my_model_ü"])
    models = json.loads(result.stdout)["models"]
    assert [m["path"] for m in models] == [str(bundle), str(bundle),
                                           str(inputs["my_model_ü"])]


# -- 5: a folder that cannot be listed is reported --------------------------------------


def _unlistable(monkeypatch, folder: Path) -> None:
    """``os.scandir(folder)`` fails as it does without the permission (root lists all)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unlistable_subfolder_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "m"
    make_safetensors(root / "model.safetensors", random_tensors(0, {"x": (8,)}))
    locked = root / "locked"
    make_safetensors(locked / "more.safetensors", random_tensors(1, {"y": (8,)}))
    locked.chmod(0)
    try:
        if os.geteuid() == 0:  # root lists anything: make the listing fail as it would
            _unlistable(monkeypatch, locked)
        result = analyze("--json", "-q", f"m={root}")
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
    _unlistable(monkeypatch, root)
    one_line(analyze(root), str(root), "cannot list this folder: Permission denied")


# -- 7: a hub id missing from the cache is named -----------------------------------------


def test_a_hub_id_without_a_cache_names_the_argument(tmp_path):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    old = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(tmp_path / "no-cache")
    try:
        line = one_line(analyze("hf://nonexistent-org/x"), "hf://nonexistent-org/x:",
                              "not in the Hugging Face cache", str(tmp_path / "no-cache"))
    finally:
        constants.HF_HUB_CACHE = old
    assert line.index("hf://nonexistent-org/x") < line.index("no-cache")

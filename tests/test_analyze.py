"""``tdedup analyze`` through its command line, on checkpoints written by the real
libraries: what it finds, its JSON/Markdown/table outputs, the threshold, and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from typer.testing import CliRunner

from helpers.factory import FROZEN_PREFIXES, make_safetensors, random_tensors
from tdedup.analyzers.overlap import SCHEMA_VERSION
from tdedup.cli.app import app

runner = CliRunner()


def run(*args: str, env: dict | None = None):
    return runner.invoke(app, ["analyze", *map(str, args)],
                         env={"NO_COLOR": "1", "COLUMNS": "200", **(env or {})})


def analyze_json(*args) -> dict:
    result = run("--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def by_name(report: dict) -> dict:
    return {m["name"]: m for m in report["models"]}


def pair(report: dict, a: str, b: str) -> dict:
    (p,) = [p for p in report["pairs"] if {p["a"], p["b"]} == {a, b}]
    return p


# -- what it finds ----------------------------------------------------------------------


def test_bert_family(bert_family):
    report = analyze_json(*(f"{k}={v}" for k, v in bert_family.items()))
    models = by_name(report)
    n = models["base"]["tensors"]
    for copy in ("resaved", "sharded"):  # same tensors, other file bytes / other files
        assert pair(report, "base", copy)["shared_tensors"] == n
        assert pair(report, "base", copy)["shared_bytes"] == models["base"]["tensor_bytes"]
    assert models["sharded"]["layout"] == "sharded" and models["sharded"]["weight_files"] > 1
    # Frozen: embeddings, layer 0 and the pooler (no gradient) stay byte-identical.
    frozen = [g for g in report["groups"] if {"base", "frozen"} <= set(g["models"])]
    names = {o["name"] for g in frozen for o in g["occurrences"]}
    assert names == {n for n in names if n.startswith(FROZEN_PREFIXES + ("pooler.",))}
    assert any(n.startswith("encoder.layer.0.") for n in names)
    assert not any(n.startswith("encoder.layer.1.") for n in names)
    ft = pair(report, "base", "finetune")
    assert ft["shared_tensors"] == 2  # the pooler only: every trained tensor moved
    assert models["finetune"]["unique_bytes"] > 0.9 * models["finetune"]["tensor_bytes"]


def test_diffusers_pipeline_and_a_copy(diffusers_pipeline, tmp_path):
    copy = shutil.copytree(diffusers_pipeline, tmp_path / "copy")
    report = analyze_json(f"a={diffusers_pipeline}", f"b={copy}")
    a = by_name(report)["a"]
    assert a["layout"] == "diffusers" and a["files"] >= 4
    assert a["unique_bytes"] == 0
    assert pair(report, "a", "b")["shared_bytes"] == report["distinct_tensor_bytes"]


def test_gguf_family(gguf_family):
    report = analyze_json(*(f"{k}={v}" for k, v in gguf_family.items()))
    size = by_name(report)["f32"]["tensor_bytes"]
    for other in ("retagged", "split", "safetensors"):  # moved offsets, parts, other format
        assert pair(report, "f32", other)["shared_bytes"] == size
    assert by_name(report)["split"]["layout"] == "gguf-split"
    q8 = pair(report, "f32", "q8_0")
    assert q8["shared_tensors"] == 2  # the 1-D tensors stay F32


def test_view_mismatch_reported(tmp_path):
    import numpy as np

    x = np.arange(12, dtype=np.float32)
    a = make_safetensors(tmp_path / "a.safetensors", {"w": x.reshape(3, 4)})
    b = make_safetensors(tmp_path / "b.safetensors", {"w": x.view(np.int32).reshape(4, 3)})
    report = analyze_json(a, b)
    (m,) = report["view_mismatches"]
    assert {(v["dtype"], tuple(v["shape"])) for v in m["views"]} == {("F32", (3, 4)),
                                                                     ("I32", (4, 3))}
    text = run(a, b).stdout
    assert "different dtypes or shapes" in text and "I32[4, 3] in b" in text


# -- outputs ----------------------------------------------------------------------------


def test_json_schema(gguf_family):
    report = analyze_json(gguf_family["f32"], gguf_family["q8_0"])
    assert report["schema_version"] == SCHEMA_VERSION
    for key in ("models", "total_tensor_bytes", "distinct_tensor_bytes", "dedup_ratio",
                "saved_bytes", "pairs", "groups", "view_mismatches"):
        assert key in report
    for m in report["models"]:
        assert {"name", "path", "files", "tensors", "tensor_bytes", "shared_bytes",
                "unique_bytes"} <= set(m)
        assert m["shared_bytes"] + m["unique_bytes"] == m["tensor_bytes"]
    assert {"a", "b", "shared_bytes"} <= set(report["pairs"][0])
    g = report["groups"][0]
    assert {"hash", "bytes", "count", "models", "occurrences"} <= set(g)
    assert report["total_tensor_bytes"] == sum(m["tensor_bytes"] for m in report["models"])
    assert report["saved_bytes"] == report["total_tensor_bytes"] - report["distinct_tensor_bytes"]


def test_tables_for_people(gguf_family):
    result = run(f"one={gguf_family['f32']}", f"two={gguf_family['retagged']}")
    assert result.exit_code == 0
    out = result.stdout
    for title in ("Models", "Shared bytes between models", "Largest shared tensors",
                  "Totals", "dedup ratio", "2.00x", "one", "two"):
        assert title in out
    assert "\x1b[" not in out  # NO_COLOR
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_markdown_to_file_and_stdout(gguf_family, tmp_path):
    target = tmp_path / "summary.md"
    result = run("--json", "--markdown", target, gguf_family["f32"], gguf_family["retagged"])
    assert result.exit_code == 0
    json.loads(result.stdout)  # stdout stays pure JSON
    md = target.read_text()
    assert md.startswith("## tdedup analyze") and "| # | model |" in md and "2.00x" in md
    result = run("--markdown", "-", gguf_family["f32"], gguf_family["retagged"])
    assert result.stdout == md
    result = run("--json", "--markdown", "-", gguf_family["f32"])
    assert result.exit_code == 2 and "both write to stdout" in result.stderr


def test_min_dedup_ratio(gguf_family, tmp_path):
    args = (gguf_family["f32"], gguf_family["retagged"])  # ratio 2.0
    assert run("--min-dedup-ratio", "2", *args).exit_code == 0
    md = tmp_path / "s.md"
    result = run("--json", "--min-dedup-ratio", "2.5", "--markdown", md, *args)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["dedup_ratio"] == 2.0  # the report came first
    assert "below --min-dedup-ratio 2.5" in result.stderr
    assert "**Failed**" in md.read_text()


def test_warns_about_weights_it_does_not_read(tmp_path):
    make_safetensors(tmp_path / "m" / "model.safetensors", random_tensors(0, {"x": (4,)}))
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    result = run("--json", tmp_path / "m")
    assert result.exit_code == 0
    assert "warning: m: pytorch_model.bin not analyzed" in result.stderr


# -- errors: one line naming the file, exit 2, no traceback -----------------------------


def _damaged(tmp_path):
    good = make_safetensors(tmp_path / "good.safetensors", random_tensors(0, {"x": (64,)}))
    raw = good.read_bytes()
    cases = {}
    (tmp_path / "notes.txt").write_text("not a model")
    cases["notes.txt"] = "neither a safetensors nor a GGUF file"
    (tmp_path / "short.safetensors").write_bytes(raw[:4])
    cases["short.safetensors"] = "truncated safetensors file"
    (tmp_path / "cut.safetensors").write_bytes(raw[:-16])
    cases["cut.safetensors"] = "past the end of the file"
    (tmp_path / "garbled.safetensors").write_bytes(raw[:8] + b"#" + raw[9:])
    cases["garbled.safetensors"] = "malformed safetensors header"
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x01")
    cases["cut.gguf"] = "truncated GGUF file"
    cases["missing.gguf"] = "no such file or folder"
    return good, cases


def test_errors_through_the_cli(tmp_path):
    good, cases = _damaged(tmp_path)
    for name, problem in cases.items():
        result = run(good, tmp_path / name)
        assert result.exit_code == 2, name
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and name in lines[0] and problem in lines[0]
        assert "Traceback" not in result.stderr


def test_error_in_a_real_process_and_debug_traceback(tmp_path):
    _, cases = _damaged(tmp_path)
    cmd = [sys.executable, "-m", "tdedup", "analyze", str(tmp_path / "cut.safetensors")]
    env = {k: v for k, v in os.environ.items() if k != "TDEDUP_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cut.safetensors" in proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "TDEDUP_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_units_hashed_side_by_side_give_the_digests_of_one_at_a_time(tmp_path, monkeypatch):
    """``hash_here`` runs units on threads, largest first: each tensor's digest is the
    blake3 of its bytes, whatever the thread count and however a tensor straddles the
    read steps; a missing file stops the run with one error naming it."""
    import functools

    import blake3

    from tdedup.analyzers import scan as scan_module
    from tdedup.analyzers import work_units as wu
    from tdedup.analyzers.scan import hash_models, index_models
    from tdedup.errors import InputError

    monkeypatch.setattr(wu, "HASH_STEP", 4096 + 12)  # steps that split tensors unevenly
    monkeypatch.setattr(scan_module, "plan_units",
                        functools.partial(wu.plan_units, unit_bytes=64 << 10))
    sources = {}
    for i in range(3):
        sources[f"m{i}"] = make_safetensors(tmp_path / f"m{i}.safetensors", random_tensors(
            i, {"big": (300, 97), "a": (33,), "empty": (0,), "b": (128, 128)}))
    args = [f"{n}={p}" for n, p in sources.items()]

    def digests(workers: int) -> dict:
        scanned = hash_models(index_models(args), runner=lambda units, progress=None:
                              wu.hash_here(units, progress, workers=workers))
        return {(m, h.record.name): h.digest for m, hs in scanned.hashed.items() for h in hs}

    one = digests(1)
    assert digests(3) == one
    from safetensors.numpy import load_file
    for m, path in sources.items():
        for name, arr in load_file(str(path)).items():
            assert one[(m, name)] == blake3.blake3(arr.tobytes()).hexdigest()
    gone = tmp_path / "gone.safetensors"
    units = [wu.HashUnit(str(p), wu.FileStamp.of(p), 0, ((8, 64),)) for p in sources.values()]
    units.insert(1, wu.HashUnit(str(gone), wu.FileStamp(64, 0, 1), 0, ((8, 64),)))
    with pytest.raises(InputError) as e:
        list(wu.hash_here(units, workers=2))
    assert e.value.path is not None and "gone.safetensors" in str(e.value.path)

"""The Hugging Face cache as input and output, through huggingface_hub's own cache API.

The cache is built in the test (helpers/hub_helpers.py: two repos sharing weights, one
repo with two revisions, snapshot symlinks into blobs/), from folders that transformers
wrote with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tdedup
from helpers.hub_helpers import build_cache, commit_of
from tdedup.cli.app import app

hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def cache(bert_family, tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("hf"),
                       {"base": bert_family["base"], "ft": bert_family["finetune"]})


@pytest.fixture
def default_cache(cache, monkeypatch) -> Path:
    """The cache as huggingface_hub resolves it (HF_HUB_CACHE, read at import)."""
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_default_cache_in_a_fresh_process(cache, tmp_path):
    """``--hf-cache`` with no folder, and ``hf://``, in a process that imported nothing of
    huggingface_hub before (the CLI's case: pytest's process already has its constants)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "tdedup", "analyze", "--hf-cache", "--json",
                          "-q"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["models"]) == 3
    res = subprocess.run([sys.executable, "-m", "tdedup", "pack", "hf://org/bert", "-o",
                          str(tmp_path / "hub.tdd"), "-q"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


def _independent_totals(snapshots: list[Path]) -> tuple[int, int]:
    """(tensor bytes, distinct tensor bytes) of the snapshots, counted with safetensors."""
    from safetensors import safe_open

    total, distinct = 0, {}
    for snap in snapshots:
        for f in sorted(snap.rglob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                for name in st.keys():
                    data = st.get_tensor(name).tobytes()
                    total += len(data)
                    distinct[hashlib.sha256(data).hexdigest()] = len(data)
    return total, sum(distinct.values())


def test_analyze_hf_cache_one_model_per_revision(cache):
    res = runner.invoke(app, ["analyze", "--hf-cache", str(cache), "--json", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    names = sorted(m["name"] for m in doc["models"])
    assert names == ["org/bert@main", "org/bert@v1", "other/bert-copy@main"]
    snaps = [p for p in cache.glob("models--*/snapshots/*")]
    total, distinct = _independent_totals(snaps)
    assert doc["total_tensor_bytes"] == total
    assert doc["distinct_tensor_bytes"] == distinct
    # blobs/ is never read as a model: each weight is counted once per revision only.
    assert len(doc["models"]) == 3


def test_pack_by_hub_id_matches_the_plain_folder(default_cache, bert_family, tmp_path):
    res = runner.invoke(app, ["pack", "hf://other/bert-copy", "-o", str(tmp_path / "id.tdd"),
                              "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["other/bert-copy@main"]
    plain = tmp_path / "plain"
    shutil.copytree(bert_family["base"], plain)
    ref = tdedup.pack([f"x={plain}"], tmp_path / "plain.tdd")
    size = (tmp_path / "id.tdd").stat().st_size
    assert abs(size - ref.bundle_bytes) <= 0.01 * ref.bundle_bytes
    # A bare org/name (no such path here) resolves the same way; a revision by ref.
    res = runner.invoke(app, ["pack", "org/bert@v1", "-o", str(tmp_path / "v1.tdd"), "-q"])
    assert res.exit_code == 0, res.output


def test_unpack_into_a_cache_loads_with_from_pretrained(default_cache, bert_family, tmp_path):
    bundle = tmp_path / "hub.tdd"
    res = runner.invoke(app, ["pack", "hf://org/bert", "hf://org/bert@v1",
                              "hf://other/bert-copy", "-o", str(bundle), "-q"])
    assert res.exit_code == 0, res.output
    target = tmp_path / "received"
    res = runner.invoke(app, ["unpack", str(bundle), "--hf-cache", str(target), "-q"])
    assert res.exit_code == 0, res.output
    info = hub.scan_cache_dir(target)
    revs = {(r.repo_id, rev.commit_hash) for r in info.repos for rev in r.revisions}
    assert revs == {("org/bert", commit_of("org/bert main")),
                    ("org/bert", commit_of("org/bert v1")),
                    ("other/bert-copy", commit_of("other main"))}
    snap = target / "models--org--bert" / "snapshots" / commit_of("org/bert main")
    assert all(p.is_symlink() for p in snap.iterdir())
    from transformers import AutoModel

    import torch
    model = AutoModel.from_pretrained("org/bert", cache_dir=target, local_files_only=True)
    want = AutoModel.from_pretrained(bert_family["finetune"])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), want.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    v1 = AutoModel.from_pretrained("org/bert", revision="v1", cache_dir=target,
                                   local_files_only=True)
    assert v1 is not None
    # A plain unpack puts org/name@rev under DEST/org--name@rev/ (spec 6.3).
    tdedup.unpack(bundle, tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "org--bert@main", "org--bert@v1", "other--bert-copy@main"]


def test_hub_refusals(default_cache, tmp_path):
    for args in (["pack", "hf://org/nope", "-o", str(tmp_path / "x.tdd")],
                 ["pack", "hf://org/bert@deadbeef", "-o", str(tmp_path / "x.tdd")],
                 ["pack", "hf://org/bert", "hf://org/bert@main", "-o", str(tmp_path / "x.tdd")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("error: ")
        assert list(tmp_path.iterdir()) == []


def test_the_default_cache_is_huggingface_hubs(default_cache):
    res = runner.invoke(app, ["analyze", "--hf-cache", "--json", "-q",
                              "--include", "org/*"])
    assert res.exit_code == 0, res.output
    assert sorted(m["name"] for m in json.loads(res.stdout)["models"]) == [
        "org/bert@main", "org/bert@v1"]


def test_a_missing_huggingface_hub_names_the_extra(cache, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    res = runner.invoke(app, ["analyze", "--hf-cache", str(cache)])
    assert res.exit_code == 2
    assert "huggingface_hub" in res.stderr and "tdedup[hf]" in res.stderr


def test_a_cached_repo_folder_is_its_revisions_never_its_blobs(cache, tmp_path):
    res = runner.invoke(app, ["pack", str(cache / "models--org--bert"), "-o",
                              str(tmp_path / "r.tdd"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["models"] == ["org/bert@main", "org/bert@v1"]
    with tdedup.open_bundle(tmp_path / "r.tdd") as b:
        for m in b.manifest.models:
            assert m.hub is not None and m.hub["repo_id"] == "org/bert"
            assert not any("blobs" in f.path for f in m.files)
            assert all("hub_blob" in f.info for f in m.files)


def test_unpack_into_a_cache_refuses_models_not_from_the_hub(bert_family, tmp_path):
    bundle = tmp_path / "plain.tdd"
    tdedup.pack([f"base={bert_family['base']}"], bundle)
    res = runner.invoke(app, ["unpack", str(bundle), "--hf-cache", str(tmp_path / "hub")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    assert "not packed from the Hugging Face cache" in res.stderr
    assert not (tmp_path / "hub").exists()


def test_an_empty_cache_folder_is_named(tmp_path):
    res = runner.invoke(app, ["analyze", "--hf-cache", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {tmp_path}") and "no cached model" in lines[0]


def _packed_bert(tmp_path) -> Path:
    bundle = tmp_path / "hub.tdd"
    res = runner.invoke(app, ["pack", "hf://org/bert", "-o", str(bundle), "-q"])
    assert res.exit_code == 0, res.output
    return bundle


def test_unpack_over_a_cache_replaces_a_corrupted_blob_of_the_same_size(default_cache,
                                                                       tmp_path):
    """An existing blob is kept only when its sha256 is the manifest's: one of the same
    size with a flipped bit (an LFS blob named by sha256, a small one by git sha1) is
    rewritten, so "every sha256 matches" is true of every file in the snapshot."""
    bundle = _packed_bert(tmp_path)
    target = tmp_path / "received"
    res = runner.invoke(app, ["unpack", str(bundle), "--hf-cache", str(target), "-q"])
    assert res.exit_code == 0, res.output
    with tdedup.open_bundle(bundle) as b:
        want = {f.info["hub_blob"]: f.sha256 for f in b.model("org/bert@main").files}
    blobs = target / "models--org--bert" / "blobs"
    lfs = next(n for n in want if len(n) == 64)
    small = next(n for n in want if len(n) == 40)
    for name in (lfs, small):
        data = bytearray((blobs / name).read_bytes())
        data[len(data) // 2] ^= 1
        (blobs / name).write_bytes(data)
    res = runner.invoke(app, ["unpack", str(bundle), "--hf-cache", str(target)])
    assert res.exit_code == 0, res.output
    assert "every sha256 matches" in res.stdout
    for name, sha in want.items():
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == sha, name
    assert sorted(p.name for p in (target / "models--org--bert").iterdir()) == [
        "blobs", "refs", "snapshots"]


def test_a_killed_unpack_leaves_no_staging_the_hub_scanner_trips_over(default_cache,
                                                                      tmp_path):
    """SIGKILL mid-restore: the staging folder is inside the repo folder (where
    scan_cache_dir does not look), and the next run removes it, not a live run's."""
    import os
    import subprocess
    import sys

    from tdedup._fs import open_temp

    bundle = _packed_bert(tmp_path)
    target = tmp_path / "received"
    script = ("import os, signal, sys\n"
              "from tdedup.ops.hub_unpack import unpack_to_cache\n"
              "def progress(phase, n, total):\n"
              "    if phase == 'restoring':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "unpack_to_cache(sys.argv[1], sys.argv[2], progress=progress)\n")
    res = subprocess.run([sys.executable, "-c", script, str(bundle), str(target)],
                         capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    repo = target / "models--org--bert"
    assert [p.name for p in target.iterdir()] == [repo.name]
    assert any(p.name.startswith(".tdedup-stage-") for p in repo.iterdir())
    assert hub.scan_cache_dir(target).warnings == []
    # A run in progress (this process holds its lock) keeps its folder.
    live = repo / f".tdedup-stage-{os.getpid()}-0123abcd"
    lock, f = open_temp(live)
    live.mkdir()
    try:
        res = runner.invoke(app, ["unpack", str(bundle), "--hf-cache", str(target), "-q"])
        assert res.exit_code == 0, res.output
        left = sorted(p.name for p in repo.iterdir())
        assert left == sorted([lock.name, live.name, "blobs", "refs", "snapshots"])
    finally:
        f.close()
        live.rmdir()
        lock.unlink()
    info = hub.scan_cache_dir(target)
    assert info.warnings == [] and [r.repo_id for r in info.repos] == ["org/bert"]

"""The incremental tensor-hash index: what it reuses, what it re-hashes, what it refuses
to record, and the database itself (schema, foreign files, two writers)."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from helpers.factory import make_gguf, make_safetensors, random_tensors

from tdedup.analyzers.index import APPLICATION_ID, SCHEMA_VERSION, TensorIndex
from tdedup.analyzers.overlap import compute_overlap
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.errors import InputError

SHAPES = {"a.weight": (64, 32), "b.weight": (32,), "c.weight": (16, 16)}


def settle(*paths, age_s: float = 60) -> None:
    """Date files in the past, as a corpus that is not being written to is."""
    t = time.time_ns() - int(age_s * 1e9)
    for p in paths:
        os.utime(p, ns=(t, t))


@pytest.fixture
def family(tmp_path):
    base = random_tensors(0, SHAPES)
    tuned = {**base, "c.weight": base["c.weight"] + 1}
    files = [make_safetensors(tmp_path / "base.safetensors", base),
             make_safetensors(tmp_path / "tuned.safetensors", tuned),
             make_gguf(tmp_path / "base.gguf", base)]
    settle(*files)
    return files


def scan(files, **kw):
    return hash_models(index_models([str(f) for f in files]), **kw)


def report(scanned) -> dict:
    return compute_overlap(scanned.models, scanned.hashed).to_dict()


def test_second_run_hashes_nothing_and_reports_the_same(family, tmp_path):
    with TensorIndex(tmp_path / "tensors.db") as index:
        first = scan(family, index=index)
        second = scan(family, index=index)
    assert (first.counts.hashed_files, first.counts.indexed_files) == (3, 0)
    assert (second.counts.hashed_files, second.counts.hashed_bytes) == (0, 0)
    assert second.counts.indexed_files == 3
    assert report(second) == report(first) == report(scan(family))


def test_touched_file_alone_is_rehashed(family, tmp_path):
    with TensorIndex(tmp_path / "tensors.db") as index:
        scan(family, index=index)
        settle(family[1], age_s=30)  # new mtime, same bytes
        again = scan(family, index=index)
        assert again.counts.hashed_files == 1 and again.counts.indexed_files == 2
        # ... and recorded under its new stamp, in place of the old entry.
        assert scan(family, index=index).counts.hashed_files == 0
        assert (index.stats().files, index.stats().tensors) == (3, 9)


def test_rewritten_file_gets_its_new_digests(family, tmp_path):
    with TensorIndex(tmp_path / "tensors.db") as index:
        scan(family, index=index)
        other = random_tensors(9, SHAPES)
        make_safetensors(family[0], other)  # new inode too
        settle(family[0], age_s=30)
        again = scan(family, index=index)
    assert again.counts.hashed_files == 1
    assert report(again) == report(scan(family))


def test_file_changed_while_hashed_is_not_recorded(family, tmp_path):
    target = family[0]
    fired = []

    def meddle(n: int) -> None:  # progress runs between tensors: rewrite one byte
        if not fired:
            fired.append(n)
            with open(target, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                b = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([b[0] ^ 1]))
            settle(target, age_s=10)

    with TensorIndex(tmp_path / "tensors.db") as index:
        scanned = scan([target], index=index, progress=meddle)
        assert scanned.counts.changed == [str(target)]
        assert index.stats().files == 0
        assert scan([target], index=index).counts.hashed_files == 1


def test_freshly_written_file_is_used_but_not_recorded(tmp_path):
    fresh = make_safetensors(tmp_path / "fresh.safetensors", random_tensors(1, SHAPES))
    with TensorIndex(tmp_path / "tensors.db") as index:
        assert scan([fresh], index=index).counts.hashed_files == 1
        assert index.stats().files == 0  # its mtime could still move unseen
        settle(fresh)
        scan([fresh], index=index)
        assert index.stats().files == 1


def test_stats(family, tmp_path):
    with TensorIndex(tmp_path / "tensors.db") as index:
        scanned = scan(family, index=index)
        stats = index.stats()
        r = report(scanned)
        assert (stats.files, stats.tensors, stats.schema_version) == (3, 9, SCHEMA_VERSION)
        assert stats.tensor_bytes == r["total_tensor_bytes"]
        assert stats.distinct_tensor_bytes == r["distinct_tensor_bytes"]
        assert stats.stale_files == 0
        family[2].unlink()
        settle(family[1], age_s=5)
        assert index.stats().stale_files == 2


def test_two_connections_share_one_index(family, tmp_path):
    path = tmp_path / "tensors.db"
    with TensorIndex(path) as a, TensorIndex(path) as b:
        scan(family[:1], index=a)
        assert scan(family, index=b).counts.indexed_files == 1
        assert scan(family, index=a).counts.indexed_files == 3
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_refuses_what_is_not_an_index(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(InputError, match="not a tdedup index"):
        TensorIndex(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(InputError, match="something else"):
        TensorIndex(other)
    with pytest.raises(InputError, match="no such index"):
        TensorIndex(tmp_path / "missing.db", create=False)


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "tensors.db"
    TensorIndex(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(InputError, match="newer") as e:
        TensorIndex(path)
    assert e.value.hint


# -- through the command line -----------------------------------------------------------


def test_cli_second_run_hashes_nothing_and_stats(family, tmp_path):
    import json

    from typer.testing import CliRunner

    from tdedup.cli.app import app

    runner = CliRunner()
    db = tmp_path / "tensors.db"
    args = ["analyze", "--json", "--index", str(db), *map(str, family)]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == second.exit_code == 0, first.stderr
    assert first.stdout == second.stdout == runner.invoke(app, args[:2] + args[4:]).stdout
    assert "0 of 3 weight files taken from" in first.stderr
    assert "3 of 3 weight files taken from" in second.stderr and "0 hashed" in second.stderr
    stats = runner.invoke(app, ["index", str(db), "--stats", "--json"])
    assert stats.exit_code == 0 and json.loads(stats.stdout)["files"] == 3
    table = runner.invoke(app, ["index", str(db), "--stats"], env={"NO_COLOR": "1"})
    assert "distinct tensors" in table.stdout
    missing = runner.invoke(app, ["index", str(tmp_path / "nope.db"), "--stats"])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
    assert "nope.db: no such index" in missing.stderr


def test_an_index_in_a_folder_that_does_not_exist_yet_is_created(tmp_path):
    """``--index ~/.cache/tdedup/tensors.db`` on a machine without that folder: "created
    when missing" covers its folder (it failed: unable to open database file)."""
    path = tmp_path / "not" / "yet" / "tensors.db"
    with TensorIndex(path):
        pass
    assert path.is_file()

"""Hashing on a Dask ``LocalCluster`` of 2 worker processes: the same digests as a local
run, also when a worker is killed mid-run; the errors it can end with."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading

import pytest

from tdedup.analyzers import scan as scan_module
from tdedup.analyzers.distributed import DaskAddress, run_units
from tdedup.analyzers.overlap import compute_overlap
from tdedup.analyzers.scan import hash_models, index_models
from tdedup.analyzers.work_units import FileStamp, HashUnit, plan_units
from tdedup.errors import TdedupError, UsageError

distributed = pytest.importorskip("distributed")

SUBSET = ("minilm/base", "minilm/ft-freeze", "minilm-gguf/q8_0.gguf", "smollm/q4_1.gguf")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    with cluster, distributed.Client(cluster) as c:
        yield c


def report(scanned) -> dict:
    return compute_overlap(scanned.models, scanned.hashed).to_dict()


def test_parse_address():
    assert DaskAddress.parse("local:3") == DaskAddress(None, 3)
    assert DaskAddress.parse("local").local_workers == (os.cpu_count() or 1)
    assert DaskAddress.parse("tcp://10.0.0.1:8786") == DaskAddress("tcp://10.0.0.1:8786", None)
    for bad in ("local:0", "10.0.0.1:8786", "local:x"):
        with pytest.raises(UsageError):
            DaskAddress.parse(bad)


def test_plan_units_keeps_tensors_whole_and_in_order():
    ranges = [(0, 10), (10, 300), (310, 5), (315, 5), (320, 1000)]
    units = plan_units("/x", FileStamp(1320, 0, 1), ranges, unit_bytes=300)
    assert [u.first for u in units] == [0, 1, 2, 4]
    assert [r for u in units for r in u.ranges] == ranges


@pytest.mark.corpus
def test_killed_worker_gives_the_same_report(client, corpus, monkeypatch):
    args = [f"{e.replace('/', '-')}={corpus / e}" for e in SUBSET]
    expected = report(hash_models(index_models(args)))
    # Small units, so that many are queued or done-but-unfetched when a worker dies.
    monkeypatch.setattr(scan_module, "plan_units",
                        functools.partial(plan_units, unit_bytes=1 << 20))
    killed = []

    def runner(units, progress=None):
        assert len(units) > 50
        for item in run_units(client, units, progress):
            if not killed:
                pid = next(iter(client.run(os.getpid).values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            yield item

    scanned = hash_models(index_models(args), runner=runner)
    assert killed and report(scanned) == expected


def test_unreadable_file_on_a_worker_is_one_line(client, tmp_path):
    missing = str(tmp_path / "gone.safetensors")
    units = [HashUnit(missing, FileStamp(8, 0, 1), 0, ((0, 8),))]
    with pytest.raises(TdedupError) as e:
        list(run_units(client, units))
    assert "gone.safetensors" in e.value.message and "\n" not in e.value.message
    assert "shared file system" in e.value.hint


def test_workers_dying_too_often_is_one_line(monkeypatch, tmp_path):
    """When the scheduler gives up on a task (KilledWorker), the run ends with one line
    naming the file instead of a report missing its tensors."""
    units = [HashUnit(str(tmp_path / "m.safetensors"), FileStamp(8, 0, 1), 0, ((0, 8),))]

    class Client:
        loop = None

        def map(self, fn, items, key):
            self.keys = key
            return key

        def cancel(self, futures):
            pass

    def as_completed(futures, with_results, loop=None):
        raise distributed.KilledWorker(futures[0], "tcp://127.0.0.1:1", 3)
        yield

    monkeypatch.setattr(distributed, "as_completed", as_completed)
    with pytest.raises(TdedupError) as e:
        list(run_units(Client(), units))
    assert e.value.path == units[0].path and "allowed-failures" in e.value.message


def test_another_current_client_in_the_process(client, tmp_path):
    """A ``with Client():`` of another cluster (the fixture's, current for this module)
    must not capture our run: as_completed once took the current client's loop and then
    waited forever, about one run in three. A hang fails here instead of stalling."""
    from helpers.factory import make_safetensors, random_tensors

    from tdedup.analyzers.distributed import dask_runner

    path = make_safetensors(tmp_path / "m.safetensors",
                            random_tensors(0, {"a": (256, 256), "b": (64,)}))
    expected = hash_models(index_models([str(path)])).hashed
    got: list = []

    def work():
        with dask_runner("local:1") as runner:
            got.append(hash_models(index_models([str(path)]), runner=runner).hashed)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the Dask run hung"
    assert got == [expected]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m tdedup ...`` in its own session, killed whole (cluster processes too)
    if it outlives ``timeout``: a hang fails the test instead of stalling the suite."""
    proc = subprocess.Popen([sys.executable, "-m", "tdedup", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"tdedup {' '.join(args[:3])} ... hung for {timeout} s; stderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.corpus
def test_cli_json_equals_the_local_run_on_the_corpus(corpus, corpus_facts, tmp_path):
    """``python -m tdedup analyze --dask local:2`` (a LocalCluster of 2 processes) prints
    the local run's report, and the index it fills serves a local run."""
    args = [f"{e.replace('/', '-')}={corpus / e}" for e in corpus_facts["models"]]
    db = str(tmp_path / "tensors.db")
    local = run_cli("analyze", "--json", *args)
    dask = run_cli("analyze", "--json", "--dask", "local:2", "--index", db, *args)
    assert local.returncode == dask.returncode == 0, dask.stderr
    assert dask.stdout == local.stdout
    assert "dask: hashing on tcp://" in dask.stderr and "(2 workers)" in dask.stderr
    again = run_cli("analyze", "--json", "--index", db, *args)
    assert again.stdout == local.stdout and ", 0 hashed (0 B)" in again.stderr


def test_without_distributed_is_one_line(monkeypatch):
    from tdedup.analyzers.distributed import dask_runner

    monkeypatch.setitem(__import__("sys").modules, "distributed", None)
    with pytest.raises(UsageError) as e, dask_runner("local:1"):
        pass
    assert "tdedup[dask]" in e.value.hint

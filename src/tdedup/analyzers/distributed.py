"""Hashing on a Dask distributed cluster: ``tdedup analyze --dask ADDRESS``.

``ADDRESS`` is a running scheduler (``tcp://host:8786``, any ``scheme://``) or
``local[:N]``, a ``LocalCluster`` of N single-threaded worker processes started for this
run (N = the CPU count when omitted).

Each :class:`~.work_units.HashUnit` (a file, or a run of a large file's tensors) becomes
one task running :func:`~.work_units.hash_unit` on a worker. Workers open the files by the
absolute path the client planned with, so every worker must see the models at the same
path as the client (a shared file system: NFS, Lustre, a bind mount) and import the same
tdedup. Only digests travel back; the client puts them in file order, so the report is
the one a local run writes, byte for byte.

A file a worker cannot open at all is the one error that says the worker does not see
the client's paths, and only it carries the shared-file-system hint; a file that
changed or shrank while it was hashed is reported as it is (the hint would send the
user looking at the wrong thing). The ``LocalCluster`` tdedup starts logs nothing below
CRITICAL: a task's error is tdedup's one line on stderr, not the worker's traceback too.

A worker that dies mid-task loses its results; the scheduler runs its tasks again on
another worker (hashing is a pure function of the file's bytes, so the retry gives the
same digests). When a task has killed ``distributed.scheduler.allowed-failures`` workers
the run stops with one line naming the file, never with a partial report.

``dask`` and ``distributed`` are the optional extra ``tdedup[dask]``, imported only here
and only when ``--dask`` is given.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import InputError, TdedupError, UsageError
from .work_units import HashUnit, UnitDigests, hash_unit

#: The hint of a file a worker cannot open: its paths are not the client's.
SHARED_FS_HINT = ("every Dask worker must see the models at the client's paths (a shared "
                  "file system)")

LOCAL_RE = re.compile(r"^local(?::(\d+))?$")
SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://.+")
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True, slots=True)
class DaskAddress:
    """A parsed ``--dask`` value: a scheduler address, or a local cluster's size."""

    scheduler: str | None
    local_workers: int | None

    @classmethod
    def parse(cls, text: str) -> DaskAddress:
        m = LOCAL_RE.match(text)
        if m:
            n = int(m[1]) if m[1] else (os.cpu_count() or 1)
            if n < 1:
                raise UsageError(f"--dask {text}: a local cluster needs at least 1 worker")
            return cls(None, n)
        if SCHEME_RE.match(text):
            return cls(text, None)
        raise UsageError(f"--dask {text!r}: give a scheduler address (tcp://host:8786) "
                         "or local[:N]")


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise UsageError("--dask needs Dask distributed, which is not installed",
                         hint="pip install 'tdedup[dask]'") from e
    return distributed


class DaskRunner:
    """Runs units on a connected cluster; ``address`` and ``workers`` say which."""

    def __init__(self, client) -> None:
        self.client = client

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def __call__(self, units: Sequence[HashUnit],
                 progress: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[int, UnitDigests]]:
        return run_units(self.client, units, progress)


@contextmanager
def dask_runner(address: str) -> Iterator[DaskRunner]:
    """Connect to (or start) the cluster ``address`` names; yield a unit runner."""
    where = DaskAddress.parse(address)
    distributed = _import_distributed()
    cluster = None
    try:
        if where.local_workers is not None:
            # ":0": the scheduler's HTTP server on a free port, not 8787, which another
            # cluster on the machine may hold (distributed then warns on stderr).
            # CRITICAL: a failed task is logged by its worker at ERROR, with the
            # traceback, before the client reports it as tdedup's one line.
            cluster = distributed.LocalCluster(
                n_workers=where.local_workers, threads_per_worker=1, processes=True,
                dashboard_address=":0", silence_logs=logging.CRITICAL)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(where.scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise TdedupError(f"cannot reach the Dask scheduler at {address}: {e}") from e
    try:
        yield DaskRunner(client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def hash_unit_on_worker(unit: HashUnit) -> UnitDigests:
    """:func:`~.work_units.hash_unit` as a worker runs it: a file the worker cannot open
    at all (missing, no permission: not the client's file system) carries
    :data:`SHARED_FS_HINT`; any later error (the file changed, shrank) is raised as it is."""
    try:
        fd = os.open(unit.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"cannot open it on a Dask worker: {e.strerror or e}",
                         path=unit.path, hint=SHARED_FS_HINT) from None
    os.close(fd)
    return hash_unit(unit)


def run_units(client, units: Sequence[HashUnit], progress: Callable[[int], None] | None = None
              ) -> Iterator[tuple[int, UnitDigests]]:
    """Hash ``units`` on ``client``'s cluster; yield ``(unit number, digests)`` as they
    finish, in any order."""
    distributed = _import_distributed()
    if not units:
        return
    run = uuid.uuid4().hex[:12]
    keys = [f"tdedup-hash-{run}-{i}" for i in range(len(units))]
    number = {k: i for i, k in enumerate(keys)}
    futures = client.map(hash_unit_on_worker, units, key=keys)
    try:
        seen: set[int] = set()
        # The client's own loop: left out, as_completed takes the *current* client's
        # (a `with Client():` block elsewhere in the process), and with another
        # cluster's client there it waits forever.
        done = distributed.as_completed(futures, with_results=True, loop=client.loop)
        for future, result in done:
            i = number[future.key]
            if i in seen:  # a result gathered again after a reschedule: the same digests
                continue
            seen.add(i)
            if progress:
                progress(units[i].nbytes)
            yield i, result
    except distributed.KilledWorker as e:
        key = e.args[0] if e.args else None
        path = units[number[key]].path if key in number else None
        raise TdedupError("Dask workers died while hashing this file, more often than the "
                          "scheduler retries (distributed.scheduler.allowed-failures)",
                          path=path) from e
    except InputError as e:  # from a worker: its hint kept (only an unopenable file has one)
        raise InputError(e.problem, path=e.path, hint=e.hint) from e
    except distributed.client.FutureCancelledError as e:
        raise TdedupError(f"the Dask cluster cancelled the hashing ({e})") from e
    finally:
        client.cancel(futures)

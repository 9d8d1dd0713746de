"""ops/ordered.in_order: results in order, run ahead within a window bounded by bytes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tdedup.ops.ordered import ITEMS_PER_WORKER, in_order


def _tracking(delay_of):
    """A job that records how many jobs were submitted but not yet handed over."""
    state = {"running": 0, "peak": 0}
    lock = threading.Lock()

    def job(item):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(delay_of(item))
        with lock:
            state["running"] -= 1
        return item
    return job, state


def test_results_come_in_order_whatever_finishes_first():
    with ThreadPoolExecutor(4) as pool:
        job, _ = _tracking(lambda i: 0.02 if i % 3 == 0 else 0.0)
        assert list(in_order(pool, job, range(40), workers=4)) == list(range(40))


def test_a_large_head_does_not_stop_small_items_behind_it():
    """The head (one slow, large item) is still running while the other worker gets
    through many small items: the count bound is per worker, not six in all."""
    done_while_head_runs = []
    head_running = threading.Event()

    def job(item):
        if item == 0:
            head_running.set()
            time.sleep(0.3)
        elif head_running.is_set():
            done_while_head_runs.append(item)
        return item

    sizes = [100 << 20] + [1000] * 20
    with ThreadPoolExecutor(2) as pool:
        got = list(in_order(pool, job, range(len(sizes)), workers=2,
                            size=lambda i: sizes[i]))
    assert got == list(range(len(sizes)))
    assert len(done_while_head_runs) >= 15


def test_bytes_bound_the_window_but_every_worker_has_an_item():
    seen_ahead = []

    def items():
        for i in range(12):
            yield i

    with ThreadPoolExecutor(3) as pool:
        gen = in_order(pool, lambda i: (time.sleep(0.01), i)[1], items(), workers=3,
                       size=lambda i: 100, max_bytes=250)
        for got in gen:
            seen_ahead.append(got)
    assert seen_ahead == list(range(12))
    # Items far larger than the byte bound still run one per worker at once.
    job, state = _tracking(lambda i: 0.05)
    with ThreadPoolExecutor(3) as pool:
        assert list(in_order(pool, job, range(6), workers=3, size=lambda i: 1 << 40,
                             max_bytes=1)) == list(range(6))
    assert state["peak"] == 3


def test_the_count_bounds_tiny_items():
    job, state = _tracking(lambda i: 0.001)
    with ThreadPoolExecutor(64) as pool:
        list(in_order(pool, job, range(200), workers=1))
    assert state["peak"] <= ITEMS_PER_WORKER


def test_an_error_reaches_the_consumer_in_its_place():
    def job(i):
        if i == 5:
            raise ValueError("item 5")
        return i

    got = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="item 5"):
        for r in in_order(pool, job, range(10), workers=2):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]

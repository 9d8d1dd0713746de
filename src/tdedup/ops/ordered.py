"""Work run ahead on a thread pool, its results taken in order, within a bounded window.

``pack``, ``add`` and ``convert`` encode (or decode) blobs on a pool and write them in
order. What is ahead of the writer is held in memory, so the window is bounded by the
bytes of the items in it (and a count), never by a count alone: with a count of six, one
large blob at the head kept the writer waiting while the other worker, its few small
jobs done, idled behind it (pack of the corpus's MiniLM family: a second core half idle
for its last 0.8 s; bench/RESULTS.md). At least ``min_items`` items are always in flight,
so that every worker has one however large they are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Bytes of items ahead of the consumer, beyond ``min_items`` of them.
WINDOW_BYTES = 256 << 20
#: Items ahead of the consumer per worker, whatever their size.
ITEMS_PER_WORKER = 16


def in_order(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], *,
             workers: int, size: Callable[[T], int] = lambda item: 0,
             max_bytes: int = WINDOW_BYTES) -> Iterator[R]:
    """``fn(item)`` for every item, in order, run ahead on ``pool`` while the items in
    flight hold at most ``max_bytes`` (``size`` of each) and number at most
    ``ITEMS_PER_WORKER * workers``, and always at least ``workers`` of them. A result is
    handed over as soon as it is the oldest one done, so that it is not held longer than
    the consumer takes."""
    min_items = max(1, workers)
    max_items = ITEMS_PER_WORKER * min_items
    pending: deque[tuple[Future, int]] = deque()
    held = 0
    for item in items:
        n = size(item)
        while pending and (pending[0][0].done() or len(pending) >= max_items or (
                len(pending) >= min_items and held + n > max_bytes)):
            fut, m = pending.popleft()
            held -= m
            yield fut.result()
        pending.append((pool.submit(fn, item), n))
        held += n
    while pending:
        yield pending.popleft()[0].result()

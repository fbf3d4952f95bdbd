"""Batched recording for request paths: counts and observations kept in plain Python, flushed
into prometheus-client children every ``FLUSH_INTERVAL_S``.

A store into a multiprocess metric costs a lock and an mmap write (1 to 3 µs each); a request
through the proxy would make six or more of them. Here a request adds to Python ints instead
(tens of nanoseconds), and one task per event loop pushes the sums out ten times a second, as
Ray's routers do with their cached metrics (``RAY_SERVE_METRICS_EXPORT_INTERVAL_MS``, 100 ms).
Samples appear up to ``FLUSH_INTERVAL_S`` late; what a process records in its last interval
before it dies is lost unless it calls ``flush_now``.

Single-threaded: a ``PendingCount`` or ``PendingHistogram`` is used from its loop's thread
only (the task flushes on that loop). Callers on other threads record straight into children.

``register(loop, flush)`` runs ``flush`` periodically only in processes that export metrics
(``metrics.enabled()``); elsewhere (a driver, unit tests) nothing runs and tests call the
owners' ``flush`` themselves.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from shoal.runtime import metrics

logger = logging.getLogger("shoal.metrics")

FLUSH_INTERVAL_S = 0.1


class PendingCount:
    """Increments of one counter child: ``n += 1`` per event, ``flush`` adds them."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0

    def flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self.child.inc(n)


class PendingHistogram:
    """Observations of one histogram child, counted per bucket; ``flush`` adds them to the
    child's buckets and sum, which is what as many ``observe`` calls would have done
    (prometheus-client stores per-bucket counts and the sum; ``test_metrics_batch`` checks the
    exposition is the same)."""

    __slots__ = ("_bounds", "_buckets", "_counts", "_sum", "_total", "n")

    def __init__(self, child: Any, boundaries: Sequence[float]) -> None:
        self._bounds = sorted(boundaries)
        self._buckets = child._buckets  # one per bound, then +Inf
        self._sum = child._sum
        if len(self._buckets) != len(self._bounds) + 1:
            raise RuntimeError("unexpected prometheus-client histogram layout")
        self._counts = [0] * len(self._buckets)
        self._total = 0.0
        self.n = 0

    @property
    def pending_sum(self) -> float:
        """The sum of the observations not flushed yet."""
        return self._total

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._total += value
        self.n += 1

    def flush(self) -> None:
        if not self.n:
            return
        counts, total = self._counts, self._total
        self._counts, self._total, self.n = [0] * len(counts), 0.0, 0
        self._sum.inc(total)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


_flushes: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def register(loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> bool:
    """Call ``flush`` on ``loop`` every ``FLUSH_INTERVAL_S`` if this process exports metrics
    (from ``loop``'s thread); returns whether it will."""
    if not metrics.enabled():
        return False
    _flushes.setdefault(loop, []).append(flush)
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_flush_forever(loop), name="shoal-metrics-flush")
    return True


def unregister(loop: asyncio.AbstractEventLoop, flush: Callable[[], None]) -> None:
    flushes = _flushes.get(loop)
    if flushes is not None and flush in flushes:
        flushes.remove(flush)


def flush_now(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop``'s flushes now (a process about to exit)."""
    for flush in list(_flushes.get(loop, ())):
        try:
            flush()
        except Exception:
            logger.exception("flushing metrics failed")


async def _flush_forever(loop: asyncio.AbstractEventLoop) -> None:
    try:
        while _flushes.get(loop):
            await asyncio.sleep(FLUSH_INTERVAL_S)
            flush_now(loop)
    finally:
        if _tasks.get(loop) is asyncio.current_task():
            del _tasks[loop]

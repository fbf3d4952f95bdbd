"""A replica's own metrics, under Ray Serve 2.60's names, labels and semantics.

Every series carries ``deployment``, ``replica`` and ``application`` (the replica's, as Ray's
``ray.serve.metrics`` add them); the per-request ones also ``route`` (the request's route: the
route prefix for HTTP, the caller's route for handle calls):

- ``ray_serve_deployment_replica_starts_total``: 1 for each replica, counted when it starts
  (before its constructor runs, as Ray counts it).
- ``ray_serve_deployment_request_counter_total`` {route}: requests that finished without an
  exception. ``ray_serve_deployment_error_counter_total`` {route, exception_type}: requests that
  raised (the exception's class name; ``CancelledError`` for a cancelled request), HTTP requests
  whose user code raised included (they are answered with a 500).
- ``ray_serve_deployment_processing_latency_ms`` {route}: each request's time in the replica,
  from being accepted to its last response item, in Ray's buckets.
- ``ray_serve_replica_processing_queries``: requests running now (the supervisor's own calls,
  health checks and metrics, excluded, as in Ray).
- ``ray_serve_deployment_max_processing_latency_ms`` {route}: the longest processing latency of
  the last 60 s (6 buckets of 10 s), and ``ray_serve_replica_utilization_percent``: the processing
  time of the last 600 s (60 buckets) over ``600 s * max_ongoing_requests``, capped at 100. Both
  are set every 10 s, as Ray's (``RAY_SERVE_REPLICA_*`` defaults).

Requests rejected at once (``max_ongoing_requests`` reached, draining) count nowhere, as in Ray.

Cost: a request adds its outcome to its route's tallies (``metrics_batch``: plain ints and a
bucket index found by bisection) and sets a Python int for the ongoing count; nothing touches
the shared-memory samples (each store there costs a lock, an ``os.getpid()`` and an mmap write).
In a replica that exports metrics the tallies and the ongoing count are written every
``metrics_batch.FLUSH_INTERVAL_S`` (100 ms, as Ray's replicas buffer them for
``RAY_SERVE_METRICS_EXPORT_INTERVAL_MS``), whatever the request rate; so a caller may scrape up to
100 ms before its request is counted. Elsewhere (a process that records in memory), and from
``stop_reporting`` on (a draining replica: what it counts reaches the files before it exits),
they are written once per loop iteration, however many requests ended in it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shoal.runtime import metrics_batch
from shoal.runtime.metrics import LATENCY_BUCKETS_MS, Counter, Gauge, Histogram
from shoal.runtime.metrics_batch import PendingCount, PendingHistogram

# Ray Serve 2.60's RAY_SERVE_REPLICA_MAX_PROCESSING_LATENCY_* and RAY_SERVE_REPLICA_UTILIZATION_*.
MAX_LATENCY_WINDOW_S = 60.0
MAX_LATENCY_NUM_BUCKETS = 6
UTILIZATION_WINDOW_S = 600.0
UTILIZATION_NUM_BUCKETS = 60
REPORT_INTERVAL_S = 10.0

SERVE_TAG_KEYS = ("deployment", "replica", "application")


class RollingWindow:
    """Values added over the last ``window_s`` seconds, kept in ``num_buckets`` buckets of time
    (Ray's ``RollingWindowAccumulator`` / ``RollingWindowMax``): ``total()`` sums them, ``max()``
    takes their largest (0 if none). A bucket leaves the window whole, so the window is between
    ``window_s - window_s / num_buckets`` and ``window_s`` long. ``clock`` is monotonic seconds.
    """

    __slots__ = ("_bucket_s", "_clock", "_ids", "_maxes", "_num_buckets", "_sums")

    def __init__(self, window_s: float, num_buckets: int, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0 or num_buckets <= 0:
            raise ValueError("window_s and num_buckets must be positive")
        self._bucket_s = window_s / num_buckets
        self._num_buckets = num_buckets
        self._sums = [0.0] * num_buckets
        self._maxes = [0.0] * num_buckets
        self._ids = [-1] * num_buckets  # the absolute bucket number each slot holds
        self._clock = clock

    def add(self, value: float) -> None:
        bucket = int(self._clock() / self._bucket_s)
        slot = bucket % self._num_buckets
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._sums[slot] = value
            self._maxes[slot] = value
            return
        self._sums[slot] += value
        if value > self._maxes[slot]:
            self._maxes[slot] = value

    def _live(self) -> list[int]:
        oldest = int(self._clock() / self._bucket_s) - self._num_buckets
        return [slot for slot, bucket in enumerate(self._ids) if bucket > oldest]

    def total(self) -> float:
        return sum(self._sums[slot] for slot in self._live())

    def max(self) -> float:
        return max((self._maxes[slot] for slot in self._live()), default=0.0)


class RouteMetrics:
    """One route's label children, bound once (``errors`` by exception type, as they come), and
    its tallies since they were last written."""

    __slots__ = ("dirty", "errors", "failed", "latency_ms", "max_latency_ms", "max_pending_ms", "ok", "route")

    def __init__(self, route: str, requests: Any, latency_ms: Any, max_latency_ms: RollingWindow) -> None:
        self.route = route
        self.ok = PendingCount(requests)
        self.latency_ms = PendingHistogram(latency_ms, LATENCY_BUCKETS_MS)
        self.errors: dict[str, Any] = {}
        self.max_latency_ms = max_latency_ms
        self.failed: dict[str, int] = {}
        self.max_pending_ms = 0.0
        self.dirty = False


class ReplicaMetrics:
    """Records one replica's metrics (see the module's docstring).

    ``count_start()`` once when the replica starts; ``route(r)`` before a request runs (bound
    once per route), ``finished(route, latency_ms, exception_type)`` when it ends;
    ``set_ongoing(n)`` when the number running changes; ``start_reporting()`` on the replica's
    loop sets the windowed gauges every ``REPORT_INTERVAL_S`` until ``stop_reporting()``, and
    from then on writes the tallies every ``FLUSH_INTERVAL_S`` if the process exports metrics
    (``metrics_batch.register``), else once per loop iteration; ``stop_reporting()`` writes
    them and goes back to once per loop iteration (before ``start_reporting``: at once).
    """

    def __init__(
        self,
        *,
        deployment: str,
        replica: str,
        application: str,
        max_ongoing_requests: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        tags = {"deployment": deployment, "replica": replica, "application": application}
        self._tags = tags
        self.max_ongoing_requests = max_ongoing_requests
        self._clock = clock
        route_keys = (*SERVE_TAG_KEYS, "route")
        self._starts = Counter(
            "serve_deployment_replica_starts",
            description="The number of times this replica has been restarted due to failure.",
            tag_keys=SERVE_TAG_KEYS,
        ).set_default_tags(tags)
        self._requests = Counter(
            "serve_deployment_request_counter",
            description="The number of queries that have been processed in this replica.",
            tag_keys=route_keys,
        ).set_default_tags(tags)
        self._errors = Counter(
            "serve_deployment_error_counter",
            description="The number of exceptions that have occurred in this replica.",
            tag_keys=(*route_keys, "exception_type"),
        ).set_default_tags(tags)
        self._latency_ms = Histogram(
            "serve_deployment_processing_latency_ms",
            description="The latency for queries to be processed.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=route_keys,
        ).set_default_tags(tags)
        self._max_latency_ms = Gauge(
            "serve_deployment_max_processing_latency_ms",
            description="The maximum observed time spent processing a query.",
            tag_keys=route_keys,
        ).set_default_tags(tags)
        self._ongoing = Gauge(
            "serve_replica_processing_queries",
            description="The current number of queries being processed.",
            tag_keys=SERVE_TAG_KEYS,
        ).set_default_tags(tags).bind()
        self._utilization = Gauge(
            "serve_replica_utilization_percent",
            description=(
                "Percentage of replica capacity utilized by user code execution over a rolling "
                "window. Calculated as: user_code_time / (window_duration * max_ongoing_requests)."
            ),
            tag_keys=SERVE_TAG_KEYS,
        ).set_default_tags(tags).bind()
        self._user_time_ms = RollingWindow(UTILIZATION_WINDOW_S, UTILIZATION_NUM_BUCKETS, clock)
        self._routes: dict[str, RouteMetrics] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ongoing_now = 0
        self._dirty: list[RouteMetrics] = []  # routes with tallies to write
        self._write_pending = False
        self._periodic = False  # metrics_batch writes the tallies every FLUSH_INTERVAL_S
        self._ongoing_written = 0
        self._ongoing.set(0)

    def count_start(self) -> None:
        self._starts.bind().inc()

    def route(self, route: str) -> RouteMetrics:
        found = self._routes.get(route)
        if found is None:
            tags = {"route": route}
            found = self._routes[route] = RouteMetrics(
                route,
                self._requests.bind(tags),
                self._latency_ms.bind(tags),
                RollingWindow(MAX_LATENCY_WINDOW_S, MAX_LATENCY_NUM_BUCKETS, self._clock),
            )
        return found

    def finished(self, route: RouteMetrics, latency_ms: float, exception_type: str | None) -> None:
        """One request ended: ``exception_type`` is the class name of what it raised, or None."""
        route.latency_ms.observe(latency_ms)
        if latency_ms > route.max_pending_ms:
            route.max_pending_ms = latency_ms
        if exception_type is None:
            route.ok.n += 1
        else:
            route.failed[exception_type] = route.failed.get(exception_type, 0) + 1
        if not route.dirty:
            route.dirty = True
            self._dirty.append(route)
        self._schedule_write()

    def set_ongoing(self, n: int) -> None:
        self._ongoing_now = n
        self._schedule_write()

    def _schedule_write(self) -> None:
        """Write at the next periodic flush, else at the end of this loop iteration (at once
        before ``start_reporting``)."""
        if self._periodic:
            return
        if self._loop is None:
            self.write()
        elif not self._write_pending:
            self._write_pending = True
            self._loop.call_soon(self.write)

    def write(self) -> None:
        """Write the tallies and the ongoing count into the samples, and add them to the rolling
        windows (of 1 s buckets and more: a loop iteration late is on time), now."""
        self._write_pending = False
        if self._ongoing_now != self._ongoing_written:
            self._ongoing_written = self._ongoing_now
            self._ongoing.set(self._ongoing_now)
        dirty, self._dirty = self._dirty, []
        for route in dirty:
            route.dirty = False
            route.max_latency_ms.add(route.max_pending_ms)
            route.max_pending_ms = 0.0
            self._user_time_ms.add(route.latency_ms.pending_sum)
            route.ok.flush()
            if route.failed:
                for exception_type, n in route.failed.items():
                    self._error_child(route, exception_type).inc(n)
                route.failed.clear()
            route.latency_ms.flush()

    def _error_child(self, route: RouteMetrics, exception_type: str) -> Any:
        child = route.errors.get(exception_type)
        if child is None:
            child = route.errors[exception_type] = self._errors.bind(
                {"route": route.route, "exception_type": exception_type}
            )
        return child

    def utilization_percent(self) -> float:
        capacity_ms = UTILIZATION_WINDOW_S * 1000 * self.max_ongoing_requests
        return min(self._user_time_ms.total() / capacity_ms * 100, 100.0) if capacity_ms > 0 else 0.0

    def report(self) -> None:
        """Set the windowed gauges now."""
        for route in list(self._routes.values()):
            self._max_latency_ms.bind({"route": route.route}).set(route.max_latency_ms.max())
        self._utilization.set(self.utilization_percent())

    def start_reporting(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = self._loop = loop or asyncio.get_running_loop()

        def tick() -> None:
            self._timer = loop.call_later(REPORT_INTERVAL_S, tick)
            self.report()

        if self._timer is None:
            self._timer = loop.call_later(REPORT_INTERVAL_S, tick)
        if not self._periodic:
            self._periodic = metrics_batch.register(loop, self.write)

    def stop_reporting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._periodic and self._loop is not None:
            metrics_batch.unregister(self._loop, self.write)
            self._periodic = False
            self.write()


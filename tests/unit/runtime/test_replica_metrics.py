"""runtime/replica_metrics.py: rolling windows on a fake clock, and what ReplicaMetrics records."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from shoal.runtime import replica_metrics
from shoal.runtime.replica_metrics import ReplicaMetrics, RollingWindow

_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def exported(metrics: ReplicaMetrics, deployment: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``metrics`` for ``deployment``, without the replica/application labels."""
    found = {}
    for attr in ("_starts", "_requests", "_errors", "_latency_ms", "_max_latency_ms"):
        prom = getattr(metrics, attr)._prom
        for family in prom.collect() if prom is not None else ():
            for s in family.samples:
                if s.labels.get("deployment") == deployment and not s.name.endswith("_created"):
                    labels = {k: v for k, v in s.labels.items() if k not in ("deployment", "replica", "application")}
                    found[(s.name, frozenset(labels.items()))] = s.value
    return found


def make(clock: Clock, max_ongoing_requests: int = 2) -> tuple[ReplicaMetrics, str]:
    deployment = f"D{next(_ids)}"
    return ReplicaMetrics(
        deployment=deployment, replica="r1", application="app", max_ongoing_requests=max_ongoing_requests, clock=clock
    ), deployment


def test_a_rolling_window_sums_and_maxes_the_buckets_still_in_it() -> None:
    clock = Clock()
    window = RollingWindow(60, 6, clock)  # buckets of 10 s
    assert (window.total(), window.max()) == (0, 0)
    window.add(5)
    window.add(3)
    clock.now_s += 10
    window.add(1)
    assert (window.total(), window.max()) == (9, 5)
    clock.now_s += 50  # the first bucket has left the window, the second not yet
    assert (window.total(), window.max()) == (1, 1)
    clock.now_s += 10
    assert (window.total(), window.max()) == (0, 0)
    window.add(2)  # a slot is reused for a new bucket: its old values are gone
    assert (window.total(), window.max()) == (2, 2)


def test_a_rolling_window_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RollingWindow(0, 6)
    with pytest.raises(ValueError):
        RollingWindow(60, 0)


def test_requests_errors_latency_and_starts_by_route() -> None:
    metrics, deployment = make(Clock())
    metrics.count_start()
    api, root = metrics.route("/api"), metrics.route("")
    assert metrics.route("/api") is api  # bound once
    metrics.finished(api, 3.0, None)
    metrics.finished(api, 30.0, "ValueError")
    metrics.finished(api, 4.0, "ValueError")
    metrics.finished(root, 700.0, "CancelledError")
    got = exported(metrics, deployment)
    assert got[("ray_serve_deployment_replica_starts_total", frozenset())] == 1
    assert got[("ray_serve_deployment_request_counter_total", frozenset({("route", "/api")}))] == 1
    assert got[("ray_serve_deployment_request_counter_total", frozenset({("route", "")}))] == 0  # bound: 0, not absent
    errors = {labels: v for (name, labels), v in got.items() if name == "ray_serve_deployment_error_counter_total"}
    assert errors == {
        frozenset({("route", "/api"), ("exception_type", "ValueError")}): 2,
        frozenset({("route", ""), ("exception_type", "CancelledError")}): 1,
    }
    latency = "ray_serve_deployment_processing_latency_ms"
    assert got[(f"{latency}_count", frozenset({("route", "/api")}))] == 3
    assert got[(f"{latency}_sum", frozenset({("route", "/api")}))] == 37
    assert got[(f"{latency}_bucket", frozenset({("route", "/api"), ("le", "5.0")}))] == 2
    assert got[(f"{latency}_bucket", frozenset({("route", ""), ("le", "1000.0")}))] == 1


def test_max_latency_and_utilization_are_set_when_reported() -> None:
    clock = Clock()
    metrics, deployment = make(clock, max_ongoing_requests=2)
    api = metrics.route("/api")
    metrics.finished(api, 600_000.0, None)  # 600 s of work in a 600 s window of 2 slots: 50 %
    metrics.finished(api, 60_000.0, "E")
    assert metrics.utilization_percent() == pytest.approx(55.0)
    metrics.report()
    got = exported(metrics, deployment)
    assert got[("ray_serve_deployment_max_processing_latency_ms", frozenset({("route", "/api")}))] == 600_000
    clock.now_s += replica_metrics.MAX_LATENCY_WINDOW_S + 10
    metrics.finished(api, 7.0, None)
    metrics.report()
    got = exported(metrics, deployment)
    assert got[("ray_serve_deployment_max_processing_latency_ms", frozenset({("route", "/api")}))] == 7
    metrics.max_ongoing_requests = 1  # reconfigured
    assert metrics.utilization_percent() == 100.0  # capped
    clock.now_s += replica_metrics.UTILIZATION_WINDOW_S
    assert metrics.utilization_percent() == 0.0


def test_the_ongoing_and_utilization_gauges_start_at_zero() -> None:
    metrics, _ = make(Clock())
    child: Any = metrics._ongoing
    assert child._value.get() == 0
    metrics.set_ongoing(3)
    assert child._value.get() == 3


def test_on_a_loop_the_tallies_are_written_once_the_iteration_ends() -> None:
    async def main() -> None:
        metrics, deployment = make(Clock())
        metrics.start_reporting()
        api = metrics.route("/api")
        counter = ("ray_serve_deployment_request_counter_total", frozenset({("route", "/api")}))
        for latency_ms in (1.0, 2.0, 700.0):
            metrics.finished(api, latency_ms, None)
        metrics.set_ongoing(4)
        assert exported(metrics, deployment)[counter] == 0
        await asyncio.sleep(0)
        got = exported(metrics, deployment)
        assert got[counter] == 3
        latency = "ray_serve_deployment_processing_latency_ms"
        assert got[(f"{latency}_bucket", frozenset({("route", "/api"), ("le", "2.0")}))] == 2
        assert got[(f"{latency}_sum", frozenset({("route", "/api")}))] == 703
        assert metrics._ongoing._value.get() == 4
        metrics.stop_reporting()

    asyncio.run(main())


def test_in_a_process_that_exports_the_tallies_wait_for_the_periodic_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store into the samples per request or per loop iteration: ``metrics_batch`` writes the
    tallies every FLUSH_INTERVAL_S (run here by hand with ``flush_now``); ``stop_reporting``
    writes them and goes back to once per loop iteration (a draining replica)."""
    from shoal.runtime import metrics, metrics_batch

    monkeypatch.setattr(metrics, "enabled", lambda: True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        recorder, deployment = make(Clock())
        recorder.start_reporting()
        api = recorder.route("/api")
        counter = ("ray_serve_deployment_request_counter_total", frozenset({("route", "/api")}))
        for latency_ms in (1.0, 2.0):
            recorder.finished(api, latency_ms, None)
        recorder.set_ongoing(2)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert exported(recorder, deployment)[counter] == 0  # not at the end of the iteration
        assert recorder._ongoing._value.get() == 0
        metrics_batch.flush_now(loop)
        assert exported(recorder, deployment)[counter] == 2
        assert recorder._ongoing._value.get() == 2
        recorder.finished(api, 3.0, "ValueError")
        recorder.stop_reporting()  # writes what waits
        errors = ("ray_serve_deployment_error_counter_total", frozenset({("route", "/api"), ("exception_type", "ValueError")}))
        assert exported(recorder, deployment)[errors] == 1
        assert recorder.write not in metrics_batch._flushes.get(loop, [])
        recorder.finished(api, 4.0, None)
        await asyncio.sleep(0)  # from now on: once per loop iteration
        assert exported(recorder, deployment)[counter] == 3

    asyncio.run(main())

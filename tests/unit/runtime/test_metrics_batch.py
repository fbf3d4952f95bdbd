"""Batched recording: flushed counts and histograms equal what direct recording gives."""

from __future__ import annotations

from typing import Any

from shoal.runtime import metrics
from shoal.runtime.metrics_batch import PendingCount, PendingHistogram


def samples(metric: metrics.Metric) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    prom: Any = metric._prom
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in prom.collect() for s in family.samples if not s.name.endswith("_created")
    }


def test_a_flushed_histogram_has_the_exposition_of_direct_observations() -> None:
    values = [0.0, 0.5, 1, 1.0001, 2, 49.9, 50, 300000, 600000, 600001, 1e9, 7.25]
    direct = metrics.Histogram("batch_test_direct", boundaries=metrics.LATENCY_BUCKETS_MS, tag_keys=("a",))
    batched = metrics.Histogram("batch_test_batched", boundaries=metrics.LATENCY_BUCKETS_MS, tag_keys=("a",))
    pending = PendingHistogram(batched.bind({"a": "x"}), batched.boundaries)
    for i, value in enumerate(values):
        direct.observe(value, tags={"a": "x"})
        pending.observe(value)
        if i == 5:
            pending.flush()  # flushing twice adds up
    assert pending.n == len(values) - 6
    pending.flush()
    pending.flush()  # nothing pending: nothing changes
    assert {(n.replace("ray_batch_test_batched", "ray_batch_test_direct"), labels): v
            for (n, labels), v in samples(batched).items()} == samples(direct)


def test_a_pending_count_adds_its_events_once() -> None:
    counter = metrics.Counter("batch_test_pending_count")
    pending = PendingCount(counter.bind())
    pending.n += 3
    pending.flush()
    pending.flush()
    assert samples(counter) == {("ray_batch_test_pending_count_total", ()): 3}

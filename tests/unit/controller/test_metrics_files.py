"""shoal.controller.metrics_endpoint.MetricsFiles: what happens to the sample files of processes
that died, on real prometheus-client multiprocess files in a temporary directory, with fake live
pids and a fake clock (no process, no sleep)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from shoal.controller.metrics_endpoint import RETENTION_ENV, MetricsFiles, retention_from_env

RETENTION_S = 300.0
REQUESTS = "ray_serve_num_http_requests"  # a proxy's counter: no replica label
REPLICA_REQUESTS = "ray_serve_deployment_request_counter"  # a replica's counter
ONGOING = "ray_serve_replica_processing_queries"  # a replica's gauge
LATENCY = "ray_serve_http_request_latency_ms"  # a proxy's histogram
BUCKETS = ("1.0", "10.0", "+Inf")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class World:
    """A metrics directory, the pids alive now, and the time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.alive: set[int] = set()
        self.now = 1000.0
        self.files = MetricsFiles(
            directory, retention_s=RETENTION_S, live_pids=lambda: set(self.alive), clock=lambda: self.now
        )

    def write(self, kind: str, pid: int, metric: str, sample: str, value: float, **labels: str) -> None:
        """Add ``value`` to one sample in process ``pid``'s file of ``kind`` (as prometheus-client
        does in that process: ``counter``, ``histogram``, ``gauge_livesum``)."""
        data = MmapedDict(str(self.directory / f"{kind}_{pid}.db"))
        try:
            key = mmap_key(metric, sample, list(labels), list(labels.values()), "help")
            value_now, _timestamp = data.read_value(key)
            data.write_value(key, value_now + value, 0.0)
        finally:
            data.close()

    def count(self, pid: int, value: float, **labels: str) -> None:
        self.write("counter", pid, REQUESTS, REQUESTS + "_total", value, route="/", **labels)

    def replica_count(self, pid: int, value: float, replica: str) -> None:
        self.write(
            "counter", pid, REPLICA_REQUESTS, REPLICA_REQUESTS + "_total", value,
            deployment="D", application="app", replica=replica,
        )

    def gauge(self, pid: int, value: float, replica: str) -> None:
        self.write("gauge_livesum", pid, ONGOING, ONGOING, value, deployment="D", replica=replica)

    def observe(self, pid: int, le: str, value_ms: float) -> None:
        for bucket in BUCKETS:  # prometheus-client writes every bucket of a child, zeros too
            self.write("histogram", pid, LATENCY, LATENCY + "_bucket", float(bucket == le), route="/", le=bucket)
        self.write("histogram", pid, LATENCY, LATENCY + "_sum", value_ms, route="/")

    def scrape(self) -> Samples:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for metric in self.files.merged()
            for sample in metric.samples
        }

    def names(self) -> set[str]:
        return {path.name for path in self.directory.iterdir()}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    wanted = set(labels.items())
    found = [v for (sample, have), v in samples.items() if sample == name and wanted <= have]
    return sum(found) if found else None


def test_a_dead_process_live_gauges_go_at_once_its_counters_stay(world: World) -> None:
    world.alive = {10, 20}
    world.gauge(10, 3, replica="a")
    world.gauge(20, 5, replica="b")
    world.replica_count(20, 7, replica="b")
    assert value(world.scrape(), ONGOING) == 8
    world.alive = {10}  # 20 died
    samples = world.scrape()
    assert value(samples, ONGOING, replica="a") == 3
    assert value(samples, ONGOING, replica="b") is None
    assert "gauge_livesum_20.db" not in world.names()
    assert value(samples, REPLICA_REQUESTS + "_total", replica="b") == 7  # its final count, for a while


def test_dead_counters_and_histograms_stay_retention_s_then_replica_series_go(world: World) -> None:
    world.alive = {10}
    world.replica_count(10, 4, replica="a")
    world.observe(10, "10.0", 5.0)
    world.alive = set()
    world.files.sweep()  # seen dead now
    world.now += RETENTION_S - 1
    samples = world.scrape()
    assert value(samples, REPLICA_REQUESTS + "_total", replica="a") == 4
    assert value(samples, LATENCY + "_count") == 1
    world.now += 1
    samples = world.scrape()
    assert value(samples, REPLICA_REQUESTS + "_total") is None  # a replica's series end with it
    assert value(samples, LATENCY + "_count") == 1  # no replica label: kept, in the archive
    assert value(samples, LATENCY + "_sum") == 5.0
    assert value(samples, LATENCY + "_bucket", le="10.0") == 1
    assert value(samples, LATENCY + "_bucket", le="1.0") == 0
    assert world.names() == {"histogram_archive.db"}


def test_a_counter_without_replica_label_never_decreases_across_replaced_processes(world: World) -> None:
    world.files.retention_s = 0.0
    world.alive = {10}
    world.count(10, 5)
    totals = [value(world.scrape(), REQUESTS + "_total")]
    world.alive = {11}  # the proxy was replaced: the new one starts from zero
    world.count(11, 1)
    totals.append(value(world.scrape(), REQUESTS + "_total"))
    world.count(11, 2)
    world.alive = {12}
    world.count(12, 4)
    totals.append(value(world.scrape(), REQUESTS + "_total"))
    world.now += 1
    totals.append(value(world.scrape(), REQUESTS + "_total"))
    assert totals == [5, 6, 12, 12]
    assert world.names() == {"counter_archive.db", "counter_12.db"}


def test_a_replica_labelled_series_is_dropped_and_others_of_the_same_file_archived(world: World) -> None:
    world.files.retention_s = 0.0
    world.alive = {10}
    world.replica_count(10, 3, replica="a")
    world.count(10, 2)
    world.alive = set()
    samples = world.scrape()
    assert value(samples, REPLICA_REQUESTS + "_total") is None
    assert value(samples, REQUESTS + "_total") == 2


def test_retention_counts_from_when_the_death_was_seen(world: World) -> None:
    world.alive = {10}
    world.replica_count(10, 1, replica="a")
    world.files.sweep()
    world.now += 10 * RETENTION_S  # a long time alive
    world.alive = set()
    world.files.sweep()
    world.now += RETENTION_S - 1
    assert value(world.scrape(), REPLICA_REQUESTS + "_total") == 1


def test_a_reused_pid_keeps_its_files_while_it_lives_and_its_retention_restarts(world: World) -> None:
    """Without an exit notice (the pid came back before a sweep could rename anything), a pid
    alive again is a live process: nothing of its files is retired; when it dies again, its
    retention starts over."""
    world.alive = {10}
    world.count(10, 5)
    world.alive = set()
    world.files.sweep()  # dead since now
    world.now += RETENTION_S - 1
    world.alive = {10}  # the pid is reused by a new process of the instance
    world.count(10, 1)  # which opened the same file
    world.now += 2 * RETENTION_S
    assert value(world.scrape(), REQUESTS + "_total") == 6
    assert "counter_10.db" in world.names()
    world.alive = set()
    world.files.sweep()
    world.now += RETENTION_S - 1
    assert "counter_10.db" in world.names()
    world.now += 1
    assert value(world.scrape(), REQUESTS + "_total") == 6
    assert world.names() == {"counter_archive.db"}


def test_an_exit_notice_parts_a_dead_process_files_from_a_new_process_with_its_pid(world: World) -> None:
    world.alive = {10}
    world.replica_count(10, 3, replica="old")
    world.gauge(10, 2, replica="old")
    world.count(10, 5)
    world.alive = set()
    world.files.process_exited(10)  # reaped: the pid may be reused from now on
    assert not any(name.endswith("_10.db") for name in world.names())
    world.alive = {10}  # reused at once by a new replica
    world.replica_count(10, 1, replica="new")
    world.count(10, 1)
    samples = world.scrape()
    assert value(samples, ONGOING) is None  # the dead one's gauge went with it
    assert value(samples, REPLICA_REQUESTS + "_total", replica="old") == 3  # kept retention_s
    assert value(samples, REQUESTS + "_total") == 6
    world.now += RETENTION_S
    samples = world.scrape()
    assert value(samples, REPLICA_REQUESTS + "_total", replica="old") is None  # although pid 10 lives
    assert value(samples, REPLICA_REQUESTS + "_total", replica="new") == 1
    assert value(samples, REQUESTS + "_total") == 6
    assert world.names() == {"counter_archive.db", "counter_10.db"}


def test_an_exit_notice_for_a_process_without_files_changes_nothing(world: World) -> None:
    world.alive = {10}
    world.count(10, 1)
    world.files.process_exited(99)
    assert world.names() == {"counter_10.db"}
    assert value(world.scrape(), REQUESTS + "_total") == 1


def test_the_archive_adds_up_every_dead_process(world: World) -> None:
    world.files.retention_s = 0.0
    for pid, n in ((10, 1), (11, 2), (12, 4)):
        world.alive = {pid}
        world.count(pid, n)
        world.files.sweep()
    world.alive = set()
    assert value(world.scrape(), REQUESTS + "_total") == 7
    assert world.names() == {"counter_archive.db"}


def test_the_live_processes_are_read_after_the_files_are_listed(world: World) -> None:
    """A process that starts (and writes its first sample) while a sweep runs is not taken for
    dead: its live gauges would be deleted under it."""

    def live_pids() -> set[int]:
        alive: set[int] = set()  # not started yet when asked ...
        world.gauge(30, 1, replica="c")  # ... started and wrote a sample just after
        return alive

    files = MetricsFiles(world.directory, retention_s=0.0, live_pids=live_pids, clock=lambda: world.now)
    files.sweep()
    assert "gauge_livesum_30.db" in world.names()


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "soon"])
def test_a_retention_that_is_not_a_finite_number_of_seconds_is_refused(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RETENTION_ENV, raw)
    with pytest.raises(ValueError, match=RETENTION_ENV):
        retention_from_env()


def test_the_retention_defaults_to_300_s_and_0_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RETENTION_ENV, raising=False)
    assert retention_from_env() == 300.0
    monkeypatch.setenv(RETENTION_ENV, "0")
    assert retention_from_env() == 0.0

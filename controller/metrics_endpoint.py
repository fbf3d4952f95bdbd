"""The instance's metrics endpoint: Prometheus text merged from every process's sample files.

Every process of the instance records into ``<run dir>/metrics/`` (``runtime/metrics.py``); this
module serves them, merged, on their own listener (``http_options.metrics_port``, default 8080
as Ray's metrics export port) from a thread of the supervisor, so a scrape reads files and never
touches a socket of the request path.

Processes come and go, so before each merge (and every ``sweep_interval_s`` when nobody scrapes)
``MetricsFiles.sweep`` tidies the files of processes that are no longer alive (the supervisor
and its descendants are the instance's processes):

- their gauges go at once (prometheus-client's ``mark_process_dead``): a dead replica's queue
  length is not a current value;
- ``retention_s`` after the death, their counters and histograms go too. Series that name a
  ``replica`` end there (the replica is gone, as in Ray); series without one (the proxy's per
  route counters, the controller's) are added into ``*_archive.db`` files first, so a sum over
  processes never goes backwards when a proxy is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger("shoal.supervisor")

RETENTION_ENV = "SHOAL_METRICS_DEAD_PROCESS_RETENTION_S"
DEFAULT_RETENTION_S = 300.0  # a dead process's final counts stay for a few scrapes
_SWEEP_INTERVAL_S = 30.0
_ARCHIVE = "archive"


def _pid_of(path: Path) -> int | None:
    """The pid a sample file belongs to (``counter_123.db``, ``gauge_livesum_123.db``), None for archives."""
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _is_live_gauge(path: Path) -> bool:
    return path.name.startswith("gauge_live")


class MetricsFiles:
    """The sample files of one directory, and what happens to those of dead processes.

    ``live_pids`` answers which processes are alive; ``clock`` is monotonic seconds. Pure file
    logic, so it is tested with fake pids and a fake clock.
    """

    def __init__(
        self,
        directory: Path,
        *,
        retention_s: float,
        live_pids: Callable[[], set[int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.retention_s = retention_s
        self._live_pids = live_pids
        self._clock = clock
        self._dead_since: dict[int, float] = {}
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.db"))

    def sweep(self) -> None:
        """Drop dead processes' gauges now, and their other files once ``retention_s`` has passed."""
        with self._lock:
            now = self._clock()
            alive = self._live_pids()
            by_pid: dict[int, list[Path]] = {}
            for path in self.files():
                pid = _pid_of(path)
                if pid is not None and pid not in alive:
                    by_pid.setdefault(pid, []).append(path)
            for pid in list(self._dead_since):
                if pid not in by_pid:
                    del self._dead_since[pid]  # tidied, or the pid lives again
            for pid, paths in by_pid.items():
                since = self._dead_since.setdefault(pid, now)
                for path in paths:
                    if _is_live_gauge(path):
                        path.unlink(missing_ok=True)
                if now - since >= self.retention_s:
                    for path in paths:
                        if path.exists():
                            self._retire(path)

    def _retire(self, path: Path) -> None:
        kind = path.name.split("_", 1)[0]
        if kind in ("counter", "histogram", "summary"):
            kept = [(key, value) for key, value in _entries(path) if "replica" not in json.loads(key)[2]]
            if kept:
                archive = MmapedDict(str(self.directory / f"{kind}_{_ARCHIVE}.db"))
                try:
                    for key, value in kept:
                        total, _timestamp = archive.read_value(key)
                        archive.write_value(key, total + value, 0.0)
                finally:
                    archive.close()
        path.unlink(missing_ok=True)


def _entries(path: Path) -> Iterator[tuple[str, float]]:
    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
        yield key, value


class InstanceCollector:
    """A prometheus-client collector: sweep, then merge every file (MultiProcessCollector.merge)."""

    def __init__(self, files: MetricsFiles) -> None:
        self._files = files

    def collect(self) -> Iterable[Any]:
        self._files.sweep()
        merged: Iterable[Any] = MultiProcessCollector.merge([str(path) for path in self._files.files()], accumulate=True)
        return merged


def instance_pids() -> set[int]:
    """This process (the supervisor) and every process it started, at any depth."""
    me = psutil.Process()
    pids = {me.pid}
    for child in me.children(recursive=True):
        pids.add(child.pid)
    return pids


def retention_from_env() -> float:
    raw = os.environ.get(RETENTION_ENV)
    if raw is None:
        return DEFAULT_RETENTION_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{RETENTION_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{RETENTION_ENV}={raw!r} must be >= 0")
    return value


class MetricsEndpoint:
    """Serves the merged exposition over HTTP from daemon threads of the supervisor."""

    def __init__(self, files: MetricsFiles, host: str, port: int, *, sweep_interval_s: float = _SWEEP_INTERVAL_S) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(InstanceCollector(files))
        self._files = files
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)  # raises OSError
        self.host = host
        self.port: int = self._server.server_port
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_every, args=(sweep_interval_s,), name="shoal-metrics-sweep", daemon=True
        )
        self._sweeper.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def _sweep_every(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            try:
                self._files.sweep()
            except Exception:
                logger.exception("tidying the metrics files failed; trying again in %.0fs", interval_s)

    def close(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._sweeper.join(5)

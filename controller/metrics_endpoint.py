"""The instance's metrics endpoint: Prometheus text merged from every process's sample files.

Every process of the instance records into ``<run dir>/metrics/`` (``runtime/metrics.py``); this
module serves them, merged, on their own listener (``http_options.metrics_port``, default 8080
as Ray's metrics export port) from a thread of the supervisor, so a scrape reads files and never
touches a socket of the request path.

Processes come and go, so before each merge (and every ``sweep_interval_s`` when nobody scrapes)
``MetricsFiles.sweep`` tidies the files of processes that are no longer alive (the supervisor
and its descendants are the instance's processes). When the supervisor reaps a child it calls
``MetricsFiles.process_exited(pid)`` at once, which renames the child's files away from its pid:
a new process that the kernel gives the same pid then starts from files of its own instead of
adding to (and keeping alive) the dead one's.

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
import math
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
from prometheus_client.registry import Collector

logger = logging.getLogger("shoal.supervisor")

RETENTION_ENV = "SHOAL_METRICS_DEAD_PROCESS_RETENTION_S"
DEFAULT_RETENTION_S = 300.0  # a dead process's final counts stay for a few scrapes
_SWEEP_INTERVAL_S = 30.0
_ARCHIVE = "archive"
_EXITED = "exited-"


def _owner_of(path: Path) -> str | None:
    """Whose a sample file is: a pid (``counter_123.db``, ``gauge_livesum_123.db``), an exited
    process (``counter_exited-123-4.db``, see ``process_exited``), or None (``*_archive.db``)."""
    tail = path.stem.rsplit("_", 1)[-1]
    return tail if tail.isdigit() or tail.startswith(_EXITED) else None


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
        self._dead_since: dict[str, float] = {}  # by owner (``_owner_of``)
        self._exits = 0
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.db"))

    def process_exited(self, pid: int) -> None:
        """Process ``pid`` exited (reaped, so its pid may be reused from now on): its live gauges
        go now, its other files are renamed for it alone and kept ``retention_s`` from now."""
        with self._lock:
            self._exits += 1
            owner = f"{_EXITED}{pid}-{self._exits}"
            found = False
            for path in self.files():
                if _owner_of(path) != str(pid):
                    continue
                if _is_live_gauge(path):
                    path.unlink(missing_ok=True)
                else:
                    path.rename(path.with_name(f"{path.name[: -len(f'{pid}.db')]}{owner}.db"))
                    found = True
            if found:
                self._dead_since[owner] = self._clock()

    def sweep(self) -> None:
        """Drop dead processes' gauges now, and their other files once ``retention_s`` has passed."""
        with self._lock:
            self._sweep()

    def merged(self) -> Iterable[Any]:
        """Sweep, then merge every file (``MultiProcessCollector.merge``). Both hold the lock, so
        a merge never reads a file that a sweep is folding into the archive: it would count
        those samples twice (and the next scrape would see the counter go backwards), or find
        the file gone and fail."""
        with self._lock:
            self._sweep()
            merged: Iterable[Any] = MultiProcessCollector.merge([str(path) for path in self.files()], accumulate=True)
            return merged

    def _sweep(self) -> None:
        now = self._clock()
        paths = self.files()
        alive = self._live_pids()  # after listing: a process that starts in between is not taken for dead
        dead: dict[str, list[Path]] = {}
        for path in paths:
            owner = _owner_of(path)
            if owner is not None and not (owner.isdigit() and int(owner) in alive):
                dead.setdefault(owner, []).append(path)
        for owner in list(self._dead_since):
            if owner not in dead:
                del self._dead_since[owner]  # tidied, or the pid lives again
        for owner, dead_paths in dead.items():
            since = self._dead_since.setdefault(owner, now)
            for path in dead_paths:
                if _is_live_gauge(path):
                    path.unlink(missing_ok=True)
            if now - since >= self.retention_s:
                for path in dead_paths:
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
        return self._files.merged()


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
    if not (0 <= value < math.inf):  # NaN would keep every dead process's files forever
        raise ValueError(f"{RETENTION_ENV}={raw!r} must be a finite number of seconds >= 0")
    return value


class MetricsEndpoint:
    """Serves the merged exposition over HTTP from daemon threads of the supervisor."""

    def __init__(
        self, files: MetricsFiles, host: str, port: int, *, sweep_interval_s: float = _SWEEP_INTERVAL_S,
        collectors: Iterable[Collector] = (),
    ) -> None:
        """Serve ``files`` merged, and the samples of ``collectors`` (the controller's current
        gauges); OSError if ``host:port`` cannot be bound."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(InstanceCollector(files))
        for collector in collectors:
            registry.register(collector)
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

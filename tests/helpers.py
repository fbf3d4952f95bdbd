"""Helpers shared by the tests: bounded waits on OS state, process lookups, gates.

Importable as ``helpers`` because pytest puts ``tests/`` (the directory of the root conftest) on
``sys.path``. Nothing here starts a process.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from shoal import serve

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
DRIVERS_DIR = TESTS_DIR / "integration" / "drivers"


def wait_until(predicate: Callable[[], T], timeout_s: float, message: str = "", interval_s: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); AssertionError after
    ``timeout_s``. Only for OS state that has no event to wait on (a process gone, a file gone);
    the pause between polls is the one sleep the tests allow themselves."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {message or predicate}")
        time.sleep(interval_s)


def exactly_equal(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (``1 == 1.0 == True`` and ``(1,) == [1]``
    do not count); NaN equals NaN. Dict keys must come in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            exactly_equal(ka, kb) and exactly_equal(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(exactly_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie counts as gone: it runs nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_children() -> list[psutil.Process]:
    """The live descendants of this (the test) process."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def processes_in_run_dir(run_dir: Path | str) -> list[psutil.Process]:
    """Live processes (other than this one) whose SHOAL_RUN_DIR is ``run_dir`` or below it.

    Supervisors and replicas inherit the environment of the driver that started them, so this
    finds them even after they were orphaned (reparented away from any test process).
    """
    root = str(run_dir)
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            value = proc.environ().get("SHOAL_RUN_DIR", "")
            if (value == root or value.startswith(root + os.sep)) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def sockets_in(run_dir: Path) -> list[Path]:
    """The ``*.sock`` files anywhere under ``run_dir``."""
    return sorted(run_dir.rglob("*.sock"))


def is_supervisor(proc: psutil.Process) -> bool:
    try:
        return "shoal.controller" in proc.cmdline()
    except psutil.NoSuchProcess:
        return False


def is_replica(proc: psutil.Process) -> bool:
    """A replica worker: it names itself ``shoal-replica`` (the proxy is ``shoal-proxy``)."""
    try:
        return proc.name() == "shoal-replica"
    except psutil.NoSuchProcess:
        return False


def supervisor_of(driver: psutil.Process) -> psutil.Process:
    """The supervisor a driver started (its only child running ``shoal.controller``)."""
    sups = [p for p in driver.children() if is_supervisor(p)]
    assert len(sups) == 1, f"expected one supervisor under pid {driver.pid}, found {sups}"
    return sups[0]


def run_dir_of(supervisor: psutil.Process) -> Path:
    argv = supervisor.cmdline()
    return Path(argv[argv.index("--run-dir") + 1])


def replica_pids(supervisor: psutil.Process) -> set[int]:
    """The pids of the live replica processes under ``supervisor`` (its children, or its
    warm templates' children)."""
    return {p.pid for p in supervisor.children(recursive=True) if is_replica(p) and alive(p.pid)}


def app_status(name: str) -> Any:
    """The ``ApplicationStatusOverview`` of app ``name``, or None if it does not exist."""
    return serve.status().applications.get(name)


def python() -> str:
    return sys.executable


@serve.deployment(max_ongoing_requests=1000)
class Gate:
    """Named gates other deployments (or the test) wait on; a test opens them with ``open``.

    A separate deployment, so that a replica at ``max_ongoing_requests`` can be released by a
    call that does not need a slot on that replica. ``arrived`` waits until ``n`` callers went
    through a gate's ``arrive``, so a test learns that calls really started on a replica.
    """

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self._arrived: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def _gate(self, key: str) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    async def wait(self, key: str) -> None:
        await self._gate(key).wait()

    async def open(self, key: str) -> None:
        self._gate(key).set()

    async def arrive(self, key: str) -> None:
        async with self._changed:
            self._arrived[key] = self._arrived.get(key, 0) + 1
            self._changed.notify_all()

    async def arrived(self, key: str, n: int = 1) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._arrived.get(key, 0) >= n)
            return self._arrived[key]


def served_url(cli: subprocess.Popen[str], timeout_s: float, readers: list[threading.Thread]) -> str:
    """The URL from ``shoal run``'s "serving ... on <url>" line (the port was picked with 0).
    A thread, appended to ``readers``, reads ``cli``'s output to the end, so the CLI never
    blocks on a full pipe."""
    lines: queue.Queue[str] = queue.Queue()
    assert cli.stdout is not None
    stdout = cli.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)

    readers.append(threading.Thread(target=read, daemon=True))
    readers[-1].start()
    deadline = time.monotonic() + timeout_s
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        found = re.search(r"serving .* on (http://\S+)", line)
        if found:
            return found.group(1)



def shutdown_serve() -> None:
    """``serve.shutdown()``, then wait until this process has no child left (killing any that
    outlive the wait, so the next test starts clean) and fail if one had to be killed."""
    serve.shutdown()
    try:
        wait_until(lambda: not live_children(), 15, "no child processes left after serve.shutdown()")
    finally:
        kill_all(live_children())


def stop_cli(cli: subprocess.Popen[str], readers: list[threading.Thread]) -> None:
    """Kill a CLI process the test started if it still runs, and close its output readers."""
    if cli.poll() is None:
        cli.kill()
        cli.wait(10)
    for thread in readers:
        thread.join(10)
    if cli.stdout is not None:
        cli.stdout.close()

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str | None = None) -> Samples:
    """The samples the instance's metrics endpoint serves now (default: ``serve.get_metrics_url()``),
    keyed by (sample name, labels)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    url = url or serve.get_metrics_url()
    assert url, "the instance serves no metrics (http_options.metrics_port is None?)"
    text = requests.get(url, timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of the samples called ``name`` whose labels include ``labels``; None if there is none."""
    wanted = set(labels.items())
    found = [value for (sample, have), value in samples.items() if sample == name and wanted <= have]
    return sum(found) if found else None


class SocketGate:
    """A gate request handlers in another process (or user) park on: each connects to a unix
    socket at ``path`` and waits for one byte. ``parked`` counts the connections; ``release``
    answers them all, and any that connect later at once.

    ``path``: where to listen (default: a new private temporary directory, removed by ``close``);
    ``mode``: the socket file's permissions, for handlers running as another user.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, mode: int | None = None) -> None:
        self._own_dir = tempfile.mkdtemp(prefix="gate-") if path is None else None
        self.path = os.fspath(path) if path is not None else os.path.join(self._own_dir or "", "gate")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        if mode is not None:
            os.chmod(self.path, mode)
        self._server.listen(64)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._released = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._released:
                    conn.sendall(b"x")
                self._conns.append(conn)

    @property
    def parked(self) -> int:
        with self._lock:
            return len(self._conns)

    def release(self) -> None:
        with self._lock:
            self._released = True
            for conn in self._conns:
                try:
                    conn.sendall(b"x")
                except OSError:  # its request is gone (cut at a deadline)
                    pass

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._server.close()
        self._thread.join(5)
        with self._lock:
            for conn in self._conns:
                conn.close()
        os.unlink(self.path)
        if self._own_dir is not None:
            os.rmdir(self._own_dir)

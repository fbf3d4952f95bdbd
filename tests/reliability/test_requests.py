"""Requests under pressure (plan section 4, part C), scaled down: T16 backpressure exactness, T18
the strict ``max_ongoing_requests`` limit and the spread over replicas, T19 cancellation when the
client leaves, T20 the request timeout, T21 exceptions in user code.

Real proxy and replica processes; the clients are httpx or raw sockets (to control exactly when a
connection closes). Replicas record what they saw in files under a temporary directory (marks
hold a ``time.monotonic()`` stamp, which on Linux is one clock for every process of the host).
Requests are parked on the ``Gate`` deployment of ``helpers``. Each test prints its figures (run
with ``-s``) and repeats them in its assertion messages.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import Gate, live_children, replica_pids, supervisor_of, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


# -- marks: what replicas record for the test ---------------------------------------------------


def _mark(marks: str, name: str, value: Any = None) -> None:
    """Create ``marks/name`` holding the current monotonic time (and ``value``), atomically."""
    tmp = os.path.join(marks, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{time.monotonic()!r} {value!r}")
    os.replace(tmp, os.path.join(marks, name))


def _read_mark(marks: Path, name: str) -> tuple[float, str] | None:
    try:
        stamp, value = (marks / name).read_text().split(" ", 1)
    except FileNotFoundError:
        return None
    return float(stamp), value


def _log(marks: str, line: str) -> None:
    with open(os.path.join(marks, "executions.log"), "a") as f:
        f.write(line + "\n")


def _logged(marks: Path) -> list[str]:
    try:
        return (marks / "executions.log").read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marks")


# -- raw HTTP -----------------------------------------------------------------------------------


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _url() -> str:
    url = serve.get_http_url()
    assert url is not None
    return url


def _send(port: int, path: str) -> socket.socket:
    """Send ``GET path`` (Connection: close) on a new connection; the socket, to read later."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything until the server closes; raises TimeoutError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = b""
    with sock:
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def _abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that crashes or gives up hard."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _proxy(supervisor: psutil.Process) -> psutil.Process:
    (proxy,) = [p for p in supervisor.children() if p.name() == "shoal-proxy"]
    return proxy


def _round_trip(url: str) -> None:
    """One request through the proxy's event loop: what a client sent before it has been read."""
    assert httpx.get(url + "/-/healthz", timeout=5).status_code == 200


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- T20: request timeout (its own instance: request_timeout_s=1) --------------------------------

TIMEOUT_S = 1.0


@serve.deployment(max_ongoing_requests=8)
class Slow:
    """``op=sleep``: sleeps 10 s (records being cancelled); ``op=stall``: streams one chunk, then
    waits forever (records the generator stopping); ``op=pid``: its pid."""

    def __init__(self, marks: str) -> None:
        self.marks = marks

    async def __call__(self, request: Request) -> Any:
        op, key = request.query_params["op"], request.query_params.get("key", "")
        marks = self.marks
        if op == "sleep":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                _mark(marks, f"{key}.cancelled")
                raise
        if op == "stall":

            async def stall() -> Any:
                try:
                    yield b"first\n"
                    await asyncio.Event().wait()
                finally:
                    _mark(marks, f"{key}.stopped")

            return StreamingResponse(stall(), media_type="text/plain")
        return {"pid": os.getpid()}


@serve.deployment(max_ongoing_requests=1)
class OneSlot:
    """One slot: ``park`` (a handle call) holds it on a gate; HTTP requests log their execution."""

    def __init__(self, gate: Any, marks: str) -> None:
        self.gate = gate
        self.marks = marks

    async def park(self, key: str) -> str:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return "released"

    async def __call__(self, request: Request) -> str:
        _log(self.marks, f"executed {request.query_params.get('key', '')}")
        return "ok"


@pytest.fixture
def short_timeout() -> Iterator[psutil.Process]:
    """A private instance whose proxy has ``request_timeout_s=1``."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "request_timeout_s": TIMEOUT_S})
    yield supervisor_of(psutil.Process())
    serve.shutdown()
    wait_until(lambda: not live_children(), 15, "no child processes left after serve.shutdown()")


def test_t20_request_timeout(short_timeout: psutil.Process, marks: Path) -> None:
    """T20: (a) a handler sleeping 10 s gets 408 at ~1 s and its task is cancelled, no restart;
    (b) a request stuck in the queue behind a parked one gets 408 at ~1 s and never runs; (c) a
    stream that stalls after its first chunk has its connection ended ~1 s after the request."""
    serve.run(Slow.bind(str(marks)), name="t20slow", route_prefix="/t20")
    queue_handle = serve.run(OneSlot.bind(Gate.bind(), str(marks)), name="t20queue", route_prefix="/t20q")
    url = _url()
    replicas = replica_pids(short_timeout)
    with httpx.Client(base_url=url, timeout=10) as http:
        pid = http.get("/t20?op=pid").json()["pid"]
        # (a)
        started = time.monotonic()
        a = http.get("/t20?op=sleep&key=t20a")
        a_s = time.monotonic() - started
        cancelled = wait_until(lambda: _read_mark(marks, "t20a.cancelled"), 5, "the sleeping handler is cancelled")
        a_cancel_s = cancelled[0] - started
        # (b): the one slot is held by a handle call (not under the proxy's timeout)
        gate = serve.get_deployment_handle("Gate", app_name="t20queue")
        parked = queue_handle.park.remote("t20b")
        gate.arrived.remote("t20b", 1).result(timeout_s=10)
        started = time.monotonic()
        b = http.get("/t20q?key=t20b-queued")
        b_s = time.monotonic() - started
        gate.open.remote("t20b").result(timeout_s=10)
        assert parked.result(timeout_s=10) == "released"
        after = http.get("/t20q?key=t20b-after")
        pid_after = http.get("/t20?op=pid").json()["pid"]
    # (c)
    sock = _send(_port(url), "/t20?op=stall&key=t20c")
    started = time.monotonic()
    first_at = None
    data = b""
    sock.settimeout(5)
    with sock:
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if first_at is None and b"first" in data:
                    first_at = time.monotonic()
        except (ConnectionResetError, TimeoutError):
            pass
    c_s = time.monotonic() - started
    c_stopped = wait_until(lambda: _read_mark(marks, "t20c.stopped"), 5, "the stalled generator is stopped")
    executed = _logged(marks)
    terminated = data.endswith(b"0\r\n\r\n")
    figures = (
        f"T20 request_timeout_s={TIMEOUT_S}: (a) sleeping handler -> {a.status_code} after {a_s:.3f}s "
        f"(error {a_s - TIMEOUT_S:+.3f}s), its task cancelled {a_cancel_s:.3f}s after the request; "
        f"(b) queued request -> {b.status_code} after {b_s:.3f}s (error {b_s - TIMEOUT_S:+.3f}s), "
        f"executions of it {executed.count('executed t20b-queued')}, next request {after.status_code}; "
        f"(c) stalled stream: first chunk {((first_at or started) - started) * 1000:.0f} ms, connection "
        f"ended after {c_s:.3f}s, terminating chunk sent: {terminated}, generator "
        f"stopped {c_stopped[0] - started:.3f}s after the request; replica restarts "
        f"{len(replicas - replica_pids(short_timeout))} (pid {pid} -> {pid_after})"
    )
    print(figures)
    assert a.status_code == 408 and TIMEOUT_S - 0.05 < a_s < TIMEOUT_S + 2, figures
    assert b.status_code == 408 and TIMEOUT_S - 0.05 < b_s < TIMEOUT_S + 2, figures
    assert "executed t20b-queued" not in executed and after.status_code == 200, figures
    assert first_at is not None and c_s < TIMEOUT_S + 3 and not terminated, figures
    assert pid == pid_after and replica_pids(short_timeout) == replicas, figures


# -- T16: backpressure exactness -----------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1, backpressure_config={"retry_after_s": 2})
class Narrow:
    """One slot, one queue place; each request parks on the gate ``key``."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        key = request.query_params["key"]
        gate = serve.get_deployment_handle("Gate", app_name="gate")
        await gate.arrive.remote(key)
        await gate.wait.remote(key)
        return {"pid": os.getpid()}


def test_t16_backpressure_is_exact(gate: Any) -> None:
    """T16: with one slot and one queue place, request 1 runs, request 2 queues, the next 10
    get 503 at once (with ``Retry-After`` from ``backpressure_config``); after the release 1
    and 2 both get 200."""
    serve.run(Narrow.bind(), name="t16", route_prefix="/t16")
    try:
        url = _url()
        port = _port(url)
        first = _send(port, "/t16?key=t16")
        gate.arrived.remote("t16", 1).result(timeout_s=10)
        second = _send(port, "/t16?key=t16")
        _round_trip(url)  # the proxy has read request 2: it is queued
        rejected: list[tuple[int, float, str, str | None]] = []
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(10):
                started = time.monotonic()
                r = http.get("/t16?key=t16")
                rejected.append((r.status_code, time.monotonic() - started, r.text, r.headers.get("retry-after")))
        running_before_release = gate.arrived.remote("t16", 1).result(timeout_s=10)
        gate.open.remote("t16").result(timeout_s=10)
        replies = [_read_all(first, 10), _read_all(second, 10)]
    finally:
        serve.delete("t16")
    latencies = [t for _, t, _, _ in rejected]
    figures = (
        f"T16 max_ongoing_requests=1, max_queued_requests=1: requests 1 and 2 -> "
        f"{[_status(r) for r in replies]} (request 2 ran only after the release: {running_before_release == 1}); "
        f"the next 10 -> {dict(Counter(s for s, _, _, _ in rejected))}, p99 {_p(latencies, 0.99) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms, Retry-After {sorted({h for *_, h in rejected if h})}, "
        f"body {rejected[0][2]!r}"
    )
    print(figures)
    assert [_status(r) for r in replies] == [200, 200], figures
    assert running_before_release == 1, figures
    assert all(s == 503 and "backpressure" in text for s, _, text, _ in rejected), figures
    assert all(h == "2" for *_, h in rejected), figures
    assert max(latencies) < 2, figures


# -- T18: strict max_ongoing_requests, spread ----------------------------------------------------

T18_REPLICAS, T18_SLOTS, T18_CONCURRENCY, T18_SECONDS = 4, 3, 24, 3.0


@serve.deployment(num_replicas=T18_REPLICAS, max_ongoing_requests=T18_SLOTS)
class Spread:
    """Counts its concurrent executions; each reply carries the replica's pid and peak so far."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def __call__(self, request: Request) -> dict[str, int]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.01)  # the work: a fixed service time
        finally:
            self.now -= 1
        return {"pid": os.getpid(), "peak": self.peak}


async def _closed_loop(url: str, path: str, concurrency: int, seconds: float, cap: int) -> list[tuple[int, Any]]:
    results: list[tuple[int, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end and len(results) < cap:
                r = await http.get(path)
                results.append((r.status_code, r.json() if r.status_code == 200 else r.text))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def test_t18_no_replica_exceeds_max_ongoing_requests(serve_instance: Any) -> None:
    """T18: 4 replicas with ``max_ongoing_requests=3`` under 24 concurrent clients for 3 s: no
    replica ever runs more than 3 at once; the share and peak per replica are printed."""
    serve.run(Spread.bind(), name="t18", route_prefix="/t18")
    try:
        results = asyncio.run(_closed_loop(_url(), "/t18", T18_CONCURRENCY, T18_SECONDS, 5000))
    finally:
        serve.delete("t18")
    ok = [body for status, body in results if status == 200]
    share = Counter(body["pid"] for body in ok)
    peak: dict[int, int] = {}
    for body in ok:
        peak[body["pid"]] = max(peak.get(body["pid"], 0), body["peak"])
    mean = len(ok) / T18_REPLICAS
    spread = ", ".join(f"pid {pid}: {n} ({(n - mean) / mean:+.0%}) peak {peak[pid]}" for pid, n in sorted(share.items()))
    figures = (f"T18 {T18_REPLICAS} replicas, max_ongoing_requests={T18_SLOTS}, {T18_CONCURRENCY} clients for "
               f"{T18_SECONDS}s: {len(results)} requests, {len(ok)} ok; {spread}")
    print(figures)
    assert len(ok) == len(results), figures
    assert len(share) == T18_REPLICAS, figures
    assert max(peak.values()) <= T18_SLOTS, figures


# -- T19: client disconnect cancellation ---------------------------------------------------------


@serve.deployment(max_ongoing_requests=8)
class Recorder:
    """Downstream: ``hold`` waits forever, recording its start and its cancellation."""

    def __init__(self, marks: str) -> None:
        self.marks = marks

    async def hold(self, key: str) -> None:
        _mark(self.marks, f"{key}.down-started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            _mark(self.marks, f"{key}.down-cancelled")
            raise


@serve.deployment(max_ongoing_requests=8)
class Front:
    """Awaits the downstream ``Recorder.hold``, recording its own cancellation."""

    def __init__(self, recorder: Any, marks: str) -> None:
        self.recorder = recorder
        self.marks = marks

    async def __call__(self, request: Request) -> str:
        key = request.query_params["key"]
        try:
            await self.recorder.hold.remote(key)
        except asyncio.CancelledError:
            _mark(self.marks, f"{key}.cancelled")
            raise
        return "unreachable"


@serve.deployment(max_ongoing_requests=1)
class Single:
    """One slot. ``op=park`` parks on the gate ``key``; ``op=hold`` waits forever (recording
    its cancellation); ``op=ok`` answers. Every execution is logged."""

    def __init__(self, marks: str) -> None:
        self.marks = marks

    async def __call__(self, request: Request) -> str:
        op, key = request.query_params["op"], request.query_params.get("key", "")
        _log(self.marks, f"{op} {key}")
        if op == "park":
            gate = serve.get_deployment_handle("Gate", app_name="gate")
            await gate.arrive.remote(key)
            await gate.wait.remote(key)
        elif op == "hold":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                _log(self.marks, f"cancelled {key}")
                raise
        return "ok"


@serve.deployment
class Chunks:
    """An endless stream of small chunks; records how many it yielded when it stops; ``op=count``
    says how many a stream has yielded so far."""

    def __init__(self, marks: str) -> None:
        self.marks = marks
        self.yields: dict[str, int] = {}

    async def __call__(self, request: Request) -> Any:
        key = request.query_params["key"]
        if request.query_params.get("op") == "count":
            return {"yields": self.yields.get(key, 0)}
        marks, yields = self.marks, self.yields

        async def endless() -> Any:
            yields[key] = 0
            try:
                while True:
                    yields[key] += 1
                    yield f"chunk {yields[key]}\n".encode()
            finally:
                _mark(marks, f"{key}.stopped", yields[key])

        return StreamingResponse(endless(), media_type="text/plain")


def test_t19a_disconnect_cancels_the_handler_and_its_downstream_call(serve_instance: Any, marks: Path) -> None:
    """T19 (a): a client with a 0.5 s timeout leaves while the handler awaits a downstream call
    that waits forever: the handler sees CancelledError, and the downstream call is cancelled."""
    serve.run(Front.bind(Recorder.bind(str(marks)), str(marks)), name="t19a", route_prefix="/t19a")
    try:
        sent = time.monotonic()
        sock = _send(_port(_url()), "/t19a?key=t19a")
        wait_until(lambda: (marks / "t19a.down-started").exists(), 10, "the downstream call started")
        sock.settimeout(max(0.0, sent + 0.5 - time.monotonic()) or 0.001)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # the client's 0.5 s timeout
        sock.close()
        left = time.monotonic()
        handler = wait_until(lambda: _read_mark(marks, "t19a.cancelled"), 5, "the handler is cancelled")
        downstream = wait_until(lambda: _read_mark(marks, "t19a.down-cancelled"), 5, "the downstream call is cancelled")
    finally:
        serve.delete("t19a")
    figures = (f"T19a client left after {left - sent:.2f}s: handler saw CancelledError "
               f"{(handler[0] - left) * 1000:.0f} ms after the disconnect, the downstream call "
               f"{(downstream[0] - left) * 1000:.0f} ms after")
    print(figures)
    assert handler[0] - left < 1.0 and downstream[0] - left < 1.0, figures


def test_t19b_a_queued_request_whose_client_left_never_runs(gate: Any, marks: Path) -> None:
    """T19 (b): the replica's one slot is taken by a parked request; a second request waits in
    the proxy's queue and its client leaves after 0.5 s: it never reaches the replica."""
    serve.run(Single.bind(str(marks)), name="t19b", route_prefix="/t19b")
    try:
        url = _url()
        port = _port(url)
        parked = _send(port, "/t19b?op=park&key=t19b")
        gate.arrived.remote("t19b", 1).result(timeout_s=10)
        queued = _send(port, "/t19b?op=q&key=t19b-queued")
        queued.settimeout(0.5)
        with pytest.raises(TimeoutError):
            queued.recv(1)  # the client's 0.5 s timeout
        queued.close()
        _round_trip(url)  # the proxy has seen the close
        executions_before = len(_logged(marks))
        gate.open.remote("t19b").result(timeout_s=10)
        parked_status = _status(_read_all(parked, 10))
        with httpx.Client(timeout=10) as http:
            after = http.get(url + "/t19b?op=ok&key=t19b-after").status_code
        logged = _logged(marks)
    finally:
        serve.delete("t19b")
    figures = (f"T19b parked request -> {parked_status}; the queued request whose client left ran "
               f"{logged.count('q t19b-queued')} times; executions {executions_before} -> {len(logged)} "
               f"(the next request only: {logged[executions_before:]}); next request {after}")
    print(figures)
    assert "q t19b-queued" not in logged, figures
    assert parked_status == 200 and after == 200, figures
    assert logged[executions_before:] == ["ok t19b-after"], figures


def test_t19c_the_generator_stops_when_the_client_closes(serve_instance: Any, marks: Path) -> None:
    """T19 (c): a client reads 3 chunks of an endless stream and closes: the generator stops."""
    serve.run(Chunks.bind(str(marks)), name="t19c", route_prefix="/t19c")
    try:
        url = _url()
        sock = _send(_port(url), "/t19c?key=t19c")
        data = b""
        with sock:
            while data.count(b"chunk ") < 3:
                chunk = sock.recv(64)
                assert chunk, data
                data += chunk
        closed = time.monotonic()
        stopped = wait_until(lambda: _read_mark(marks, "t19c.stopped"), 5, "the generator stopped")
        with httpx.Client(timeout=10) as http:
            later = http.get(url + "/t19c?op=count&key=t19c").json()["yields"]
    finally:
        serve.delete("t19c")
    at_stop = int(stopped[1])
    figures = (f"T19c client closed after 3 chunks: the generator stopped {(stopped[0] - closed) * 1000:.0f} ms "
               f"later, after {at_stop} yields (flow control bounds how far it runs ahead); yields "
               f"after it stopped: {later - at_stop}")
    print(figures)
    assert later == at_stop, figures
    assert stopped[0] - closed < 2, figures


def test_t19d_connect_send_abort_cycles_leak_nothing(serve_instance: Any, marks: Path) -> None:
    """T19 (d): 300 clients send a request to a one-slot deployment whose handler waits forever,
    then reset or close the connection: every started handler is cancelled, a normal request is
    answered at once afterwards (no slot leaked in the proxy's router or the replica), and the
    proxy's RSS stays flat."""
    cycles = 300
    serve.run(Single.bind(str(marks)), name="t19d", route_prefix="/t19d")
    try:
        url = _url()
        port = _port(url)
        proxy = _proxy(serve_instance.supervisor)
        with httpx.Client(timeout=10) as http:
            assert http.get(url + "/t19d?op=ok&key=warm").status_code == 200
        before = proxy.memory_info().rss
        started = time.monotonic()
        for i in range(cycles):
            sock = _send(port, f"/t19d?op=hold&key=t19d-{i}")
            if i % 2:
                sock.close()
            else:
                _abort(sock)
        cycles_s = time.monotonic() - started

        def balanced() -> tuple[int, int] | None:
            logged = _logged(marks)
            held = sum(line.startswith("hold t19d-") for line in logged)
            cancelled = sum(line.startswith("cancelled t19d-") for line in logged)
            return (held, cancelled) if held == cancelled else None

        _round_trip(url)
        held, cancelled = wait_until(balanced, 10, "every started handler is cancelled")
        with httpx.Client(timeout=10) as http:
            t = time.monotonic()
            normal = http.get(url + "/t19d?op=ok&key=t19d-after").status_code
            normal_s = time.monotonic() - t
        after = proxy.memory_info().rss
    finally:
        serve.delete("t19d")
    figures = (f"T19d {cycles} connect-send-abort cycles in {cycles_s:.2f}s: {held} reached the replica, "
               f"{cancelled} of those cancelled; then a request to the one-slot deployment -> {normal} in "
               f"{normal_s * 1000:.0f} ms; proxy RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB "
               f"(delta {(after - before) / MiB:+.1f} MiB)")
    print(figures)
    assert normal == 200 and normal_s < 5, figures
    assert after - before < 32 * MiB, figures


# -- T21: user-code exceptions -------------------------------------------------------------------


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self) -> None:
        super().__init__("an error holding a lock")
        self.lock = threading.Lock()


class Unserializable:
    """A return value that cannot be serialized (pickle or JSON): it holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def _act(kind: str) -> Any:
    if kind == "value":
        raise ValueError(f"secret detail from {__file__}")
    if kind == "unpicklable":
        raise LockedError()
    if kind == "unserializable":
        return Unserializable()
    return {"pid": os.getpid()}


@serve.deployment(num_replicas=2)
class Inner:
    async def run(self, kind: str) -> Any:
        return _act(kind)


@serve.deployment(num_replicas=2)
class Outer:
    """Does ``kind`` itself, or (``via=handle``) through a call to ``Inner``, so that the
    exception or value crosses a process boundary."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, request: Request) -> Any:
        kind = request.query_params["kind"]
        if request.query_params.get("via") == "handle":
            return await self.inner.run.remote(kind)
        return _act(kind)


def _kind(i: int) -> str:
    if i % 10 == 0:
        return "value"
    if i % 50 == 3:
        return "unpicklable"
    if i % 50 == 7:
        return "unserializable"
    return "ok"


def test_t21_user_code_exceptions_get_generic_500s(serve_instance: Any) -> None:
    """T21: 200 requests, 10 % raise ValueError, a few raise an exception that cannot be pickled,
    a few return a value that cannot be serialized, half directly and half through a handle
    call: every failure is a 500 with a generic body, the others 200, no replica restarts."""
    total = 200
    serve.run(Outer.bind(Inner.bind()), name="t21", route_prefix="/t21")
    try:
        replicas = replica_pids(serve_instance.supervisor)

        async def send_all() -> list[tuple[str, str, int, str, str | None]]:
            limits = httpx.Limits(max_connections=8)
            async with httpx.AsyncClient(base_url=_url(), timeout=10, limits=limits) as http:
                sem = asyncio.Semaphore(8)

                async def one(i: int) -> tuple[str, str, int, str, str | None]:
                    kind, via = _kind(i), ("handle" if i % 4 in (1, 2) else "direct")
                    async with sem:
                        r = await http.get("/t21", params={"kind": kind, "via": via})
                    return kind, via, r.status_code, r.text, r.headers.get("x-request-id")

                return list(await asyncio.gather(*(one(i) for i in range(total))))

        results = asyncio.run(send_all())
        replicas_after = replica_pids(serve_instance.supervisor)
    finally:
        serve.delete("t21")
    injected = Counter((k, v) for k, v, *_ in results if k != "ok")
    failures = Counter((k, v) for k, v, s, *_ in results if s == 500)
    leaks = [(k, v, text) for k, v, s, text, _ in results
             if any(bad in text for bad in ("Traceback", 'File "', ".py", "secret", "lock", "/"))]
    bodies = sorted({text for k, _, _, text, _ in results if k != "ok"})
    figures = (f"T21 {total} requests: injected {dict(injected)}; 500s {dict(failures)}; other statuses "
               f"{dict(Counter(s for k, _, s, _, _ in results if k == 'ok'))} for the rest; failure bodies "
               f"{bodies}; traceback/path leaks {len(leaks)}; replica restarts {len(replicas - replicas_after)}")
    print(figures)
    assert all(s == (200 if k == "ok" else 500) for k, _, s, _, _ in results), figures
    assert not leaks, figures
    assert all(rid for *_, rid in results), figures
    assert replicas <= replicas_after, figures

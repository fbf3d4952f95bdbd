"""Hostile and unlucky HTTP clients against one proxy (plan section 4: T11b, T23, T24, T25, T26,
and the timeout clamp of issue 10 item 9), scaled down to run in seconds.

One instance for the module, with tight ``http_options`` so the deadlines show quickly; T11b
starts its own supervisor through ``shoal run``. Every figure is printed (``pytest -s``) and
repeated in the assertion messages.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import live_children, processes_in_run_dir, served_url, stop_cli, supervisor_of, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
MAX_CONNECTIONS = 64
SERVER_TIMEOUT_S = 3.0


BIG_CHUNKS = 256  # a 16 MiB streamed response, in 64 KiB chunks


@serve.deployment(max_ongoing_requests=64)
class Sink:
    """Counts the body it reads (without keeping it); ``/hold`` waits until the test's timeout;
    ``/big`` streams 16 MiB, counting the chunks it got to send (``/sent``)."""

    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, request: Request) -> Any:
        path = request.url.path
        if path.endswith("/hold"):
            await asyncio.Event().wait()
        if path.endswith("/sent"):
            return {"sent": self.sent}
        if path.endswith("/big"):
            self.sent = 0

            async def chunks() -> Any:
                for _ in range(BIG_CHUNKS):
                    yield b"b" * 65536
                    self.sent += 1

            return StreamingResponse(chunks())
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}


class Proxy:
    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.process = psutil.Process(pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={
        "port": 0, "request_header_timeout_s": HEADER_TIMEOUT_S, "keep_alive_timeout_s": KEEP_ALIVE_S,
        "max_connections": MAX_CONNECTIONS, "request_timeout_s": SERVER_TIMEOUT_S,
    })
    supervisor = supervisor_of(psutil.Process())
    serve.run(Sink.bind(), name="abuse", route_prefix="/abuse")
    url = serve.get_http_url()
    assert url is not None
    (pid,) = [p.pid for p in supervisor.children() if p.name() == "shoal-proxy"]
    yield Proxy(url, pid)
    serve.shutdown()
    wait_until(lambda: not live_children(), 15, "no child processes left after serve.shutdown()")


def _ok(proxy: Proxy) -> int:
    with httpx.Client(timeout=5) as c:
        return c.post(proxy.url + "/abuse", content=b"ping").status_code


def _reply_or_close(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sent before closing (b"" if it closed or reset without a word)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


class RssPeak:
    """The proxy's peak RSS while the block runs (sampled every 5 ms on a thread)."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self.peak = proxy.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proxy.rss())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- T24: oversized and numerous headers ---------------------------------------------------------


def _head_with(extra: bytes) -> bytes:
    return b"GET /abuse HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


@pytest.mark.parametrize(
    ("case", "head"),
    [
        ("one 8 MiB header", _head_with(b"x-big: " + b"a" * (8 * MiB) + b"\r\n")),
        ("100000 headers", _head_with(b"a: b\r\n" * 100_000)),
        ("200 tiny headers", _head_with(b"".join(b"h%d: v\r\n" % i for i in range(200)))),
        ("64 KiB cookie", _head_with(b"cookie: " + b"c" * (64 * 1024) + b"\r\n")),
    ],
)
def test_t24_oversized_or_numerous_headers_get_431(proxy: Proxy, case: str, head: bytes) -> None:
    before = proxy.rss()
    with RssPeak(proxy) as rss, proxy.connect() as sock:
        started = time.monotonic()
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while the client was still sending
        reply = _reply_or_close(sock, 5)
        elapsed = time.monotonic() - started
    status = reply.split(b"\r\n", 1)[0].decode() or "closed"
    follow_up = _ok(proxy)
    figures = (f"T24 {case}: {status} in {elapsed:.2f}s; proxy RSS {before / MiB:.1f} -> peak "
               f"{rss.peak / MiB:.1f} MiB; follow-up {follow_up}")
    print(figures)
    assert status in ("HTTP/1.1 431 Request Header Fields Too Large", "closed"), figures
    assert elapsed < 2, figures
    assert rss.peak - before < 16 * MiB, figures
    assert follow_up == 200, figures


# -- T25: slowloris ------------------------------------------------------------------------------


def test_t25_connections_trickling_their_head_are_closed_at_the_deadline(proxy: Proxy) -> None:
    trickles = 30
    closed_after: list[float] = []
    lock = threading.Lock()

    def trickle() -> None:
        # One byte, then wait for the server's verdict a tenth of a second at a time.
        with proxy.connect() as sock:
            started = time.monotonic()
            sock.sendall(b"GET /abuse HTTP/1.1\r\n")
            sock.settimeout(0.1)
            for _ in range(100):
                try:
                    sock.sendall(b"x")
                    if not sock.recv(65536):
                        break
                    break  # the 408 arrived
                except TimeoutError:
                    continue
                except OSError:
                    break
            with lock:
                closed_after.append(time.monotonic() - started)

    threads = [threading.Thread(target=trickle) for _ in range(trickles)]
    for thread in threads:
        thread.start()
    errors = 0
    normal = 0
    with httpx.Client(timeout=5) as c:
        while any(t.is_alive() for t in threads) and normal < 200:
            try:
                errors += c.post(proxy.url + "/abuse", content=b"ping").status_code != 200
            except httpx.HTTPError:
                errors += 1
            normal += 1
    for thread in threads:
        thread.join(15)
    figures = (f"T25 {trickles} trickling connections closed after {min(closed_after):.2f}-"
               f"{max(closed_after):.2f}s (deadline {HEADER_TIMEOUT_S}s); normal client: {normal} "
               f"requests, {errors} errors")
    print(figures)
    assert len(closed_after) == trickles and max(closed_after) < HEADER_TIMEOUT_S + 3, figures
    assert errors == 0, figures


# -- T26: idle connections and the connection cap -------------------------------------------------


def test_t26_idle_connections_are_closed_at_their_deadlines(proxy: Proxy) -> None:
    fresh = [proxy.connect() for _ in range(20)]  # connect, send nothing
    kept = proxy.connect()  # one request, then idle on keep-alive
    kept.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    first = kept.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first
    idle_closed = []
    for sock in fresh:
        _reply_or_close(sock, 10)
        idle_closed.append(time.monotonic() - started)
        sock.close()
    _reply_or_close(kept, 10)
    keep_alive_closed = time.monotonic() - started
    kept.close()
    figures = (f"T26 idle connections closed after {max(idle_closed):.2f}s (head deadline "
               f"{HEADER_TIMEOUT_S}s); keep-alive connection closed after {keep_alive_closed:.2f}s "
               f"(keep_alive_timeout_s {KEEP_ALIVE_S})")
    print(figures)
    assert max(idle_closed) < HEADER_TIMEOUT_S + 3 and keep_alive_closed < KEEP_ALIVE_S + 3, figures


def test_t26_beyond_the_connection_cap_requests_get_503_never_hang(proxy: Proxy) -> None:
    flood = [proxy.connect() for _ in range(MAX_CONNECTIONS + 16)]
    try:
        statuses: list[int | str] = []

        def refused_or_503() -> bool:
            try:
                with httpx.Client(timeout=5) as c:
                    statuses.append(c.get(proxy.url + "/-/healthz").status_code)
            except httpx.TransportError as exc:
                statuses.append(type(exc).__name__)
            return statuses[-1] != 200

        wait_until(refused_or_503, HEADER_TIMEOUT_S, "a request over the cap is refused or gets 503")
    finally:
        for sock in flood:
            sock.close()
    recovered = wait_until(lambda: _ok(proxy) == 200, 10, "the proxy serves again")
    figures = f"T26 {len(flood)} connections over a cap of {MAX_CONNECTIONS}: normal client saw {statuses}"
    print(figures)
    assert statuses[-1] in (503, "ConnectError", "ReadError", "RemoteProtocolError"), figures
    assert recovered


# -- item 9: x-request-timeout-seconds only shortens ----------------------------------------------


def test_the_timeout_header_cannot_lift_the_servers_limit(proxy: Proxy) -> None:
    with httpx.Client(timeout=30) as c:
        started = time.monotonic()
        r = c.get(proxy.url + "/abuse/hold", headers={"x-request-timeout-seconds": "3600"})
        elapsed = time.monotonic() - started
        shorter = c.get(proxy.url + "/abuse/hold", headers={"x-request-timeout-seconds": "0.2"})
    figures = f"timeout header 3600 against request_timeout_s={SERVER_TIMEOUT_S}: {r.status_code} after {elapsed:.2f}s"
    print(figures)
    assert r.status_code == 408 and f"after {SERVER_TIMEOUT_S}s" in r.text, figures
    assert shorter.status_code == 408 and "after 0.2s" in shorter.text


# -- T23: bodies -----------------------------------------------------------------------------------


def test_t23_parallel_large_uploads_keep_the_proxy_small(proxy: Proxy) -> None:
    uploads, size = 8, 20 * MiB
    body = b"u" * size
    before = proxy.rss()

    async def upload_all() -> list[Any]:
        async with httpx.AsyncClient(timeout=60) as c:
            replies = await asyncio.gather(*(c.post(proxy.url + "/abuse", content=body) for _ in range(uploads)))
            return [r.json()["size"] for r in replies]

    with RssPeak(proxy) as rss:
        sizes = asyncio.run(upload_all())
    after = proxy.rss()
    figures = (f"T23 {uploads} parallel {size // MiB} MiB uploads: proxy RSS {before / MiB:.1f} -> peak "
               f"{rss.peak / MiB:.1f} MiB, after {after / MiB:.1f} MiB")
    print(figures)
    assert sizes == [size] * uploads, figures
    assert rss.peak - before < 64 * MiB, figures


def test_t25_a_client_that_does_not_read_holds_the_app_back_not_the_proxys_memory(proxy: Proxy) -> None:
    before = proxy.rss()
    with RssPeak(proxy) as rss, proxy.connect() as sock:
        sock.sendall(b"GET /abuse/big HTTP/1.1\r\nHost: x\r\n\r\n")
        with httpx.Client(timeout=5) as c:
            def sent() -> int:
                return int(c.get(proxy.url + "/abuse/sent").json()["sent"])

            wait_until(lambda: sent() >= 16, 10, "the response started")
            try:  # the client reads nothing: the app must not get to the end
                wait_until(lambda: sent() >= BIG_CHUNKS, 1, "the app sent its whole response")
                finished_unread = True
            except AssertionError:
                finished_unread = False
            held_at = sent()
        received = 0
        sock.settimeout(10)
        while received < BIG_CHUNKS * 65536:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
    figures = (f"T25 slow reader of a 16 MiB response: the app was held at {held_at}/{BIG_CHUNKS} chunks "
               f"while the client read nothing; proxy RSS {before / MiB:.1f} -> peak {rss.peak / MiB:.1f} MiB; "
               f"then the client read {received / MiB:.1f} MiB")
    print(figures)
    assert not finished_unread, figures
    assert received >= BIG_CHUNKS * 65536, figures
    assert rss.peak - before < 32 * MiB, figures


# -- T11 variant b: drain with requests that never finish ------------------------------------------

HELD_APP = '''
import asyncio
from shoal import serve

@serve.deployment(num_replicas=2, max_ongoing_requests=10, graceful_shutdown_timeout_s=2)
class Held:
    async def __call__(self, request):
        if request.url.path.endswith("/ping"):
            return "pong"
        with open(__file__ + ".arrived", "a") as arrived:
            arrived.write("x")
        await asyncio.Event().wait()

app = Held.bind()
'''

HELD_CONFIG = '''
http_options: {host: 127.0.0.1, port: 0, graceful_shutdown_timeout_s: 2}
applications:
- name: held
  route_prefix: /
  import_path: held_app:app
'''


def test_t11b_drain_answers_requests_that_never_finish(tmp_path: Path, private_run_dir: Path) -> None:
    (tmp_path / "held_app.py").write_text(HELD_APP)
    (tmp_path / "held.yaml").write_text(HELD_CONFIG)
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    shoal = str(Path(sys.executable).parent / "shoal")
    cli = subprocess.Popen([shoal, "run", "held.yaml"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    readers: list[threading.Thread] = []
    held = 6
    try:
        base = served_url(cli, 60, readers)
        wait_until(lambda: _get_status(base + "/ping") == 200, 30, "the app serves")
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()
        signalled = threading.Event()
        signalled_at: list[float] = []

        def hold() -> None:
            try:
                with httpx.Client(timeout=60) as c:
                    r = c.get(base + "/hold")
                outcome = f"{r.status_code} {r.text}"
            except httpx.HTTPError as exc:
                outcome = f"bare {type(exc).__name__}"
            signalled.wait(60)
            with lock:
                outcomes.append((outcome, time.monotonic() - signalled_at[0]))

        threads = [threading.Thread(target=hold) for _ in range(held)]
        for thread in threads:
            thread.start()
        arrived = tmp_path / "held_app.py.arrived"
        wait_until(lambda: arrived.exists() and len(arrived.read_text()) >= held, 10, "the held requests run")
        supervisor = int((private_run_dir / "default" / "supervisor.pid").read_text())
        signalled_at.append(time.monotonic())
        os.kill(supervisor, signal.SIGTERM)
        signalled.set()
        for thread in threads:
            thread.join(30)
        code = cli.wait(60)
        exited_after = time.monotonic() - signalled_at[0]
    finally:
        stop_cli(cli, readers)
    figures = (f"T11b {held} requests that never finish, graceful_shutdown_timeout_s=2: "
               f"{sorted({o for o, _ in outcomes})} after {min(t for _, t in outcomes):.2f}-"
               f"{max(t for _, t in outcomes):.2f}s; the instance exited {code} after {exited_after:.1f}s")
    print(figures)
    assert len(outcomes) == held, figures
    assert all(o.startswith("503 ") for o, _ in outcomes), figures
    assert max(t for _, t in outcomes) < 2 + 3, figures
    assert code == 0, figures
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "every shoal process exited")


def _get_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None

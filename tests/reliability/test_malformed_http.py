"""T22 (plan section 4): a corpus of malformed HTTP/1.1 requests, each sent raw on its own
connection to one proxy.

Each case must end with a 4xx or a close within a 2 s socket timeout (never a 5xx, never a hang);
the proxy's PID must not change; a valid request right after each case gets 200; and no case that
was refused reaches a replica: the replica counts its executions, and for every case the number
of executions it caused must equal the number of 2xx (or 101) responses it got. Cases that are
valid HTTP in disguise (absolute-form URI, ``..`` segments, pipelining) may be answered 200; the
table says what each got. Run with ``-s`` for the per-case table.
"""

from __future__ import annotations

import base64
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from helpers import live_children, supervisor_of, wait_until
from starlette.requests import Request

from shoal import serve

pytestmark = pytest.mark.timeout(120)

SOCKET_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 1.0  # a head that never completes gets 408 within the 2 s bound


@serve.deployment
class Counted:
    """Counts the requests it executes (``/count`` reads the count without adding to it)."""

    def __init__(self) -> None:
        self.n = 0

    async def __call__(self, request: Request) -> Any:
        if request.url.path.endswith("/count"):
            return {"n": self.n}
        self.n += 1  # counted on arrival, before the body is read: reaching the replica counts
        body = await request.body()
        return {"len": len(body)}


ws_app = FastAPI()


@serve.deployment
@serve.ingress(ws_app)
class Echo:
    @ws_app.websocket("/")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass


@dataclass
class Proxy:
    url: str
    port: int
    pid: int
    supervisor: psutil.Process

    def current_pid(self) -> int:
        (pid,) = [p.pid for p in self.supervisor.children() if p.name() == "shoal-proxy"]
        return pid


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "request_header_timeout_s": HEADER_TIMEOUT_S})
    supervisor = supervisor_of(psutil.Process())
    serve.run(Counted.bind(), name="counted", route_prefix="/t22")
    serve.run(Echo.bind(), name="echo", route_prefix="/t22ws")
    url = serve.get_http_url()
    assert url is not None
    (pid,) = [p.pid for p in supervisor.children() if p.name() == "shoal-proxy"]
    yield Proxy(url, int(url.rsplit(":", 1)[1]), pid, supervisor)
    serve.shutdown()
    wait_until(lambda: not live_children(), 15, "no child processes left after serve.shutdown()")


# -- the corpus ------------------------------------------------------------------------------------

H = b"Host: x\r\n"
C = b"Connection: close\r\n"


def _req(line: bytes, headers: bytes = H + C, body: bytes = b"") -> bytes:
    return line + b"\r\n" + headers + b"\r\n" + body


def _post(headers: bytes, body: bytes) -> bytes:
    return _req(b"POST /t22 HTTP/1.1", H + C + headers, body)


_WS_KEY = base64.b64encode(b"0123456789abcdef")
_WS_UPGRADE = (b"GET /t22ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: " + _WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

REJECT, ACCEPT, EITHER = "reject", "accept", "either"

CASES: list[tuple[str, bytes | tuple[bytes, bytes], str]] = [
    ("valid control", _req(b"GET /t22 HTTP/1.1"), ACCEPT),
    # request line
    ("garbage request line", b"HELLO THERE\r\n\r\n", REJECT),
    ("binary request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", REJECT),
    ("no version (HTTP/0.9 shape)", b"GET /t22\r\n\r\n", REJECT),
    ("no target", _req(b"GET HTTP/1.1"), REJECT),
    ("tab separators", _req(b"GET\t/t22\tHTTP/1.1"), REJECT),
    ("lower-case version", _req(b"GET /t22 http/1.1"), REJECT),
    ("unknown version HTTP/1.2", _req(b"GET /t22 HTTP/1.2"), EITHER),
    ("unknown version HTTP/2.0 as text", _req(b"GET /t22 HTTP/2.0"), REJECT),
    ("unknown version HTTP/9.9", _req(b"GET /t22 HTTP/9.9"), REJECT),
    ("version not a number", _req(b"GET /t22 HTTP/1.x"), REJECT),
    ("non-token method G(T", _req(b"G(T /t22 HTTP/1.1"), REJECT),
    ("method with NUL", _req(b"GE\x00T /t22 HTTP/1.1"), REJECT),
    ("unknown token method", _req(b"FOOBAR /t22 HTTP/1.1"), EITHER),
    ("control char in target", _req(b"GET /t22/\x01x HTTP/1.1"), REJECT),
    ("space in target", _req(b"GET /t22/a b HTTP/1.1"), REJECT),
    # headers
    ("NUL in header value", _req(b"GET /t22 HTTP/1.1", H + C + b"X-A: a\x00b\r\n"), REJECT),
    ("NUL in header name", _req(b"GET /t22 HTTP/1.1", H + C + b"X-\x00A: b\r\n"), REJECT),
    ("bare CR in header value", _req(b"GET /t22 HTTP/1.1", H + C + b"X-A: a\rb\r\n"), REJECT),
    ("bare LF line endings", b"GET /t22 HTTP/1.1\nHost: x\nConnection: close\n\n", EITHER),
    ("bare CR line endings", b"GET /t22 HTTP/1.1\rHost: x\rConnection: close\r\r", REJECT),
    ("obsolete line folding", _req(b"GET /t22 HTTP/1.1", H + C + b"X-A: a\r\n  folded\r\n"), EITHER),
    ("space before colon", _req(b"GET /t22 HTTP/1.1", H + C + b"X-A : b\r\n"), REJECT),
    ("header without colon", _req(b"GET /t22 HTTP/1.1", H + C + b"NoColonHere\r\n"), REJECT),
    ("empty header name", _req(b"GET /t22 HTTP/1.1", H + C + b": b\r\n"), REJECT),
    ("non-token header name", _req(b"GET /t22 HTTP/1.1", H + C + b"X(A): b\r\n"), REJECT),
    # Content-Length and Transfer-Encoding
    ("duplicate equal Content-Length", _post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), EITHER),
    ("conflicting Content-Length", _post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), REJECT),
    ("Content-Length list", _post(b"Content-Length: 5, 6\r\n", b"hello!"), REJECT),
    ("negative Content-Length", _post(b"Content-Length: -1\r\n", b"hello"), REJECT),
    ("non-numeric Content-Length", _post(b"Content-Length: abc\r\n", b"hello"), REJECT),
    ("overflowing Content-Length", _post(b"Content-Length: 99999999999999999999999\r\n", b"x"), REJECT),
    ("Content-Length + Transfer-Encoding (smuggling shape)",
     _post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
           b"0\r\n\r\nGET /t22/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"), REJECT),
    ("Transfer-Encoding gzip without chunked", _post(b"Transfer-Encoding: gzip\r\n", b"hello"), REJECT),
    ("Transfer-Encoding chunked, identity", _post(b"Transfer-Encoding: chunked, identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"), REJECT),
    ("Transfer-Encoding xchunked", _post(b"Transfer-Encoding: xchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), REJECT),
    # chunked bodies
    ("valid chunked control", _post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), ACCEPT),
    ("chunk size not hex", _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), REJECT),
    ("negative chunk size", _post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"), REJECT),
    ("overflowing chunk size", _post(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), REJECT),
    ("chunk size with NUL extension", _post(b"Transfer-Encoding: chunked\r\n", b"5;\x00\r\nhello\r\n0\r\n\r\n"), REJECT),
    ("chunk data then garbage, not CRLF (CVE-2025-43859 shape)",
     _post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"), REJECT),
    # targets
    ("100 KiB path", _req(b"GET /t22/" + b"a" * (100 * 1024) + b" HTTP/1.1"), REJECT),
    ("bad percent-encoding", _req(b"GET /t22/%zz%4 HTTP/1.1"), EITHER),
    ("percent-encoded NUL", _req(b"GET /t22/%00 HTTP/1.1"), EITHER),
    ("dot-dot segments inside the route", _req(b"GET /t22/../t22/x HTTP/1.1"), EITHER),
    ("dot-dot segments out of the route", _req(b"GET /../../etc/passwd HTTP/1.1"), REJECT),
    ("absolute-form URI", _req(b"GET http://x/t22 HTTP/1.1"), EITHER),
    ("absolute-form URI of another host", _req(b"GET http://elsewhere.example:81/t22 HTTP/1.1"), EITHER),
    ("asterisk-form", _req(b"OPTIONS * HTTP/1.1"), REJECT),
    ("authority-form CONNECT", _req(b"CONNECT elsewhere.example:443 HTTP/1.1"), REJECT),
    # several requests on one connection
    ("pipelined two valid requests", _req(b"GET /t22/1 HTTP/1.1", H) + _req(b"GET /t22/2 HTTP/1.1"), ACCEPT),
    ("pipelined valid then garbage", _req(b"GET /t22/1 HTTP/1.1", H) + b"GARBAGE\x00\r\n\r\n", EITHER),
    # (the garbage goes after the 101: uvicorn drops bytes that arrive with the upgrade request)
    ("WebSocket upgrade then garbage frames", (_WS_UPGRADE, b"\xff\xff\xff\xff not a frame " * 4), EITHER),
]


@dataclass
class Result:
    case: str
    statuses: list[str]  # every status code the reply held, or "closed" / "timeout"
    seconds: float
    executions: int
    follow_up: int
    proxy_pid: int


def _exchange(port: int, data: bytes | tuple[bytes, bytes]) -> tuple[bytes, float, bool]:
    """Send ``data`` on a new connection (a pair: the second part once the first's response
    head came back); what came back until the server closed (or the 2 s bound), the time that
    took, and whether the bound was hit."""
    started = time.monotonic()
    reply = b""
    timed_out = False
    first, then = data if isinstance(data, tuple) else (data, b"")
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(first)
            while then and b"\r\n\r\n" not in reply:
                reply += sock.recv(65536)
            sock.sendall(then)
        except OSError:
            pass  # refused and closed while still sending
        deadline = started + SOCKET_TIMEOUT_S
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            timed_out = True
        except OSError:
            pass  # reset: a close
    return reply, time.monotonic() - started, timed_out


def _statuses(reply: bytes, timed_out: bool) -> list[str]:
    found = [code.decode() for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    if timed_out:
        found.append("timeout")
    return found or ["closed"]


def test_t22_malformed_http_corpus(proxy: Proxy) -> None:
    results: list[Result] = []
    with httpx.Client(base_url=proxy.url, timeout=5) as http:
        def count() -> int:
            return int(http.get("/t22/count").json()["n"])

        for case, data, _ in CASES:
            before = count()
            reply, seconds, timed_out = _exchange(proxy.port, data)
            follow_up = http.get("/t22").status_code  # one execution of its own
            executions = count() - before - 1
            results.append(Result(case, _statuses(reply, timed_out), seconds, executions, follow_up,
                                  proxy.current_pid()))
    width = max(len(r.case) for r in results)
    table = "\n".join(
        f"  {r.case:<{width}}  {'+'.join(r.statuses):<9} {r.seconds * 1000:6.0f} ms  reached replica "
        f"{r.executions}x  follow-up {r.follow_up}" for r in results
    )
    problems = []
    for (case, _, expected), r in zip(CASES, results):
        codes = [s for s in r.statuses if s.isdigit()]
        answered = [s for s in codes if s[0] in "12"]
        if "timeout" in r.statuses:
            problems.append(f"{case}: no answer or close within {SOCKET_TIMEOUT_S}s")
        if any(s[0] == "5" for s in codes):
            problems.append(f"{case}: got {r.statuses}")
        if r.executions != len([s for s in answered if s[0] == "2"]) and not case.startswith("WebSocket"):
            problems.append(f"{case}: {r.executions} executions for responses {r.statuses}")
        if expected == REJECT and answered:
            problems.append(f"{case}: expected a refusal, got {r.statuses}")
        if expected == ACCEPT and not answered:
            problems.append(f"{case}: expected an answer, got {r.statuses}")
        if r.follow_up != 200 or r.proxy_pid != proxy.pid:
            problems.append(f"{case}: follow-up {r.follow_up}, proxy pid {r.proxy_pid} (was {proxy.pid})")
    refused = [r for r in results if not any(s[0] in "12" for s in r.statuses if s.isdigit())]
    figures = (f"T22 {len(results)} malformed-HTTP cases, one connection each (bound {SOCKET_TIMEOUT_S}s):\n{table}\n"
               f"refused {len(refused)}, of which reached a replica {sum(r.executions for r in refused)}; "
               f"proxy restarts {sum(r.proxy_pid != proxy.pid for r in results)}; "
               f"slowest {max(r.seconds for r in results) * 1000:.0f} ms")
    print(figures)
    assert not problems, "\n".join(problems) + "\n" + figures


def test_a_keep_alive_connection_busy_for_longer_than_the_head_deadline_is_never_cut(proxy: Proxy) -> None:
    """Each head gets its own ``request_header_timeout_s`` (the proxy moves one deadline per
    connection, and its timer re-arms when it fires early): back-to-back requests on one
    connection for more than twice the timeout all get 200 on that connection."""
    request = b"GET /t22/count HTTP/1.1\r\nHost: x\r\n\r\n"
    answered = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=SOCKET_TIMEOUT_S) as sock:
        pending = b""
        while time.monotonic() - started < 2.5 * HEADER_TIMEOUT_S:
            sock.sendall(request)
            while b"\r\n\r\n" not in pending:
                chunk = sock.recv(65536)
                assert chunk, f"the connection was closed after {answered} responses"
                pending += chunk
            head, _, pending = pending.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            while len(pending) < length:
                pending += sock.recv(65536)
            pending = pending[length:]
            answered += 1
    assert answered > 1

"""Per-line cost of access lines, in CPU microseconds of the writing thread (best of 5 rounds).

* ``RotatingLineFile.write``: a shared writer (``stat`` per write) and a lone one, next to a bare
  ``os.write`` of the same line;
* a replica's access line (``runtime/logs.log_access`` into its run-directory file), TEXT and JSON;
* the proxy's access line (``proxy.access``, written once per loop turn), and the whole
  ``AccessLogMiddleware`` around a do-nothing ASGI app, next to that app alone.

Run it: ``python benchmarks/access_log_cost.py [lines_per_round]``. It prints figures and asserts
nothing. CPU time, not wall time, so a busy machine blurs the figures less.
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import asyncio
import io
import logging
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from shoal.proxy.access import AccessLogMiddleware, access_line
from shoal.proxy.routes import RoutingTable
from shoal.runtime import logs
from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.rotation import RotatingLineFile, RotationLimits
from shoal.runtime.wire import RouteEntry

LINE = "INFO 2026-12-02 12:00:00,000 ray.serve 0123456789abcdef0123456789abcdef -- GET /api 200 1.2ms"
REQUEST_ID = "0123456789abcdef0123456789abcdef"
ENDED_PER_LOOP_TURN = 16  # requests that end in one loop iteration of a busy proxy


def best_us(run: Callable[[], None], lines: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.thread_time()
        run()
        rounds.append((time.thread_time() - started) / lines * 1e6)
    return min(rounds)


def files(directory: str, lines: int) -> None:
    for shared in (True, False):
        writer = RotatingLineFile(os.path.join(directory, f"shared-{shared}.log"), RotationLimits(), shared=shared)
        cost = best_us(lambda w=writer: [w.write(LINE) for _ in range(lines)], lines)  # type: ignore[misc]
        print(f"RotatingLineFile.write, {'shared' if shared else 'lone'} writer: {cost:.2f} us")
    fd = os.open(os.path.join(directory, "bare.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    data = (LINE + "\n").encode()
    print(f"bare os.write: {best_us(lambda: [os.write(fd, data) for _ in range(lines)], lines):.2f} us")


def replica(directory: str, lines: int) -> None:
    for encoding in ("TEXT", "JSON"):
        logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app",
                                     logging_config={"encoding": encoding}, default_logs_dir=directory)
        logging.getLogger().handlers[0].setStream(io.StringIO())  # type: ignore[attr-defined]
        cost = best_us(lambda: [logs.log_access("GET", "/api", 200, 1.23, request_id=REQUEST_ID) for _ in range(lines)], lines)
        print(f"replica access line, {encoding}: {cost:.2f} us")


class NoOpApp:
    options = SimpleNamespace(root_path="")
    table = RoutingTable(1, {"/api": RouteEntry("app", "Ingress")})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", REQUEST_ID.encode())]})
        await send({"type": "http.response.body", "body": b"ok"})


async def proxy(directory: str, encoding: str, lines: int) -> None:
    config = {"encoding": encoding}
    handlers = logs.install_proxy_logging(host="127.0.0.1", logging_config=config, default_logs_dir=directory,
                                          file_factory=LoopBufferedHandler)
    logging.getLogger().handlers[0].setStream(io.StringIO())  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    for handler in handlers:
        if isinstance(handler, LoopBufferedHandler):
            handler.bind(loop)
    line = access_line(handlers, config, "127.0.0.1")
    scope = {"type": "http", "method": "GET", "path": "/api/x", "headers": []}

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {}

    async def drive(call: Callable[[], Any]) -> float:
        rounds = []
        for _ in range(5):
            started = time.thread_time()
            for number in range(lines):
                await call()
                if number % ENDED_PER_LOOP_TURN == 0:
                    await asyncio.sleep(0)  # let the loop turn (and the buffered file write)
            rounds.append((time.thread_time() - started) / lines * 1e6)
        return min(rounds)

    async def just_line() -> None:
        line.write("GET", "/api", 200, 1.23, REQUEST_ID)

    bare, wrapped = NoOpApp(), AccessLogMiddleware(NoOpApp(), line)  # type: ignore[arg-type]
    print(f"proxy access line, {encoding}: {await drive(just_line):.2f} us; "
          f"no-op app {await drive(lambda: bare(scope, receive, send)):.2f} us, "
          f"with AccessLogMiddleware {await drive(lambda: wrapped(scope, receive, send)):.2f} us")


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with tempfile.TemporaryDirectory() as directory:
        files(directory, lines)
        replica(directory, lines)
        for encoding in ("TEXT", "JSON"):
            asyncio.run(proxy(directory, encoding, lines))


if __name__ == "__main__":
    main()

"""Entry point of the proxy process (started with the spawn method by the supervisor).

``main(spec, output, lifeline, listener)``: ``listener`` is the listening TCP socket, bound by the
supervisor (so a restarted proxy keeps the same port and clients queue instead of being refused).
Runs uvicorn with uvloop and httptools on it until SIGTERM, then drains: ``/-/healthz`` answers
503 while uvicorn finishes the requests in flight (bounded by ``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

from shoal.runtime import worker_main

_MIN_DRAIN_S = 0.5  # /-/healthz answers 503 at least this long before the proxy stops


def main(spec_bytes: bytes, output: Any, lifeline: Any, listener: Any) -> None:
    spec = worker_main.bootstrap(spec_bytes, output)
    logging.basicConfig(level=spec.get("log_level", "INFO"), format="%(levelname)s %(asctime)s %(name)s -- %(message)s")
    worker_main.run_until_complete(_serve(spec, lifeline.detach(), listener.detach()))


def _server_class() -> Any:
    """uvicorn's server without its signal handling: SIGTERM is the proxy's to handle (drain).
    (Built on first use: the supervisor imports this module, and need not import uvicorn.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


async def _serve(spec: dict[str, Any], lifeline_fd: int, listener_fd: int) -> int:
    import uvicorn

    from shoal.proxy.app import ProxyApp, ProxyOptions
    from shoal.runtime import client, transport, wire

    loop = asyncio.get_running_loop()
    worker_main.watch_lifeline(loop, lifeline_fd)
    sock = socket.socket(fileno=listener_fd)
    options = spec["http_options"]
    runtime = client.init_replica_runtime(spec["control_endpoint"], "", role="proxy")
    app = ProxyApp(
        runtime,
        ProxyOptions(
            root_path=options.get("root_path") or "",
            request_timeout_s=options.get("request_timeout_s"),
            max_request_body_bytes=options.get("max_request_body_bytes") or 100 * 1024 * 1024,
        ),
    )
    config = uvicorn.Config(
        app,
        http="httptools",
        ws="websockets-sansio",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=int(options.get("keep_alive_timeout_s") or 90),
        timeout_graceful_shutdown=int(options.get("graceful_shutdown_timeout_s") or 20),
        server_header=False,
    )
    server = _server_class()(config)

    grace_s = float(options.get("graceful_shutdown_timeout_s") or 20)
    drain: list[asyncio.Task[None]] = []

    async def drain_then_exit(min_s: float) -> None:
        await app.drain(min_s=min_s, timeout_s=grace_s)
        server.should_exit = True

    def on_signal(min_s: float) -> None:
        if not drain:  # a second signal changes nothing; the supervisor escalates to SIGKILL
            drain.append(loop.create_task(drain_then_exit(min_s)))

    # SIGTERM: announce the drain on /-/healthz first; SIGINT (from the supervisor only; the
    # proxy is not in the terminal's process group): nobody routes here any more, just finish.
    loop.add_signal_handler(signal.SIGTERM, on_signal, _MIN_DRAIN_S)
    loop.add_signal_handler(signal.SIGINT, on_signal, 0.0)
    await runtime.call("proxy_ready", {"pid": os.getpid(), "protocol": wire.PROTOCOL_VERSION})
    try:
        await server.serve(sockets=[sock])
    finally:
        await client.shutdown_runtime()
        transport.terminate_context()
    return 0

"""ProxyApp: the proxy's ASGI callable, sending HTTP and WebSocket requests to ingress replicas.

Per request: match the route (longest prefix) and send it to an ingress replica through the
deployment's router (power of two choices, FIFO queue, ``max_queued_requests``). An HTTP request
is an ``HttpExchange`` (see ``exchange``: request ids, timeouts, streamed bodies, statuses); a
WebSocket's messages are relayed both ways. ``/-/healthz`` and ``/-/routes`` are answered here,
without touching a replica.

``drain`` (SIGTERM): ``/-/healthz`` answers 503, the requests in flight get until the deadline to
finish, and those still running then are answered 503 (or cut, if their response had started).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from shoal.proxy.exchange import (
    HttpExchange,
    ProxyOptions,
    Receive,
    Scope,
    Send,
    send_all,
    submit,
    text_response,
    with_request_id,
)
from shoal.proxy.routes import Route, RoutingTable
from shoal.runtime.api import CallRouter, RoutingRuntime
from shoal.runtime.errors import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal.runtime.reply import END
from shoal.runtime.router import Call

logger = logging.getLogger("shoal.proxy")

__all__ = ["ProxyApp", "ProxyOptions"]

_ABORT_WAIT_S = 1.0  # after the drain deadline, how long the 503s get to go out


class ProxyApp:
    def __init__(self, runtime: RoutingRuntime, options: ProxyOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.table = RoutingTable()
        self.draining = False
        self.exchanges: set[HttpExchange] = set()  # HTTP requests being answered
        self._idle: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # WebSocket forwarders

    def _routes(self) -> RoutingTable:
        snapshot = self.runtime.snapshot
        if snapshot.version != self.table.version:
            self.table = RoutingTable(snapshot.version, snapshot.routes)
        return self.table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        path = scope["path"]
        root = self.options.root_path
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if kind == "http" and path in ("/-/healthz", "/-/routes"):
            await self._system(path, send)
            return
        route = self._routes().match(path)
        if route is None:
            if kind == "http":
                await send_all(send, text_response(404, f"Path '{path}' not found. Ping http://.../-/routes for available routes."))
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind == "http":
            exchange = HttpExchange(self.runtime, self.options, route, scope, receive, send)
            self.exchanges.add(exchange)
            try:
                await exchange.run()
            finally:
                self.exchanges.discard(exchange)
                if not self.exchanges and self._idle is not None:
                    self._idle.set()
        elif kind == "websocket":
            await self._websocket(scope, receive, send, route)

    async def drain(self, min_s: float, timeout_s: float) -> None:
        """Answer ``/-/healthz`` with 503 (so load balancers stop sending) for at least
        ``min_s``, and until the requests in flight are answered or ``timeout_s`` passes; the
        ones left then are answered 503 (or cut mid-response), within ``_ABORT_WAIT_S``."""
        self.draining = True
        self._idle = asyncio.Event()
        await asyncio.sleep(min_s)
        if await self._wait_idle(max(0.0, timeout_s - min_s)):
            return
        logger.warning("%d request(s) still in flight after %.1fs of draining; answering them 503",
                       len(self.exchanges), timeout_s)
        for exchange in list(self.exchanges):
            exchange.abort()
        await self._wait_idle(_ABORT_WAIT_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        """Wait until no HTTP request is in flight; False if ``timeout_s`` passed first."""
        assert self._idle is not None
        try:
            async with asyncio.timeout(timeout_s):
                while self.exchanges:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _system(self, path: str, send: Send) -> None:
        populated = self.runtime.snapshot.version > 0
        if self.draining or not populated:
            message = "This node is being drained." if self.draining else "Route table is not populated yet."
            body = message if path == "/-/healthz" else json.dumps(message)
            await send_all(send, text_response(503, body))
        elif path == "/-/healthz":
            await send_all(send, text_response(200, "success"))
        else:
            data = json.dumps(self._routes().as_json()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

    # -- WebSockets -----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        given = next((v.decode("latin-1")[:128] for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id, headers = with_request_id(given, scope["headers"])
        first = await receive()  # websocket.connect
        router, call, replies = submit(self.runtime, self.options, route, scope, headers, request_id, first)
        forwarder: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await replies.next()
                if batch is END:
                    break
                if forwarder is None:  # the replica runs the app: client messages can follow
                    forwarder = self._spawn(_forward(receive, router, call))
                for message in batch:
                    await send(message)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            logger.warning("websocket %s refused: %s", request_id, exc)
            await send({"type": "websocket.close", "code": 1013})
        except RequestCancelledError:
            return
        finally:
            router.cancel(call)
            if forwarder is not None:
                forwarder.cancel()
                await asyncio.gather(forwarder, return_exceptions=True)


    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task referenced until it ends."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _forward(receive: Receive, router: CallRouter, call: Call) -> None:
    while True:
        message = await receive()
        router.send_receive(call, message)
        if message["type"] == "websocket.disconnect":
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

"""ProxyApp: the proxy's ASGI callable, sending HTTP and WebSocket requests to ingress replicas.

Per request: match the route (longest prefix) and send it to an ingress replica through the
deployment's router (power of two choices, FIFO queue, ``max_queued_requests``). An HTTP request
is an ``HttpExchange`` (see ``exchange``: request ids, timeouts, streamed bodies, statuses); a
WebSocket's messages are relayed both ways. ``/-/healthz`` and ``/-/routes`` are answered here,
without touching a replica.

Every request is counted in the ingress metrics (``proxy.metrics``) once it is answered, and
gets an access line (``proxy.access``) when those are on; ``/-/healthz`` and ``/-/routes`` get
none, as in Ray.

``drain`` (SIGTERM): ``/-/healthz`` answers 503, the requests in flight get until the deadline to
finish, and those still running then are answered 503 (or cut, if their response had started).
While it drains, a request on a connection accepted after the drain began is answered 503 with
``Connection: close`` and ``Retry-After: 1`` (the instance is going away: retry elsewhere); one
on a connection opened before is still served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from shoal.proxy.access import AccessWriter
from shoal.proxy.exchange import (
    CONNECTION_EXTENSION,
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
from shoal.proxy.metrics import WEBSOCKET_METHOD, IngressMetrics, is_http_error, is_websocket_error
from shoal.proxy.routes import Route, RoutingTable
from shoal.runtime.api import CallRouter, RoutingRuntime
from shoal.runtime.errors import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal.runtime.reply import END
from shoal.runtime.router import Call

logger = logging.getLogger("shoal.proxy")

T = TypeVar("T")

__all__ = ["ProxyApp", "ProxyOptions"]

_ABORT_WAIT_S = 1.0  # after the drain deadline, how long the 503s get to go out
_DRAINING = "This node is being drained."
_CLOSE_AND_RETRY = [(b"connection", b"close"), (b"retry-after", b"1")]


class ProxyApp:
    def __init__(
        self,
        runtime: RoutingRuntime,
        options: ProxyOptions,
        metrics: IngressMetrics | None = None,
        access: AccessWriter | None = None,
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.metrics = metrics or IngressMetrics(node_id=socket.gethostname(), node_ip_address="127.0.0.1")
        self.access = access  # None: access lines are off
        self.table = RoutingTable()
        self.draining = False
        self.exchanges: set[HttpExchange] = set()  # HTTP requests being answered
        self._idle: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # WebSocket forwarders
        self._drain_started_s = math.inf  # time.monotonic() when the drain began

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
        start_s = time.perf_counter()
        if kind == "http" and path in ("/-/healthz", "/-/routes"):
            status = await self._system(path, send)
            self.metrics.for_route(path, "", "").record(
                scope["method"], str(status), (time.perf_counter() - start_s) * 1000.0, status != 200)
            return
        if self.draining and kind == "http" and self._opened_while_draining(scope):
            await send_all(send, text_response(503, _DRAINING, _CLOSE_AND_RETRY))
            latency_ms = (time.perf_counter() - start_s) * 1000.0
            self.metrics.unrouted().record(scope["method"], "503", latency_ms, True)
            if self.access is not None:
                self.access.write(scope["method"], "", 503, latency_ms, _given_request_id(scope))
            return
        route = self._routes().match(path)
        if route is None:
            if kind == "http":
                await send_all(send, text_response(404, f"Path '{path}' not found. Ping http://.../-/routes for available routes."))
            else:
                await send({"type": "websocket.close", "code": 1008})
            method = scope["method"] if kind == "http" else WEBSOCKET_METHOD
            latency_ms = (time.perf_counter() - start_s) * 1000.0
            self.metrics.unrouted().record(method, "404", latency_ms, True)
            if self.access is not None:
                self.access.write(method, "", 404, latency_ms, _given_request_id(scope))
            return
        if kind == "http":
            exchange = HttpExchange(self.runtime, self.options, route, scope, receive, send)
            self.exchanges.add(exchange)
            self.metrics.ongoing += 1
            try:
                await exchange.run()
            finally:
                self.exchanges.discard(exchange)
                if not self.exchanges and self._idle is not None:
                    self._idle.set()
                self.metrics.ongoing -= 1
                status = exchange.status or 500  # none: run() raised before answering (uvicorn sends 500)
                latency_ms = (time.perf_counter() - start_s) * 1000.0
                self.metrics.for_route(route.prefix, route.app_name, route.ingress).record(
                    scope["method"], str(status), latency_ms, is_http_error(status))
                if self.access is not None:
                    self.access.write(scope["method"], route.prefix, status, latency_ms, exchange.request_id)
        elif kind == "websocket":
            self.metrics.ongoing += 1
            code, is_error, request_id = 500, True, ""  # run() raised before the WebSocket ended
            try:
                code, is_error, request_id = await self._websocket(scope, receive, send, route)
            finally:
                self.metrics.ongoing -= 1
                latency_ms = (time.perf_counter() - start_s) * 1000.0
                self.metrics.for_route(route.prefix, route.app_name, route.ingress).record(
                    WEBSOCKET_METHOD, str(code), latency_ms, is_error)
                if self.access is not None:
                    self.access.write(WEBSOCKET_METHOD, route.prefix, code, latency_ms, request_id)

    async def drain(self, min_s: float, timeout_s: float, refuse_new: bool = True) -> None:
        """Answer ``/-/healthz`` with 503 (so load balancers stop sending) for at least
        ``min_s``, and until the requests in flight are answered or ``timeout_s`` passes; the
        ones left then are answered 503 (or cut mid-response), within ``_ABORT_WAIT_S``.
        ``refuse_new``: requests on connections accepted from now on get 503 (the instance is
        stopping); without it they are served (one proxy replaced while its siblings, which
        share the listening socket, go on serving)."""
        self.draining = True
        if refuse_new:
            self._drain_started_s = time.monotonic()
        self._idle = asyncio.Event()
        await asyncio.sleep(min_s)
        if await self._wait_idle(max(0.0, timeout_s - min_s)):
            return
        logger.warning("%d request(s) still in flight after %.1fs of draining; answering them 503",
                       len(self.exchanges), timeout_s)
        for exchange in list(self.exchanges):
            exchange.abort()
        await self._wait_idle(_ABORT_WAIT_S)

    def _opened_while_draining(self, scope: Scope) -> bool:
        """True if the request came on a connection accepted after the drain began (those
        opened before keep being served: their clients had been sent here before the drain)."""
        connection = (scope.get("extensions") or {}).get(CONNECTION_EXTENSION)
        return connection is not None and connection.get("opened_s", -math.inf) >= self._drain_started_s

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

    async def _system(self, path: str, send: Send) -> int:
        """Answer ``/-/healthz`` or ``/-/routes``; returns the status."""
        populated = self.runtime.snapshot.version > 0
        if self.draining or not populated:
            message = "This node is being drained." if self.draining else "Route table is not populated yet."
            body = message if path == "/-/healthz" else json.dumps(message)
            await send_all(send, text_response(503, body))
            return 503
        if path == "/-/healthz":
            await send_all(send, text_response(200, "success"))
        else:
            data = json.dumps(self._routes().as_json()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
        return 200

    # -- WebSockets -----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, route: Route) -> tuple[int, bool, str]:
        """Relay a WebSocket; returns its status, whether it counts as an error (Ray's rules:
        see ``proxy.metrics``) and its request id."""
        request_id, headers = with_request_id(_given_request_id(scope), scope["headers"])
        first = await receive()  # websocket.connect
        router, call, replies = submit(self.runtime, self.options, route, scope, headers, request_id, first)
        forwarder: asyncio.Task[int | None] | None = None
        outcome: tuple[int, bool] | None = None
        try:
            while True:
                batch = await replies.next()
                if batch is END:
                    break
                if forwarder is None:  # the replica runs the app: client messages can follow
                    forwarder = self._spawn(_forward(receive, router, call))
                for message in batch:
                    kind = message["type"]
                    if kind == "websocket.close":
                        code = message.get("code") or 1000
                        outcome = outcome or (code, is_websocket_error(code))
                    elif kind == "websocket.http.response.start":
                        outcome = outcome or (message["status"], is_http_error(message["status"]))
                    await send(message)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            logger.warning("websocket %s refused: %s", request_id, exc)
            await send({"type": "websocket.close", "code": 1013})
            outcome = outcome or (exc.status_code if isinstance(exc, BackPressureError) else 503, True)
        except RequestCancelledError:
            outcome = outcome or (503, True)
        finally:
            router.cancel(call)
            if forwarder is not None:
                forwarder.cancel()
                await asyncio.gather(forwarder, return_exceptions=True)
        if outcome is None:  # Ray: the client's disconnect code, else 1000; an error either way
            client_code = None
            if forwarder is not None and forwarder.done() and not forwarder.cancelled() and forwarder.exception() is None:
                client_code = forwarder.result()
            outcome = (client_code or 1000, True)
        return (*outcome, request_id)


    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task referenced until it ends."""
        task: asyncio.Task[T] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _given_request_id(scope: Scope) -> str:
    """The ``x-request-id`` the client sent (at most 128 characters), else ``""``."""
    return next((v.decode("latin-1")[:128] for k, v in scope["headers"] if k == b"x-request-id"), "")


async def _forward(receive: Receive, router: CallRouter, call: Call) -> int | None:
    """Relay the client's messages; returns the code it disconnected with."""
    while True:
        message = await receive()
        router.send_receive(call, message)
        if message["type"] == "websocket.disconnect":
            code: int | None = message.get("code", 1005)
            return code


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

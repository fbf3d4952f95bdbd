"""ProxyApp: the proxy's ASGI callable, sending HTTP and WebSocket requests to ingress replicas.

Per HTTP request: match the route (longest prefix), read the body (413 before reading when
``Content-Length`` is over the cap, or as soon as the bytes read pass it), send the scope and body
to an ingress replica through the deployment's router (power of two choices, FIFO queue,
``max_queued_requests``), and relay the response messages as the replica produces them.

- ``x-request-id`` is taken from the request or generated, and echoed in the response.
- ``request_timeout_s`` (or the ``x-request-timeout-seconds`` header) gives 408 if the response
  has not started, else cuts the connection; either way the replica's work is cancelled.
- A client that disconnects cancels the replica's coroutine (and its downstream calls).
- Backpressure: 503, or the deployment's ``backpressure_config`` status and ``Retry-After``.
- ``/-/healthz`` and ``/-/routes`` are answered here, without touching a replica.

Nothing read from the client is ever unpickled: scope and body travel as msgpack and bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shoal.proxy.routes import Route, RoutingTable
from shoal.runtime import wire
from shoal.runtime.api import CallRouter, RoutingRuntime
from shoal.runtime.asgi import HTTP_METHOD
from shoal.runtime.errors import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal.runtime.handle import new_request_id
from shoal.runtime.reply import END, ReplySink
from shoal.runtime.router import Call

logger = logging.getLogger("shoal.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class ProxyOptions:
    root_path: str = ""
    request_timeout_s: float | None = None
    max_request_body_bytes: int = 100 * 1024 * 1024


_DISCONNECT_WATCH_DELAY_S = 0.05


class _ClientGone(Exception):
    """The HTTP client disconnected before the request was complete."""


def _text(status: int, body: str, extra: list[tuple[bytes, bytes]] | None = None) -> tuple[Message, Message]:
    data = body.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])},
        {"type": "http.response.body", "body": data},
    )


class ProxyApp:
    def __init__(self, runtime: RoutingRuntime, options: ProxyOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.table = RoutingTable()
        self.draining = False
        self.in_flight = 0  # HTTP requests being answered
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
                await _send_all(send, _text(404, f"Path '{path}' not found. Ping http://.../-/routes for available routes."))
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind == "http":
            self.in_flight += 1
            try:
                await self._http(scope, receive, send, route)
            finally:
                self.in_flight -= 1
                if not self.in_flight and self._idle is not None:
                    self._idle.set()
        elif kind == "websocket":
            await self._websocket(scope, receive, send, route)

    async def drain(self, min_s: float, timeout_s: float) -> None:
        """Answer ``/-/healthz`` with 503 (so load balancers stop sending) for at least
        ``min_s``, and until the requests in flight are answered or ``timeout_s`` passes."""
        self.draining = True
        self._idle = asyncio.Event()
        await asyncio.sleep(min_s)
        try:
            async with asyncio.timeout(max(0.0, timeout_s - min_s)):
                while self.in_flight:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            logger.warning("%d request(s) still in flight after %.1fs of draining", self.in_flight, timeout_s)

    async def _system(self, path: str, send: Send) -> None:
        populated = self.runtime.snapshot.version > 0
        if self.draining or not populated:
            message = "This node is being drained." if self.draining else "Route table is not populated yet."
            body = message if path == "/-/healthz" else json.dumps(message)
            await _send_all(send, _text(503, body))
        elif path == "/-/healthz":
            await _send_all(send, _text(200, "success"))
        else:
            data = json.dumps(self._routes().as_json()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

    # -- HTTP -----------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        headers = scope["headers"]
        request_id = ""
        timeout_s = self.options.request_timeout_s
        content_length = -1
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif name == b"x-request-timeout-seconds":
                timeout_s = _parse_timeout(value, timeout_s)
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
        request_id, headers = _with_request_id(request_id, headers)
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        cap = self.options.max_request_body_bytes
        too_large = _text(413, f"Request body is larger than the limit of {cap} bytes.",
                          [id_header, (b"connection", b"close")])
        if content_length > cap:  # refused before a byte of the body is read
            await _send_all(send, too_large)
            return
        try:
            body = await _read_body(receive, cap)
        except _ClientGone:
            return
        if body is None:
            await _send_all(send, too_large)
            return
        first = {"type": "http.request", "body": body, "more_body": False}
        router, call, replies = self._submit(scope, headers, route, request_id, first)
        # Most responses come back before a watcher for client disconnects would be worth a task.
        watch = _DisconnectWatch(receive, router, call)
        started = False
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    batch = await replies.next()
                    if batch is END:
                        break
                    for message in batch:
                        if message["type"] == "http.response.start":
                            message["headers"].append(id_header)
                            started = True
                        await send(message)
        except TimeoutError:
            router.cancel(call)
            if started:
                raise RuntimeError(f"request {request_id} timed out after {timeout_s}s mid-response") from None
            await _send_all(send, _text(408, f"Request {request_id} timed out after {timeout_s}s.", [id_header]))
        except BackPressureError as exc:
            extra = [id_header]
            if exc.retry_after_header:
                extra.append((b"retry-after", exc.retry_after_header.encode()))
            await _send_all(send, _text(exc.status_code, exc.message, extra))
        except DeploymentUnavailableError as exc:
            await _send_all(send, _text(503, exc.message, [id_header]))
        except RequestCancelledError:
            return  # the client went away; there is nobody to answer
        except Exception:
            logger.exception("request %s to application '%s' failed", request_id, route.app_name)
            if started:
                raise
            await _send_all(send, _text(500, "Internal Server Error", [id_header]))
        finally:
            watcher = watch.stop()
            if watcher is not None:
                await asyncio.gather(watcher, return_exceptions=True)

    def _submit(
        self, scope: Scope, headers: list[Any], route: Route, request_id: str, first: Message
    ) -> tuple[CallRouter, Call, ReplySink]:
        """Send the request (scope and first receive message, msgpack only) to the ingress."""
        payload = wire.pack([_wire_scope(scope, headers, self.options.root_path, route.prefix), first])
        replies = ReplySink()
        header = wire.request_header(
            HTTP_METHOD, request_id, wire.Encoding.MSGPACK, stream=True, route=route.prefix, http=True
        )
        call = Call(header, payload, replies)
        router = self.runtime.router(route.app_name, route.ingress)
        router.submit(call)
        return router, call, replies

    # -- WebSockets -----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        given = next((v.decode("latin-1")[:128] for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id, headers = _with_request_id(given, scope["headers"])
        first = await receive()  # websocket.connect
        router, call, replies = self._submit(scope, headers, route, request_id, first)
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


class _DisconnectWatch:
    """Cancels ``call`` when the client disconnects. The task that listens for it starts only
    if the response takes longer than ``_DISCONNECT_WATCH_DELAY_S``."""

    def __init__(self, receive: Receive, router: CallRouter, call: Call) -> None:
        self._receive = receive
        self._router = router
        self._call = call
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(_DISCONNECT_WATCH_DELAY_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._router.cancel(self._call)
                return

    def stop(self) -> asyncio.Task[None] | None:
        """Stop watching; returns the listening task (cancelled) to await, if it started."""
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        return self._task


async def _read_body(receive: Receive, cap: int) -> bytes | None:
    """The whole request body; None once it passes ``cap`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _wire_scope(scope: Scope, headers: list[Any], root_path: str, prefix: str) -> Scope:
    """The scope as plain msgpack values; ``root_path`` set so mounted apps route on the rest."""
    client = scope.get("client")
    server = scope.get("server")
    path = scope["path"]
    raw_path = scope.get("raw_path") or path.encode()
    if prefix != "/" and path == prefix:
        # `/app` reaches the app's "/" route (else Starlette would redirect to `/app/`).
        path, raw_path = path + "/", raw_path + b"/"
    out = {
        "type": scope["type"],
        "asgi": {"version": "3.0", "spec_version": scope.get("asgi", {}).get("spec_version", "2.3")},
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope.get("scheme", "http"),
        "path": path,
        "raw_path": raw_path,
        "query_string": scope.get("query_string", b""),
        "root_path": root_path + (prefix if prefix != "/" else ""),
        "headers": [[bytes(k), bytes(v)] for k, v in headers],
        "client": list(client) if client else None,
        "server": list(server) if server else None,
    }
    if scope["type"] == "http":
        out["method"] = scope["method"]
    else:
        out["subprotocols"] = list(scope.get("subprotocols", []))
    return out


def _with_request_id(given: str, headers: list[Any]) -> tuple[str, list[Any]]:
    """The request's id: the client's ``x-request-id``, or a new one added to its headers."""
    if given:
        return given, headers
    request_id = new_request_id()
    return request_id, [*headers, (b"x-request-id", request_id.encode())]


def _parse_timeout(value: bytes, default: float | None) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return default
    return seconds if seconds > 0 else None


async def _send_all(send: Send, messages: tuple[Message, ...]) -> None:
    for message in messages:
        await send(message)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

"""HttpExchange: one HTTP request through the proxy, from its head to the last response message.

- ``x-request-id`` is taken from the request or generated, and echoed in the response.
- ``request_timeout_s`` gives 408 if the response has not started, else cuts the connection;
  either way the replica's work is cancelled. ``x-request-timeout-seconds`` may only shorten it;
  a value that is not a positive finite number gets 400 naming the header.
- The body streams: the first receive message travels with the request; each later chunk is
  read from the client only when the replica asks for one (PULL), so the proxy holds at most a
  chunk or two of any body whatever the client sends. The response streams back under the
  replica's window (``wire.RESPONSE_WINDOW`` batches), acknowledged as the client takes them. Over ``max_request_body_bytes``: 413
  (before a byte is read when ``Content-Length`` says so).
- A client that disconnects cancels the replica's coroutine (and its downstream calls).
- Every request gets a status unless its client left: backpressure gives 503 (or the
  deployment's ``backpressure_config`` status and ``Retry-After``); an unavailable deployment 503;
  a replica that died with the request 500 saying so; a request the replica gave up, or that
  the proxy gives up at the end of its drain (``abort``), 503. The bodies name no internals.

Nothing read from the client is ever unpickled: scope and body travel as msgpack and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal.proxy.metrics import CLIENT_CLOSED_STATUS
from shoal.proxy.routes import Route
from shoal.runtime import wire
from shoal.runtime.api import CallRouter, RoutingRuntime
from shoal.runtime.asgi import HTTP_METHOD
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from shoal.runtime.handle import new_request_id
from shoal.runtime.reply import END, PULL, ReplySink
from shoal.runtime.router import Call, Router

logger = logging.getLogger("shoal.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]

# The server's per-connection scope extension (``proxy.protocol``): ``write(scope, status, headers,
# body) -> bool`` answers with a whole response in one write (False: not done, use ``send``);
# ``watch(on_gone)`` / ``unwatch(on_gone)`` report the client leaving without a task.
CONNECTION_EXTENSION = "shoal.connection"

TIMEOUT_HEADER = "x-request-timeout-seconds"
_NO_DEADLINE = contextlib.nullcontext()  # ``asyncio.timeout(None)`` costs a few lookups per request
_WATCH_DELAY_S = 0.05  # most responses come back before a disconnect watcher is worth a task


@dataclass(frozen=True)
class ProxyOptions:
    root_path: str = ""
    request_timeout_s: float | None = None
    max_request_body_bytes: int = 100 * 1024 * 1024


class _Ended(enum.Enum):
    """Why the proxy itself cancelled a call."""

    CLIENT_GONE = "client gone"
    TOO_LARGE = "body too large"
    TIMEOUT = "timed out"
    SHUTDOWN = "proxy shut down"


def text_response(status: int, body: str, extra: list[Header] | None = None) -> tuple[Message, Message]:
    data = body.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])},
        {"type": "http.response.body", "body": data},
    )


async def send_all(send: Send, messages: tuple[Message, ...]) -> None:
    for message in messages:
        await send(message)


class HttpExchange:
    """One HTTP request: ``run()`` answers it; ``abort()`` (the proxy's drain deadline) makes
    it end with 503 if its response has not started, else cuts it."""

    def __init__(
        self, runtime: RoutingRuntime, options: ProxyOptions, route: Route, scope: Scope, receive: Receive,
        send: Send,
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.route = route
        self.scope = scope
        self.receive = receive
        self.send = send
        self.router: CallRouter | None = None
        self.call: Call | None = None
        self.started = False  # the response's status went out
        self.status = 0  # the status answered (metrics); 499 if the client left first, 0 if none yet
        self.request_id = ""  # once the head is read (the access line)
        self.ended: _Ended | None = None
        self._id_header: Header = (b"x-request-id", b"")
        extensions = scope.get("extensions")
        self.connection: dict[str, Any] | None = extensions.get(CONNECTION_EXTENSION) if extensions else None

    def end(self, why: _Ended) -> None:
        """Cancel the call (first reason wins); ``run`` answers according to ``why``."""
        if self.ended is None:
            self.ended = why
            if self.router is not None and self.call is not None:
                self.router.cancel(self.call)

    def abort(self) -> None:
        self.end(_Ended.SHUTDOWN)

    async def _answer(self, status: int, body: str, extra: list[Header] | None = None) -> None:
        self.status = status
        await send_all(self.send, text_response(status, body, [self._id_header, *(extra or [])]))

    async def run(self) -> None:
        request_id, headers, timeout_s, content_length, bad = self._read_head()
        self.request_id = request_id
        cap = self.options.max_request_body_bytes
        too_large = f"Request body is larger than the limit of {cap} bytes."
        if bad is not None:
            await self._answer(400, bad)
            return
        if content_length > cap:  # refused before a byte of the body is read
            await self._answer(413, too_large, [(b"connection", b"close")])
            return
        first = await self.receive()
        if first["type"] == "http.disconnect":
            self.status = CLIENT_CLOSED_STATUS
            return
        if self.ended is not None:  # aborted while the first chunk was on its way
            await self._cancelled(too_large)
            return
        size = len(first.get("body", b""))
        if size > cap:
            await self._answer(413, too_large, [(b"connection", b"close")])
            return
        replies = self._submit(headers, request_id, first)
        reader = _ClientReader(self, body_done=not first.get("more_body", False), size=size)
        try:
            async with _NO_DEADLINE if timeout_s is None else asyncio.timeout(timeout_s):
                await self._relay(replies, reader)
        except TimeoutError:
            self.end(_Ended.TIMEOUT)
            if self.started:
                raise RuntimeError(f"request {request_id} timed out after {timeout_s}s mid-response") from None
            await self._answer(408, f"Request {request_id} timed out after {timeout_s}s.")
        except RequestCancelledError:
            await self._cancelled(too_large)
        except BackPressureError as exc:
            extra = [(b"retry-after", exc.retry_after_header.encode())] if exc.retry_after_header else []
            await self._answer(exc.status_code, exc.message, extra)
        except DeploymentUnavailableError as exc:
            # Ray's words, without the failure's details (they may hold a traceback).
            await self._answer(503, f"{exc.deployment_id} is unavailable {exc.reason.split(':', 1)[0]}.")
        except ReplicaUnavailableError:
            logger.warning("request %s to application '%s': its replica died", request_id, self.route.app_name)
            self._cut_if_started()
            await self._answer(500, "Internal Server Error: the replica handling this request died before "
                                    "the request finished; it was not retried.")
        except Exception:
            logger.exception("request %s to application '%s' failed", request_id, self.route.app_name)
            self._cut_if_started()
            await self._answer(500, "Internal Server Error")
        finally:
            await reader.stop()

    def _cut_if_started(self) -> None:
        if self.started:
            raise RuntimeError("the response had started: the connection is cut")

    async def _cancelled(self, too_large: str) -> None:
        """The call ended as cancelled: answer unless the client left."""
        why = self.ended
        if why is _Ended.CLIENT_GONE:
            self.status = self.status or CLIENT_CLOSED_STATUS
            return
        self._cut_if_started()
        if why is _Ended.TOO_LARGE:
            await self._answer(413, too_large, [(b"connection", b"close")])
        elif why is _Ended.SHUTDOWN:
            await self._answer(503, "The proxy shut down before the request finished "
                                    "(graceful_shutdown_timeout_s passed).")
        else:  # the replica gave it up on its own
            await self._answer(503, "The replica handling this request stopped before the request finished.")

    def _read_head(self) -> tuple[str, list[Any], float | None, int, str | None]:
        """The request id (and headers, with it added if it was not given), the request's
        timeout, its ``Content-Length`` (-1 if absent), and why it is a bad request (or None)."""
        headers = self.scope["headers"]
        request_id = ""
        timeout_s = self.options.request_timeout_s
        content_length = -1
        bad = None
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif name == b"x-request-timeout-seconds":
                try:
                    timeout_s = clamp_timeout(value, self.options.request_timeout_s)
                except ValueError as exc:
                    bad = str(exc)
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
        request_id, headers = with_request_id(request_id, headers)
        self._id_header = (b"x-request-id", request_id.encode("latin-1"))
        return request_id, headers, timeout_s, content_length, bad

    def _submit(self, headers: list[Any], request_id: str, first: Message) -> ReplySink:
        self.router, self.call, replies = submit(self.runtime, self.options, self.route, self.scope, headers,
                                                 request_id, first)
        return replies

    async def _relay(self, replies: ReplySink, reader: _ClientReader) -> None:
        """Send the replica's response messages to the client as they come, acknowledging
        them as the client takes them (the replica sends no more than ``RESPONSE_WINDOW``
        ahead, so a slow reader holds the app back, not the proxy's memory)."""
        assert self.call is not None
        taken = 0
        while True:
            batch = await replies.next()
            if batch is END:
                return
            if batch is PULL:
                reader.pull()
                continue
            for message in batch:
                if message["type"] == "http.response.start":
                    message["headers"].append(self._id_header)
                    self.started = True
                    self.status = message["status"]
                    body = _whole_body(batch[1]) if len(batch) == 2 and self.connection is not None else None
                    if body is not None and self._write_whole(message["headers"], body):
                        break  # head and body went out in one write
                await self.send(message)  # waits while the client's socket is backed up
            taken += 1
            if taken >= wire.RESPONSE_WINDOW // 2:
                self.call.ack(taken)
                taken = 0

    def _write_whole(self, headers: list[Any], body: bytes) -> bool:
        assert self.connection is not None
        written: bool = self.connection["write"](self.scope, self.status, headers, body)
        return written


def _whole_body(message: Message) -> bytes | None:
    """The body of a final ``http.response.body`` message, else None."""
    if message["type"] != "http.response.body" or message.get("more_body", False):
        return None
    body: bytes = message.get("body", b"")
    return body


class _ClientReader:
    """The client's side of an exchange after its first receive message: body chunks, each
    read one ahead and forwarded when the replica asks (PULL), then the disconnect, which
    cancels the call. With the body already complete, the server's ``watch`` reports the
    disconnect where it offers one (no task per request); elsewhere a watcher task starts if the
    response takes longer than ``_WATCH_DELAY_S``."""

    def __init__(self, exchange: HttpExchange, *, body_done: bool, size: int) -> None:
        self._exchange = exchange
        self._body_done = body_done
        self._size = size
        self._pulls = 0
        self._wake: asyncio.Event | None = None  # made when the body streams (PULLs to wait for)
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching: Callable[[], None] | None = None  # registered with the server's ``watch``
        connection = exchange.connection
        if not body_done:
            self._start()
        elif connection is not None:
            self._watching = self._client_gone
            connection["watch"](self._watching)
        else:
            self._timer = asyncio.get_running_loop().call_later(_WATCH_DELAY_S, self._start)

    def pull(self) -> None:
        self._pulls += 1
        if self._wake is not None:
            self._wake.set()

    def _client_gone(self) -> None:
        self._exchange.end(_Ended.CLIENT_GONE)

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        ex = self._exchange
        cap = ex.options.max_request_body_bytes
        while not self._body_done:
            message = await ex.receive()
            if message["type"] == "http.disconnect":
                ex.end(_Ended.CLIENT_GONE)
                return
            self._size += len(message.get("body", b""))
            if self._size > cap:
                ex.end(_Ended.TOO_LARGE)
                return
            while not self._pulls:
                assert self._wake is not None
                self._wake.clear()
                await self._wake.wait()
            self._pulls -= 1
            self._body_done = not message.get("more_body", False)
            assert ex.router is not None and ex.call is not None
            if not ex.router.send_receive(ex.call, message):
                return  # the call ended
        while True:
            message = await ex.receive()
            if message["type"] == "http.disconnect":
                ex.end(_Ended.CLIENT_GONE)
                return

    async def stop(self) -> None:
        """Stop reading; wait for the reading task to end."""
        if self._watching is not None:
            assert self._exchange.connection is not None
            self._exchange.connection["unwatch"](self._watching)
            self._watching = None
        if self._timer is not None:
            self._timer.cancel()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def submit(
    runtime: RoutingRuntime, options: ProxyOptions, route: Route, scope: Scope, headers: list[Any], request_id: str,
    first: Message,
) -> tuple[CallRouter, Call, ReplySink]:
    """Send a request (its scope and first receive message, msgpack only) to the route's ingress."""
    payload = wire.pack([wire_scope(scope, headers, options.root_path, route.prefix), first])
    replies = ReplySink()
    header = wire.request_header(
        HTTP_METHOD, request_id, wire.Encoding.MSGPACK, stream=True, mx=multiplexed_model_id(headers),
        route=route.prefix, http=True,
    )
    call = Call(header, payload, replies)
    router = runtime.router(route.app_name, route.ingress)
    if isinstance(router, Router):  # the proxy's handle to the ingress is its router (router_metrics)
        router.metrics.count_handle_request(route.prefix)
    router.submit(call)
    return router, call, replies


_MULTIPLEXED_MODEL_ID_HEADER = b"serve_multiplexed_model_id"


def multiplexed_model_id(headers: list[Any]) -> str:
    """The ``serve_multiplexed_model_id`` header's value ("" if absent); the name is matched
    case-insensitively with ``-`` and ``_`` interchangeable, as Ray's proxy does."""
    size = len(_MULTIPLEXED_MODEL_ID_HEADER)
    for name, value in headers:
        if len(name) == size and bytes(name).lower().replace(b"-", b"_") == _MULTIPLEXED_MODEL_ID_HEADER:
            return bytes(value).decode("latin-1")
    return ""


def clamp_timeout(value: bytes, server_s: float | None) -> float | None:
    """The request's timeout given ``x-request-timeout-seconds: value``: the shorter of it and
    the server's; ValueError naming the header unless it is a positive finite number."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        shown = value[:32].decode("latin-1")
        raise ValueError(
            f"Invalid {TIMEOUT_HEADER} header {shown!r}: expected a positive, finite number of seconds."
        )
    return seconds if server_s is None else min(seconds, server_s)


def with_request_id(given: str, headers: list[Any]) -> tuple[str, list[Any]]:
    """The request's id: the client's ``x-request-id``, or a new one added to its headers."""
    if given:
        return given, headers
    request_id = new_request_id()
    return request_id, [*headers, (b"x-request-id", request_id.encode())]


def wire_scope(scope: Scope, headers: list[Any], root_path: str, prefix: str) -> Scope:
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
        "headers": headers,  # (name, value) pairs of bytes: msgpack arrays of bin, as they are
        "client": list(client) if client else None,
        "server": list(server) if server else None,
    }
    if scope["type"] == "http":
        out["method"] = scope["method"]
    else:
        out["subprotocols"] = list(scope.get("subprotocols", []))
    return out

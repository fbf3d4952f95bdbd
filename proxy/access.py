"""The proxy's access lines: one per HTTP request and per WebSocket session, as Ray's proxy writes
them (``METHOD route status latency_ms``, e.g. ``GET /api 200 3.1ms``; ``WS`` for a WebSocket),
with the request id, ``route`` and Ray's ``component_name``/``component_id`` on the record.

``AccessLogMiddleware`` wraps the proxy's ASGI app (it is installed only when access lines are
on, so they cost nothing when off). It watches the response start going out for the status
and the ``x-request-id`` the proxy put on it, and writes the line when the app returns:

- ``route`` is the matched application's route prefix (``""`` when no route matched, as Ray
  logs a 404); ``/-/healthz`` and ``/-/routes`` get no line (nor do they in Ray);
- status: the response's status code; ``499`` when the client left before a response started
  (Ray's code for a disconnect); ``500`` when the proxy failed before one started. A WebSocket
  session logs the close code (the app's ``websocket.close``, else the client's disconnect),
  or the status of an HTTP response that refused the handshake;
- latency: from the call into the app until it returned, in milliseconds.

``AccessLine.write`` makes the ``LogRecord`` (``access_record``) and hands it to the handlers that
``install_proxy_logging`` returned (the proxy log file's: no logger lookup, no stderr).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.proxy.app import ProxyApp
from shoal.proxy.exchange import Message, Receive, Scope, Send
from shoal.runtime import logs
from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.logs import access_record

_SYSTEM_PATHS = ("/-/healthz", "/-/routes")
_CLIENT_GONE = 499
_LOGGER = "ray.serve"  # the logger name access records carry (runtime/logs.access_record)
_FILENAME = os.path.basename(logs.__file__)  # the file name access records carry
_JSON = json.JSONEncoder(default=str)  # as runtime/logs.JSONFormatter encodes


class AccessLine:
    """Writes access lines (``runtime/logs.access_record``) straight to ``handlers``."""

    __slots__ = ("_handlers",)

    def __init__(self, handlers: Sequence[logging.Handler]) -> None:
        self._handlers = tuple(handlers)

    def write(self, method: str, route: str, status: int | str, latency_ms: float, request_id: str) -> None:
        record = access_record(method, route, status, latency_ms, request_id or "-")
        record.route = route
        for handler in self._handlers:
            handler.handle(record)


class FastAccessLine:
    """``AccessLine`` for the common case, one buffered file and no
    ``additional_log_standard_attrs`` (``access_line`` picks it): the line's text is made here,
    the same as the ``logging`` formatter makes it (TEXT or JSON; a unit test compares them),
    without a ``LogRecord``, filters or the formatter's calls, about a third of the cost."""

    __slots__ = ("_file", "_host", "_json", "_pid")

    def __init__(self, file: LoopBufferedHandler, *, encoding: str, host: str) -> None:
        self._file = file
        self._json = encoding.upper() == "JSON"
        self._host = host
        self._pid = os.getpid()

    def write(self, method: str, route: str, status: int | str, latency_ms: float, request_id: str) -> None:
        message = f"{method} {route} {status} {latency_ms:.1f}ms"
        if self._json:
            fields: dict[str, object] = {
                "asctime": logs.asctime_now(), "levelname": "INFO", "message": message, "filename": _FILENAME,
                "lineno": 0, "process": self._pid, "component_name": "proxy", "component_id": self._host,
                "route": route,
            }
            if request_id and request_id != "-":
                fields["request_id"] = request_id
            text = _JSON.encode(fields)
        else:
            text = f"INFO {logs.asctime_now()} {_LOGGER} {request_id or '-'} -- {message}"
        self._file.write_line(text)


def access_line(handlers: Sequence[logging.Handler], logging_config: Mapping[str, Any], host: str) -> AccessLine | FastAccessLine:
    """The writer of the proxy's access lines to ``handlers`` (``install_proxy_logging``'s)."""
    if (
        len(handlers) == 1
        and type(handlers[0]) is LoopBufferedHandler
        and not logging_config.get("additional_log_standard_attrs")
    ):
        return FastAccessLine(handlers[0], encoding=str(logging_config.get("encoding", "TEXT")), host=host)
    return AccessLine(handlers)


class _Watch:
    """Passes an ASGI exchange's messages through, noting what the access line needs."""

    __slots__ = ("_receive", "_send", "headers", "status")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.status: int | str = 0
        self.headers: Any = ()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if not self.status:
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                self.status = message["status"]
                self.headers = message.get("headers") or ()
            elif kind == "websocket.close":
                self.status = message.get("code", 1000)
        await self._send(message)

    async def receive(self) -> Message:
        message = await self._receive()
        if not self.status and message["type"] == "websocket.disconnect":
            self.status = message.get("code", 1005)
        return message


def request_id(response_headers: Any, request_headers: Any) -> str:
    """The ``x-request-id`` the proxy answered with, else the one the client sent, else ``""``."""
    for headers in (response_headers, request_headers):
        for name, value in headers:
            if name == b"x-request-id":
                return bytes(value).decode("latin-1")
    return ""


class AccessLogMiddleware:
    """The ASGI app the proxy serves when access lines are on: ``app`` with an access line per
    HTTP request and WebSocket session (module docstring)."""

    def __init__(self, app: ProxyApp, line: AccessLine | FastAccessLine) -> None:
        self.app = app
        self.line = line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = self.app.options.root_path
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in _SYSTEM_PATHS:
            await self.app(scope, receive, send)
            return
        watch = _Watch(receive, send)
        started_s = time.perf_counter()
        failed = False
        try:
            await self.app(scope, watch.receive if kind == "websocket" else receive, watch.send)
        except Exception:
            failed = True
            raise
        finally:
            latency_ms = (time.perf_counter() - started_s) * 1000
            status = watch.status or (500 if failed else _CLIENT_GONE)
            route = self.app.table.match(path)
            method = str(scope.get("method") or "WS") if kind == "http" else "WS"
            self.line.write(
                method, route.prefix if route is not None else "", status, latency_ms,
                request_id(watch.headers, scope["headers"]),
            )

"""The proxy's access lines: one per HTTP request and per WebSocket session, as Ray's proxy writes
them (``METHOD route status latency_ms``, e.g. ``GET /api 200 3.1ms``; ``WS`` for a WebSocket),
with the request id, ``route`` and Ray's ``component_name``/``component_id`` on the record.

``ProxyApp`` writes the line where it counts the request in its metrics (only when access
lines are on, so they cost nothing when off), with the same facts:

- ``route`` is the matched application's route prefix (``""`` when no route matched, as Ray
  logs a 404); ``/-/healthz`` and ``/-/routes`` get no line (nor do they in Ray);
- status: the status answered; ``499`` when the client left before a response started (Ray's
  code for a disconnect); ``500`` when the proxy failed before one started. A WebSocket session
  logs its close code (the app's, else the client's), or the status of an HTTP response that
  refused the handshake;
- latency: from the request's arrival in the app until it was answered, in milliseconds.

``AccessLine.write`` makes the ``LogRecord`` (``access_record``) and hands it to the handlers that
``install_proxy_logging`` returned (the proxy log file's: no logger lookup, no stderr).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from shoal.runtime import logs
from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.logs import access_record

_LOGGER = "ray.serve"  # the logger name access records carry (runtime/logs.access_record)
_FILENAME = os.path.basename(logs.__file__)  # the file name access records carry
_JSON = json.JSONEncoder(default=str)  # as runtime/logs.JSONFormatter encodes


class AccessWriter(Protocol):
    def write(self, method: str, route: str, status: int | str, latency_ms: float, request_id: str) -> None: ...


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

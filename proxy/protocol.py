"""LimitedHttpProtocol: uvicorn's httptools protocol with bounds on what one client may hold.

httptools enforces no limit on a request head, and uvicorn closes no connection that never
sends a request. This protocol adds, per connection:

- a request head (request line and headers) over ``max_header_bytes``, or with more than
  ``max_header_count`` headers, gets 431 and the connection is closed. Head bytes are counted as
  they arrive, before the parser sees them, so no head is ever buffered past the limit (plus
  the one read that crossed it);
- a request head must arrive whole within ``request_header_timeout_s`` of the connection
  opening (first request) or of its first byte (later requests); a connection that trickles
  its head, or opens and sends nothing, gets 408 and is closed;
- a request whose version is not HTTP/1.0 or HTTP/1.1 (httptools also parses an HTTP/0.9 request
  line and any ``HTTP/d.d``) gets 400 and the connection is closed;
- a request the parser refuses after its head was accepted (a malformed chunk, garbage pipelined
  behind it) never reaches a replica: the 400 that uvicorn sends also marks the request's
  client as gone, so the app sees ``http.disconnect`` instead of the part of the body that came
  before the error (and a request already sent on is cancelled).

Each refusal is reported to ``limits.on_refused`` (status, and the method if the request line
was read, else ""): the proxy counts them in its metrics.

Idle keep-alive connections are closed by uvicorn (``timeout_keep_alive``) and requests over
uvicorn's ``limit_concurrency`` open connections get 503; ``proxy.main`` sets both.

Each request's scope offers the ``shoal.connection`` extension (``CONNECTION_EXTENSION``), one
dict per connection, so that the proxy's hot path builds no objects per request for it:

- ``write(scope, status, headers, body) -> bool`` writes a whole response (status line, headers
  and body) in one write, where uvicorn's ``send`` writes the head and the body apart: one
  ``send(2)`` and one TCP segment instead of two (``write_whole_response``). False, with nothing
  written, where it does not apply (then ``send`` answers);
- ``watch(on_gone)`` / ``unwatch(on_gone)``: ``on_gone()`` is called when the connection is lost
  (or refused by a parse error), or soon (``call_soon``) if it was already lost when ``watch``
  was called, so that a request whose body has been read can learn that its
  client left without a task waiting on ``receive``;
- ``opened_s``: when the connection was accepted (``time.monotonic()``), so that a draining
  proxy can tell connections opened before its drain from those opened during it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from shoal.proxy.exchange import CONNECTION_EXTENSION

_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class HeadLimits:
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    request_header_timeout_s: float = 10.0
    on_refused: Callable[[int, str], None] | None = None  # (status, method or "") of each refusal (metrics)


def _refusal(status: bytes, reason: str) -> bytes:
    body = reason.encode()
    return b"".join((
        b"HTTP/1.1 ", status, b"\r\ncontent-type: text/plain; charset=utf-8\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body,
    ))


_TOO_LARGE = _refusal(b"431 Request Header Fields Too Large", "Request header fields too large.")
_TOO_MANY = _refusal(b"431 Request Header Fields Too Large", "Too many request header fields.")
_TOO_SLOW = _refusal(b"408 Request Timeout", "The request head was not received in time.")
_BAD_VERSION = _refusal(b"400 Bad Request", "Unsupported HTTP version.")
_STATUS_OF = {_TOO_LARGE: 431, _TOO_MANY: 431, _TOO_SLOW: 408, _BAD_VERSION: 400}
_VERSIONS = ("1.0", "1.1")


class LimitedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with ``limits`` (a subclass per setting: ``with_limits``)."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    @classmethod
    def with_limits(cls, limits: HeadLimits) -> type[LimitedHttpProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True  # between requests or inside a head: head bytes are counted
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes seen, so a head end split across reads is found
        self._header_count = 0
        # The head's deadline (loop time; None: no head is being waited for) and the one timer
        # that checks it: a new head only moves the deadline, the timer re-arms itself when it
        # fires early, so a keep-alive connection arms no timer per request.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._line_seen = False  # the request line was parsed: the parser knows the method
        self._on_gone: list[Callable[[], None]] = []  # ``watch``: told when the connection is lost
        self._gone = False  # lost or refused: a later ``watch`` is told at once
        self._extensions: dict[str, dict[object, object]] = {
            CONNECTION_EXTENSION: {
                "write": self._write_whole, "watch": self._watch, "unwatch": self._unwatch,
                "opened_s": time.monotonic(),
            },
        }

    # -- connection -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)
        self._client_gone()

    def _watch(self, on_gone: Callable[[], None]) -> None:
        if self._gone:  # the client left before the request got this far
            self.loop.call_soon(on_gone)
        else:
            self._on_gone.append(on_gone)

    def _client_gone(self) -> None:
        self._gone = True
        on_gone, self._on_gone[:] = list(self._on_gone), []
        for callback in on_gone:
            callback()

    def _unwatch(self, on_gone: Callable[[], None]) -> None:
        if on_gone in self._on_gone:
            self._on_gone.remove(on_gone)

    def _write_whole(self, scope: Any, status: int, headers: Sequence[Sequence[bytes]], body: bytes) -> bool:
        cycle = self.cycle
        if cycle is None or cycle.scope is not scope:  # pipelined: another request is the latest
            return False
        return write_whole_response(cycle, status, headers, body)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_open:
            if self._head_deadline is None:
                self._arm_head_timer()
            seen = self._head_tail + data
            end = seen.find(_HEAD_END)
            self._head_bytes += len(data) if end < 0 else max(0, end + len(_HEAD_END) - len(self._head_tail))
            self._head_tail = seen[-(len(_HEAD_END) - 1):]
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(_TOO_LARGE)
                return
        super().data_received(data)

    # -- parser callbacks -----------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._line_seen = True
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            if not self._refused:
                self._refuse(_TOO_MANY)
            return  # nothing more is kept; the rest of what was read is discarded
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self.parser.get_http_version() not in _VERSIONS:
            self._refuse(_BAD_VERSION)
            return
        self._head_open = False
        self._disarm_head_timer()
        self.scope["extensions"] = self._extensions
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._head_open = True  # the next request's head starts with the next byte
        self._head_bytes = 0
        self._head_tail = b""
        self._header_count = 0
        self._line_seen = False

    # -- refusals -------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error, after which the connection closes: the request
        being read, whose head may have been accepted already, is given up as if its client
        had left, so that it never reaches a replica with part of its body."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the proxy's app counts the request (its client left)
            cycle.message_event.set()
        else:
            self._count_refusal(400)
        super().send_400_response(msg)
        self._client_gone()

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` (when no response is under way on this connection) and close."""
        self._refused = True
        self._disarm_head_timer()
        if not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(response)
                self._count_refusal(_STATUS_OF[response])
            self.transport.close()

    def _count_refusal(self, status: int) -> None:
        on_refused = self.limits.on_refused
        if on_refused is not None:
            method = self.parser.get_method().decode("latin-1") if self._line_seen else ""
            on_refused(status, method)

    def _arm_head_timer(self) -> None:
        """The next head must arrive whole within ``request_header_timeout_s`` from now."""
        self._head_deadline = self.loop.time() + self.limits.request_header_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._on_head_timer)

    def _disarm_head_timer(self) -> None:
        self._head_deadline = None  # the timer, if any, finds no deadline when it fires

    def _on_head_timer(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # the deadline moved since the timer was armed
            self._head_timer = self.loop.call_at(deadline, self._on_head_timer)
            return
        self._head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a request is being answered: the next head waits its turn
            return
        self._refuse(_TOO_SLOW)


def write_whole_response(cycle: RequestResponseCycle, status: int, headers: Sequence[Sequence[bytes]], body: bytes) -> bool:
    """Answer ``cycle``'s request with a whole response in one write: what uvicorn's ``send``
    does with an ``http.response.start`` and a final ``http.response.body`` (same head, same
    checks, same connection handling), minus the second write. False, with nothing written,
    where that shortcut does not apply (then ``send`` answers): the response has started, the
    client left, writing is paused, uvicorn's access log is on (the proxy writes its own), a HEAD
    request, a status uvicorn has no line for, or headers
    that do not give exactly ``len(body)`` as the one ``Content-Length``, ask for chunks, or
    would not pass ``send``'s header checks."""
    if (cycle.response_started or cycle.disconnected or cycle.flow.write_paused or cycle.access_log
            or cycle.scope["method"] == "HEAD"):
        return False
    status_line = STATUS_LINE.get(status)
    if status_line is None:
        return False
    content = [status_line]
    for name, value in cycle.default_headers:
        content += (name, b": ", value, b"\r\n")
    keep_alive, has_close, length = cycle.keep_alive, False, -1
    names, values = [], []
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            if length != -1 or not value.isdigit():
                return False
            length = int(value)
        elif name == b"transfer-encoding":
            return False
        elif name == b"connection" and b"close" in [token.strip() for token in value.lower().split(b",")]:
            keep_alive, has_close = False, True
        names.append(name)
        values.append(value)
        content += (name, b": ", value, b"\r\n")
    if length != len(body) or HEADER_RE.search(b"".join(names)) or HEADER_VALUE_RE.search(b"".join(values)):
        return False
    if not keep_alive and not has_close:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    cycle.keep_alive = keep_alive
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.chunked_encoding = False
    cycle.expected_content_length = 0
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True

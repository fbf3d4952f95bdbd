"""write_whole_response: the same bytes and connection handling as uvicorn's ``send`` with a
start and a final body message, in one write; nothing written where the shortcut does not apply.

Driven on uvicorn's own ``RequestResponseCycle`` with a transport that records what is written
(no sockets: this is the byte layout, compared with uvicorn's)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from shoal.proxy.protocol import write_whole_response

DEFAULT_HEADERS = [(b"date", b"Wed, 02 Dec 2026 12:00:00 GMT")]


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Answered:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def _cycle(method: str = "GET", keep_alive: bool = True,
           access_log: bool = False) -> tuple[RequestResponseCycle, RecordingTransport, Answered]:
    transport = RecordingTransport()
    answered = Answered()
    scope: Any = {"type": "http", "method": method, "path": "/", "headers": []}
    cycle = RequestResponseCycle(
        scope=scope, transport=transport, flow=FlowControl(transport), logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"), access_log=access_log, default_headers=DEFAULT_HEADERS,
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=keep_alive, on_response=answered,
    )
    return cycle, transport, answered


async def _by_send(status: int, headers: list[Any], body: bytes, keep_alive: bool) -> RecordingTransport:
    cycle, transport, _ = _cycle(keep_alive=keep_alive)
    await cycle.send({"type": "http.response.start", "status": status, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": body, "more_body": False})
    return transport


TEXT = [[b"content-type", b"text/plain; charset=utf-8"], [b"content-length", b"5"]]


@pytest.mark.parametrize(("headers", "keep_alive"), [
    (TEXT, True),
    (TEXT, False),
    ([*TEXT, [b"Connection", b"close"]], True),
    ([[b"Content-Length", b"5"], [b"x-request-id", b"abc"]], True),
])
def test_a_whole_response_is_the_bytes_send_writes_in_one_write(headers: list[Any], keep_alive: bool) -> None:
    expected = asyncio.run(_by_send(404, headers, b"hello", keep_alive))
    cycle, transport, answered = _cycle(keep_alive=keep_alive)
    assert write_whole_response(cycle, 404, headers, b"hello")
    assert transport.writes == [b"".join(expected.writes)] and len(expected.writes) == 2
    assert transport.closed == expected.closed
    assert cycle.response_complete and cycle.message_event.is_set() and answered.n == 1


@pytest.mark.parametrize(("method", "headers", "body"), [
    ("HEAD", TEXT, b""),  # send writes no body for HEAD
    ("GET", [[b"content-type", b"text/plain"]], b"hello"),  # no Content-Length: send chunks it
    ("GET", [[b"content-length", b"4"]], b"hello"),  # send raises
    ("GET", [[b"content-length", b"5"], [b"content-length", b"5"]], b"hello"),
    ("GET", [[b"content-length", b"+5"]], b"hello"),
    ("GET", [[b"transfer-encoding", b"chunked"], [b"content-length", b"5"]], b"hello"),
    ("GET", [[b"content-length", b"5"], [b"x-evil", b"a\r\nset-cookie: b"]], b"hello"),  # send raises
    ("GET", [[b"content-length", b"5"], [b"bad name", b"a"]], b"hello"),  # send raises
])
def test_a_response_the_shortcut_does_not_cover_is_left_to_send(method: str, headers: list[Any], body: bytes) -> None:
    cycle, transport, answered = _cycle(method)
    assert not write_whole_response(cycle, 200, headers, body)
    assert transport.writes == [] and not cycle.response_started and answered.n == 0


def test_nothing_is_written_once_the_response_started_the_client_left_or_with_uvicorns_access_log() -> None:
    cycle, transport, _ = _cycle()
    asyncio.run(cycle.send({"type": "http.response.start", "status": 200, "headers": TEXT}))
    assert not write_whole_response(cycle, 200, TEXT, b"hello")
    assert len(transport.writes) == 1
    gone, transport, _ = _cycle()
    gone.disconnected = True
    assert not write_whole_response(gone, 200, TEXT, b"hello")
    assert transport.writes == []
    logged, transport, _ = _cycle(access_log=True)
    assert not write_whole_response(logged, 200, TEXT, b"hello")
    assert transport.writes == []

"""HTTPListener on a real loopback socket (no process): who answers a connection while proxies
come and go. A proxy is played by an object that calls ``proxy_up``/``proxy_down``."""

from __future__ import annotations

import asyncio

import pytest

from shoal.controller.listener import UNAVAILABLE_RESPONSE, HTTPListener

pytestmark = pytest.mark.timeout(10)


async def _exchange(listener: HTTPListener) -> bytes:
    """Connect, send a request, and read until the other side closes (or 1 s passes)."""
    host, port = listener.socket.getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    try:
        async with asyncio.timeout(1.0):
            return await reader.read()
    except TimeoutError:
        return b""  # nobody answered: the connection waits in the backlog
    finally:
        writer.close()


def test_the_supervisor_answers_503_only_while_no_proxy_serves() -> None:
    async def scenario() -> None:
        listener = HTTPListener.bind("127.0.0.1", 0)
        first, second = object(), object()
        try:
            assert await _exchange(listener) == b""  # starting: connections wait for the proxy
            listener.proxy_up(first)
            listener.proxy_up(second)
            listener.proxy_down(first)
            assert not listener.answering  # one proxy left: it serves
            listener.proxy_down(second)
            assert listener.answering
            response = await _exchange(listener)
            assert response == UNAVAILABLE_RESPONSE
            assert b"503 Service Unavailable" in response and b"retry-after: 1" in response
            listener.proxy_up(first)  # restarted
            assert not listener.answering
        finally:
            listener.close()

    asyncio.run(scenario())


def test_a_taken_port_is_refused_with_a_clear_message() -> None:
    listener = HTTPListener.bind("127.0.0.1", 0)
    try:
        port = listener.socket.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            HTTPListener.bind("127.0.0.1", port)
    finally:
        listener.close()

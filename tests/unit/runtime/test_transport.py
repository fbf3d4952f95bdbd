"""transport.Channel over real ``inproc://`` sockets."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import zmq
from inproc import run

from shoal.runtime import transport, wire

pytestmark = pytest.mark.timeout(60)


def _pair(name: str, on_server: object) -> tuple[transport.Channel, transport.Channel, asyncio.Queue[list[bytes]]]:
    got: asyncio.Queue[list[bytes]] = asyncio.Queue()
    server_sock = transport.make_socket(zmq.ROUTER)
    server_sock.bind(f"inproc://{name}")
    server = transport.Channel(server_sock, on_server)  # type: ignore[arg-type]
    client_sock = transport.make_socket(zmq.DEALER)
    client_sock.connect(f"inproc://{name}")
    client = transport.Channel(client_sock, got.put_nowait)
    return server, client, got


def test_every_message_arrives_in_order_even_past_a_drain_batch() -> None:
    async def main() -> None:
        received: list[list[bytes]] = []
        done = asyncio.Event()
        count = transport._DRAIN_BATCH * 3 + 7

        def on_server(frames: list[bytes]) -> None:
            received.append(frames)
            if len(received) == count:
                done.set()

        server, client, _ = _pair("order", on_server)
        for i in range(count):
            assert client.send([str(i).encode()])
        await done.wait()
        assert [int(f[1]) for f in received] == list(range(count))
        client.close()
        server.close()

    run(main)


def test_an_exception_in_the_callback_is_logged_and_the_next_message_still_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        got = asyncio.Event()

        def on_server(frames: list[bytes]) -> None:
            if frames[1] == b"bad":
                raise RuntimeError("handler bug")
            got.set()

        server, client, _ = _pair("errors", on_server)
        with caplog.at_level(logging.ERROR, logger="shoal.transport"):
            client.send([b"bad"])
            client.send([b"good"])
            await got.wait()
        assert "error while handling a message" in caplog.text
        client.close()
        server.close()

    run(main)


def test_a_router_send_to_an_unknown_peer_returns_false_and_replies_reach_the_dealer() -> None:
    async def main() -> None:
        identities: asyncio.Queue[bytes] = asyncio.Queue()
        server, client, got = _pair("router", lambda frames: identities.put_nowait(frames[0]))
        assert server.send_message(wire.Message(wire.Kind.RESULT), identity=b"nobody") is False
        client.send_message(wire.Message(wire.Kind.REQUEST, 1, 5))
        identity = await identities.get()
        assert server.send_message(wire.reply(wire.Kind.RESULT, 1, 5, q=2), identity=identity)
        assert wire.decode(await got.get()) == wire.reply(wire.Kind.RESULT, 1, 5, q=2)
        client.close()
        client.close()  # idempotent
        assert client.closed and client.send([b"x"]) is False
        server.close()

    run(main)


def test_on_disconnect_comes_after_every_message_the_peer_sent(tmp_path: Path) -> None:
    # ipc, not inproc: connection events are reported for real transports only.
    async def main() -> None:
        endpoint = f"ipc://{tmp_path}/peer.sock"
        server_sock = transport.make_socket(zmq.ROUTER)
        server_sock.bind(endpoint)
        identities: asyncio.Queue[bytes] = asyncio.Queue()
        server = transport.Channel(server_sock, lambda frames: identities.put_nowait(frames[0]))
        seen: list[bytes] = []
        gone = asyncio.Event()

        def on_disconnect() -> None:
            seen.append(b"<disconnected>")
            gone.set()

        client_sock = transport.make_socket(zmq.DEALER)
        client = transport.Channel(client_sock, lambda frames: seen.append(frames[0]), on_disconnect=on_disconnect)
        client_sock.connect(endpoint)
        client.send([b"hello"])
        identity = await identities.get()
        client.drain_now()
        assert client.connected
        for i in range(100):
            server.send([identity, str(i).encode()])
        server.close(linger_ms=2000)  # as a replica exits: its last replies go first
        await gone.wait()
        assert seen == [str(i).encode() for i in range(100)] + [b"<disconnected>"]
        assert not client.connected
        client.close()

    run(main)

"""transport.Channel.post: messages posted in one loop iteration go to each peer as one ZeroMQ
message (a BATCH), in order, and are handled one by one by the receiving channel.

Real ``inproc://`` sockets; where the test must see what went on the socket, the receiving end
is a bare ZeroMQ socket read by the test.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import zmq
from inproc import run

from shoal.runtime import transport, wire

pytestmark = pytest.mark.timeout(60)

_names = itertools.count(1)


def _raw_router() -> tuple[zmq.Socket[bytes], str]:
    endpoint = f"inproc://post-{next(_names)}"
    sock = transport.make_socket(zmq.ROUTER)
    sock.bind(endpoint)
    return sock, endpoint


def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    """The next ZeroMQ message on ``sock`` (bounded wait: a missing one fails the test)."""
    assert sock.poll(10_000), "nothing arrived"
    return sock.recv_multipart()


async def _after_the_flush() -> None:
    """Return once the callbacks scheduled so far (the channel's flush among them) have run."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)  # FIFO: after the flush the posts scheduled
    await done


def _messages(n: int, incarnation: int = 1) -> list[wire.Message]:
    return [wire.Message(wire.Kind.CANCEL, incarnation, i) for i in range(n)]


def test_the_first_message_of_an_iteration_goes_at_once_and_the_rest_as_one_batch() -> None:
    async def main() -> None:
        raw, endpoint = _raw_router()
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(endpoint)
        client = transport.Channel(sock, lambda frames: None)
        first, *rest = _messages(5)
        client.post(first)
        _identity, *frames = _recv(raw)  # sent before the iteration ends
        assert frames == wire.encode(first)  # alone: exactly what send_message sends
        for msg in rest:
            client.post(msg)
        assert not raw.poll(0)  # held until the iteration ends
        await _after_the_flush()
        _identity, *frames = _recv(raw)
        assert wire.is_batch(frames[0])
        assert [wire.decode(m) for m in wire.decode_batch(frames)] == rest
        assert not raw.poll(0)  # all four in that one message
        client.post(first)  # a new iteration: at once again
        _identity, *frames = _recv(raw)
        assert frames == wire.encode(first)
        client.close()
        raw.close()

    run(main)


def test_a_receiving_channel_handles_each_batched_message_alone_in_order_with_its_buffers() -> None:
    async def main() -> None:
        received: list[tuple[bytes, wire.Message]] = []
        done = asyncio.Event()
        count = 600  # more than one batch holds: several batches, order kept across them

        def on_server(frames: list[Any]) -> None:
            received.append((frames[0], wire.decode(frames[1:])))
            if len(received) == count:
                done.set()

        endpoint = f"inproc://post-{next(_names)}"
        server_sock = transport.make_socket(zmq.ROUTER)
        server_sock.bind(endpoint)
        server = transport.Channel(server_sock, on_server)
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(endpoint)
        client = transport.Channel(sock, lambda frames: None)
        big = bytearray(b"x" * 100_000)  # a buffer frame: sent from the bytearray itself
        sent = []
        for i in range(count):
            buffers = (big,) if i % 100 == 7 else ()
            msg = wire.Message(wire.Kind.REQUEST, 1, i, {"i": i}, (b"p",), buffers)
            sent.append(msg)
            client.post(msg)
        await done.wait()
        assert len({identity for identity, _ in received}) == 1
        got = [msg for _, msg in received]
        assert [m.call_id for m in got] == list(range(count))
        for msg, original in zip(got, sent, strict=True):
            assert (msg.meta, msg.payload) == (original.meta, original.payload)
            assert [bytes(b) for b in msg.buffers] == [bytes(b) for b in original.buffers]
        client.close()
        server.close()

    run(main)


def test_a_router_batches_per_peer_and_reports_each_message_to_a_gone_peer() -> None:
    async def main() -> None:
        endpoint = f"inproc://post-{next(_names)}"
        server_sock = transport.make_socket(zmq.ROUTER)
        server_sock.bind(endpoint)
        identities: asyncio.Queue[bytes] = asyncio.Queue()
        server = transport.Channel(server_sock, lambda frames: identities.put_nowait(frames[0]))
        lost: list[tuple[wire.Message, bytes | None]] = []
        server.on_unroutable = lambda msg, identity: lost.append((msg, identity))
        peers, ids = [], []
        for _ in range(2):  # one at a time: peers[i] is ids[i]
            sock = transport.make_socket(zmq.DEALER)
            sock.connect(endpoint)
            peers.append(sock)
            sock.send(wire.encode(wire.Message(wire.Kind.REQUEST, 1, 1))[0])
            ids.append(await identities.get())
        a, b = ids
        server.post(wire.Message(wire.Kind.RESULT, 1, 99), a)  # the first of the iteration: at once
        assert wire.decode(_recv(peers[0])).call_id == 99
        for i in range(3):
            server.post(wire.Message(wire.Kind.RESULT, 1, i), a)
            server.post(wire.Message(wire.Kind.RESULT, 1, 10 + i), b)
            server.post(wire.Message(wire.Kind.RESULT, 1, 20 + i), b"nobody")
        await _after_the_flush()
        for sock, first in zip(peers, (0, 10), strict=True):
            [frame] = _recv(sock)  # each peer: its own three, as one batch, in order
            assert [wire.decode(m).call_id for m in wire.decode_batch([frame])] == [first, first + 1, first + 2]
        assert [(m.call_id, identity) for m, identity in lost] == [(20, b"nobody"), (21, b"nobody"), (22, b"nobody")]
        for sock in peers:
            sock.close()
        server.close()

    run(main)


def test_send_and_close_send_what_was_posted_first() -> None:
    async def main() -> None:
        raw, endpoint = _raw_router()
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(endpoint)
        client = transport.Channel(sock, lambda frames: None)
        client.post(wire.Message(wire.Kind.CANCEL, 1, 1))
        client.send([b"after"])  # at once, but not before what was posted
        assert wire.decode(_recv(raw)[1:]).call_id == 1
        assert _recv(raw)[1:] == [b"after"]
        client.post(wire.Message(wire.Kind.CANCEL, 1, 2))
        client.close(linger_ms=1000)  # closing sends what is posted
        assert wire.decode(_recv(raw)[1:]).call_id == 2
        lost: list[wire.Message] = []
        client.on_unroutable = lambda msg, identity: lost.append(msg)
        client.post(wire.Message(wire.Kind.CANCEL, 1, 3))  # closed: reported, not sent
        assert [m.call_id for m in lost] == [3]
        raw.close()

    run(main)

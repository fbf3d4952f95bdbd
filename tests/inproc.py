"""Test helpers: a fake replica on a real ``inproc://`` ROUTER socket, a fake clock, a runner.

Nothing here starts a process. ``run`` terminates the process's ZeroMQ context at the end, so a
test that leaves a socket open fails (hangs into its timeout) instead of leaking it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from shoal.runtime import transport, wire

_names = itertools.count(1)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` on a new loop (bounded), then terminate the ZeroMQ context."""

    async def bounded() -> None:
        async with asyncio.timeout(30):
            await main()

    try:
        asyncio.run(bounded())
    finally:
        transport.terminate_context()


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeReplica:
    """A ROUTER socket that records the requests it gets and answers only when told."""

    def __init__(self, incarnation: int = 1) -> None:
        self.endpoint = f"inproc://fake-replica-{next(_names)}"
        self.incarnation = incarnation
        sock = transport.make_socket(zmq.ROUTER)
        sock.bind(self.endpoint)
        self.received: asyncio.Queue[tuple[bytes, wire.Message]] = asyncio.Queue()
        self.channel = transport.Channel(sock, self._on_message)

    def address(self, replica_id: str = "app#D#r1") -> wire.ReplicaAddress:
        return wire.ReplicaAddress(replica_id, self.incarnation, self.endpoint)

    def _on_message(self, frames: list[bytes]) -> None:
        self.received.put_nowait((frames[0], wire.decode(frames[1:])))

    async def next(self, kind: wire.Kind = wire.Kind.REQUEST) -> tuple[bytes, wire.Message]:
        """The next message received (of ``kind``, skipping none: anything else fails)."""
        identity, msg = await self.received.get()
        assert msg.kind is kind, f"expected {kind.name}, got {msg.kind.name}"
        return identity, msg

    def answer(self, identity: bytes, msg: wire.Message, kind: wire.Kind, *value: Any, q: int = 0) -> None:
        """Reply ``kind`` to the request ``msg`` (with ``value`` as payload if given)."""
        enc_data = wire.dumps(value[0]) if value else (None, b"")
        self.channel.send_message(wire.reply(kind, msg.incarnation, msg.call_id, *enc_data, q=q), identity)

    def close(self) -> None:
        self.channel.close()


def request_id(msg: wire.Message) -> str:
    return wire.RequestHeader.from_meta(msg.meta).request_id

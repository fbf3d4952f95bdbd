"""LoopInbox: callbacks from other threads run on the loop in order; pacing holds a poster that
runs ahead of the loop until the loop has run the waiting batch (never the loop's own thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from shoal.runtime.inbox import LoopInbox

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_poster_past_pace_at_waits_until_the_loop_ran_the_batch(loop: asyncio.AbstractEventLoop) -> None:
    inbox = LoopInbox(loop, pace_at=2)
    busy, ran = threading.Event(), []
    loop.call_soon_threadsafe(busy.wait, 10)  # the loop is held: nothing posted runs yet
    returned = threading.Event()

    def poster() -> None:
        for i in range(3):
            inbox.post(lambda i=i: ran.append(i))
        returned.set()

    thread = threading.Thread(target=poster)
    thread.start()
    assert not returned.wait(0.2)  # the third post waits for the loop
    assert ran == []
    busy.set()
    assert returned.wait(10)
    thread.join(10)
    assert ran == [0, 1, 2]


def test_the_loops_own_thread_never_waits_and_order_is_kept(loop: asyncio.AbstractEventLoop) -> None:
    inbox = LoopInbox(loop, pace_at=1)
    ran: list[int] = []
    done = threading.Event()

    def on_loop() -> None:  # posts past pace_at from the loop's thread: must not block it
        for i in range(5):
            inbox.post(lambda i=i: ran.append(i))
        inbox.post(done.set)

    inbox.post(on_loop)
    assert done.wait(10)
    assert ran == [0, 1, 2, 3, 4]

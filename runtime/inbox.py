"""LoopInbox: callbacks posted to an event loop from other threads, one wakeup per batch."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("shoal.inbox")

# How long a paced poster waits at most for the loop to run its batch (a stopped loop never
# will; pacing is a matter of speed, never of correctness).
_PACE_WAIT_S = 1.0


class LoopInbox:
    """Callbacks posted from other threads, run on ``loop`` in order, with one wakeup per batch.

    ``call_soon_threadsafe`` writes to the loop's self-pipe on every call; a fan-out of thousands
    of ``.remote()`` calls from the driver's thread would pay a syscall and a wakeup each.

    ``pace_at``: a thread that posts while ``pace_at`` callbacks already wait for the loop waits
    until the loop has run them (at most ``_PACE_WAIT_S``). Why: pyzmq releases the GIL on every
    send and receive, so while the posting thread keeps the GIL busy (a loop of ``remote()``
    calls) the loop's thread gets it back only when the interpreter forces a switch (every
    ``sys.getswitchinterval()``, 5 ms): one message per 5 ms. Waiting for the batch hands the
    loop the GIL for the whole batch. The loop's own thread never waits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pace_at: int | None = None) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[Callable[[], Any]] = []
        self._armed = False
        self._pace_at = pace_at
        self._ran: threading.Event | None = None  # set when the waiting batch has run

    def post(self, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._items.append(fn)
            if not self._armed:
                self._armed = True
                ran = None
            elif self._pace_at is None or len(self._items) <= self._pace_at:
                return
            else:
                ran = self._ran
                if ran is None:
                    ran = self._ran = threading.Event()
        if ran is None:
            self._loop.call_soon_threadsafe(self._run)
        elif asyncio._get_running_loop() is not self._loop:
            ran.wait(_PACE_WAIT_S)

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._armed = False
            ran, self._ran = self._ran, None
        for fn in items:
            try:
                fn()
            except Exception:
                logger.exception("error in a callback posted to the runtime loop")
        if ran is not None:
            ran.set()

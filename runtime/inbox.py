"""LoopInbox: callbacks posted to an event loop from other threads, one wakeup per batch."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("shoal.inbox")


class LoopInbox:
    """Callbacks posted from other threads, run on ``loop`` in order, with one wakeup per batch.

    ``call_soon_threadsafe`` writes to the loop's self-pipe on every call; a fan-out of thousands
    of ``.remote()`` calls from the driver's thread would pay a syscall and a wakeup each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[Callable[[], Any]] = []
        self._armed = False

    def post(self, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._items.append(fn)
            if self._armed:
                return
            self._armed = True
        self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._armed = False
        for fn in items:
            try:
                fn()
            except Exception:
                logger.exception("error in a callback posted to the runtime loop")

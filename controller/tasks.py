"""Tasks the controller starts: every one referenced, none failing silently.

- ``TaskSet.spawn(coro)``: a task that runs to its end (a drain, a reconfigure). The set holds
  it until it finishes; an exception it ends with is logged with its traceback.
  ``TaskSet.aclose()`` cancels what is left and awaits it.
- ``supervise(name, factory)``: a long-lived task (a polling loop). If it raises, the error is
  logged with its traceback and a new run of ``factory()`` starts after ``restart_delay_s``; it
  ends only when cancelled (or when a run returns).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger("shoal.controller")


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task '%s' failed", task.get_name(), exc_info=task.exception())

    async def join(self) -> None:
        """Wait until every task spawned so far has ended (including ones they spawn)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the tasks left and await them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def supervise(
    name: str, factory: Callable[[], Coroutine[Any, Any, None]], *, restart_delay_s: float = 1.0
) -> asyncio.Task[None]:
    """Run ``factory()`` in a task, again after each unexpected exception (logged). The caller
    keeps the task, cancels it to stop it, and awaits it."""

    async def run() -> None:
        while True:
            try:
                await factory()
                return
            except Exception:
                logger.exception("task '%s' failed; restarting it in %.1fs", name, restart_delay_s)
            await asyncio.sleep(restart_delay_s)

    return asyncio.get_running_loop().create_task(run(), name=name)

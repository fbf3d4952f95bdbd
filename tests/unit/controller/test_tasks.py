"""shoal.controller.tasks: supervised long-lived tasks and the set of short ones."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.controller.tasks import TaskSet, supervise


def test_a_supervised_task_that_raises_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> int:
        runs = 0
        second_run = asyncio.Event()

        async def loop() -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise AttributeError("'NoneType' object has no attribute 'observe'")
            second_run.set()
            await asyncio.Event().wait()  # runs until cancelled

        task = supervise("autoscaling", loop, restart_delay_s=0.0)
        async with asyncio.timeout(5):
            await second_run.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        return runs

    with caplog.at_level(logging.ERROR, logger="shoal.controller"):
        assert asyncio.run(main()) == 2
    [record] = [r for r in caplog.records if "task 'autoscaling' failed" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is AttributeError  # with its traceback


def test_a_supervised_task_that_returns_is_not_restarted() -> None:
    async def main() -> int:
        runs = 0

        async def once() -> None:
            nonlocal runs
            runs += 1

        await supervise("once", once, restart_delay_s=0.0)
        return runs

    assert asyncio.run(main()) == 1


def test_task_set_logs_failures_joins_and_cancels(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[asyncio.Task[None], asyncio.Task[None]]:
        tasks = TaskSet()

        async def fail() -> None:
            raise ValueError("drain failed")

        async def forever() -> None:
            await asyncio.Event().wait()

        tasks.spawn(fail(), name="stop r1")
        async with asyncio.timeout(5):
            await tasks.join()
        long = tasks.spawn(forever(), name="health r2")
        failed = tasks.spawn(fail(), name="stop r3")
        async with asyncio.timeout(5):
            await asyncio.gather(failed, return_exceptions=True)
        await tasks.aclose()
        return long, failed

    with caplog.at_level(logging.ERROR, logger="shoal.controller"):
        long, _ = asyncio.run(main())
    assert long.cancelled()
    messages = [r.getMessage() for r in caplog.records]
    assert "task 'stop r1' failed" in messages and "task 'stop r3' failed" in messages

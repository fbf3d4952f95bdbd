"""UserThreads: the replica's pool for sync user methods (Executor API plus a Future-less post)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import wait_until

from shoal.runtime.user_threads import UserThreads

pytestmark = pytest.mark.timeout(30)


def test_posted_calls_run_concurrently_up_to_max_workers_and_no_further() -> None:
    pool = UserThreads(3, thread_name_prefix="t")
    gate = threading.Event()
    started = threading.Semaphore(0)
    names: list[str] = []
    lock = threading.Lock()

    def held() -> None:
        with lock:
            names.append(threading.current_thread().name)
        started.release()
        gate.wait(10)

    for _ in range(5):
        pool.post(held)
    for _ in range(3):  # three run at once although none has finished
        assert started.acquire(timeout=10)
    assert not started.acquire(timeout=0.05)  # the fourth waits for a free thread
    gate.set()
    for _ in range(2):
        assert started.acquire(timeout=10)
    pool.shutdown(wait=True)
    assert len(set(names)) == 3 and all(n.startswith("t_") for n in names)


def test_an_idle_thread_is_reused_rather_than_a_new_one_started() -> None:
    pool = UserThreads(4)
    for _ in range(5):
        assert pool.submit(threading.get_ident).result(10)
        assert wait_until(lambda: pool._idle == 1, 10)  # the thread is back waiting for work
    pool.shutdown(wait=True)
    assert len(pool._threads) == 1


def test_submit_is_an_executor_for_run_in_executor_with_results_and_errors() -> None:
    pool = UserThreads(2)

    def fail() -> None:
        raise KeyError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(pool, pow, 2, 10) == 1024
        with pytest.raises(KeyError):
            await loop.run_in_executor(pool, fail)

    asyncio.run(main())
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.post(lambda: None)


def test_shutdown_with_cancel_futures_drops_the_queued_calls_and_cancels_their_futures() -> None:
    pool = UserThreads(1)
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert running.result(10) is True
    assert queued.cancelled()
    pool.shutdown(wait=True)

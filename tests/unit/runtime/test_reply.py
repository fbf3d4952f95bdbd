"""reply: the loop-local sink and its thread-safe wrapper (first outcome wins; streams end once)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shoal.runtime.reply import END, ReplySink, ThreadSafeSink

pytestmark = pytest.mark.timeout(30)


def test_reply_sink_first_outcome_wins_and_streams_end_once() -> None:
    async def main() -> None:
        unary = ReplySink()
        waiter = asyncio.get_running_loop().create_task(unary.result())
        unary.set_result(1)
        unary.set_exception(ValueError("late"))
        assert await waiter == 1 and unary.done()

        stream = ReplySink()
        reader = asyncio.get_running_loop().create_task(stream.next())
        stream.push("a")
        assert await reader == "a"
        stream.push("b")
        stream.set_exception(KeyError("boom"))
        stream.push("ignored")
        assert await stream.next() == "b"  # items before the error are delivered first
        with pytest.raises(KeyError):
            await stream.next()

        ended = ReplySink()
        ended.finish()
        assert await ended.next() is END and await ended.result() is None

    asyncio.run(main())


def test_thread_safe_sink_is_fed_on_one_loop_and_read_from_threads_and_other_loops() -> None:
    feeder = asyncio.new_event_loop()
    thread = threading.Thread(target=feeder.run_forever)
    thread.start()
    try:
        unary = ThreadSafeSink()
        with pytest.raises(TimeoutError):
            unary.result_sync(0.01)
        feeder.call_soon_threadsafe(unary.set_result, "v")
        assert unary.result_sync(10) == "v"

        stream = ThreadSafeSink()

        async def consume() -> list[object]:
            items = []
            while (item := await stream.next()) is not END:
                items.append(item)
            return items

        async def other_loop() -> list[object]:
            task = asyncio.get_running_loop().create_task(consume())
            for item in (1, 2, 3):
                feeder.call_soon_threadsafe(stream.push, item)
            feeder.call_soon_threadsafe(stream.finish)
            return await task

        assert asyncio.run(other_loop()) == [1, 2, 3]
        assert stream.next_sync(0) is END

        failed = ThreadSafeSink()
        feeder.call_soon_threadsafe(failed.set_exception, RuntimeError("x"))
        with pytest.raises(RuntimeError):
            failed.result_sync(10)
    finally:
        feeder.call_soon_threadsafe(feeder.stop)
        thread.join(10)
        feeder.close()


def test_several_tasks_may_await_one_reply_sink_and_one_being_cancelled_leaves_the_others() -> None:
    async def main() -> None:
        sink = ReplySink()
        loop = asyncio.get_running_loop()
        first, second, third = (loop.create_task(sink.result()) for _ in range(3))
        # Callbacks run in order: the three tasks start waiting, then one is cancelled, then the
        # outcome arrives.
        loop.call_soon(second.cancel)
        loop.call_soon(sink.set_result, "shared")
        assert (await first, await third) == ("shared", "shared")
        assert second.cancelled()

    asyncio.run(main())


def test_thread_safe_sink_wakes_every_blocked_thread_and_a_timed_out_one_leaves_no_trace() -> None:
    sink = ThreadSafeSink()
    with pytest.raises(TimeoutError):
        sink.result_sync(0.01)  # its sleeper is withdrawn: the next outcome wakes only live ones
    results: list[object] = []
    waiting = threading.Barrier(4)

    def read() -> None:
        waiting.wait(10)
        results.append(sink.result_sync(10))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    waiting.wait(10)
    sink.set_result("all")
    for reader in readers:
        reader.join(10)
    assert results == ["all", "all", "all"]
    assert sink.result_sync(0) == "all"

    stream = ThreadSafeSink()
    with pytest.raises(TimeoutError):
        stream.next_sync(0.01)
    stream.push(1)
    stream.push(2)
    assert (stream.next_sync(0), stream.next_sync(0)) == (1, 2)
    stream.set_exception(ValueError("after the items"))
    with pytest.raises(ValueError):
        stream.next_sync(0)

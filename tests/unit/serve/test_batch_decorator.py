"""``@serve.batch`` on one event loop, no processes: batch formation, results, errors, streaming,
cancellation, live settings, multiplexed splits and Ray's validation.

Timeouts are either 0 (a batch runs with what has arrived) or far longer than any test, so no
test depends on timing; ``settle()`` lets every ready task run to its next wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import cloudpickle
import pytest

from shoal import serve
from shoal.runtime import context
from shoal.runtime.context import ReplicaContext, ReplicaID, RequestContext
from shoal.serve.batching import get_batch_request_contexts
from shoal.serve.exceptions import RayServeException

pytestmark = pytest.mark.timeout(10)

T = TypeVar("T")
LONG_S = 3600.0  # a batch wait no test reaches


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def run_all(*coros: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
    """Run ``coros`` as concurrent callers on a new loop; their results in order."""

    async def main() -> list[Any]:
        return list(await asyncio.gather(*coros, return_exceptions=return_exceptions))

    return asyncio.run(main())


async def settle(rounds: int = 20) -> None:
    """Let every task that can run, run until it waits (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Recorder:
    """A batched method that records the batches it got and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.most_running = 0

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)
    async def handle(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.running -= 1
        return [f"r{item}" for item in items]


# -- results and batch formation ----------------------------------------------------------------


def test_callers_pass_items_and_get_their_own_result() -> None:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0)
    async def double(xs: list[int]) -> list[int]:
        assert isinstance(xs, list)
        return [x * 2 for x in xs]

    assert run_all(*(double(i) for i in range(10))) == [i * 2 for i in range(10)]


def test_bare_decorator_uses_ray_defaults() -> None:
    @serve.batch
    async def echo(xs: list[int]) -> list[int]:
        return xs

    assert echo._get_max_batch_size() == 10  # type: ignore[attr-defined]
    assert echo._get_batch_wait_timeout_s() == 0.01  # type: ignore[attr-defined]
    assert run_all(*(echo(i) for i in range(25))) == list(range(25))


def test_a_full_batch_runs_at_once_and_a_partial_one_waits() -> None:
    async def main() -> None:
        rec = Recorder()
        first = [asyncio.ensure_future(rec.handle(i)) for i in range(4)]
        await settle()
        assert rec.batches == [[0, 1, 2]]  # full: ran; item 3 waits for more
        assert [f.done() for f in first] == [True, True, True, False]
        rest = [asyncio.ensure_future(rec.handle(i)) for i in (4, 5)]
        assert await asyncio.gather(*first, *rest) == ["r0", "r1", "r2", "r3", "r4", "r5"]
        assert rec.batches == [[0, 1, 2], [3, 4, 5]]

    run(main())


def test_the_wait_timeout_runs_a_partial_batch() -> None:
    class Quick:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=100, batch_wait_timeout_s=0.0)
        async def handle(self, items: list[int]) -> list[int]:
            self.sizes.append(len(items))
            return items

    async def main() -> list[int]:
        q = Quick()
        assert await q.handle(7) == 7
        return q.sizes

    assert run(main()) == [1]


def test_arguments_are_batched_by_name_positional_or_keyword() -> None:
    seen: list[tuple[Any, ...]] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)
    async def f(a: list[int], b: list[int], *, scale: list[int]) -> list[int]:
        seen.append((a, b, scale))
        return [(x + y) * s for x, y, s in zip(a, b, scale)]

    async def main() -> list[int]:
        return await asyncio.gather(f(1, 2, scale=1), f(a=3, b=4, scale=10), f(5, b=6, scale=100))

    assert run(main()) == [3, 70, 1100]
    assert seen == [([1, 3, 5], [2, 4, 6], [1, 10, 100])]


def test_an_argument_some_callers_left_to_its_default_gets_the_default() -> None:
    seen: list[Any] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def f(xs: list[int], suffix: Any = "-") -> list[str]:
        seen.append(suffix)
        return [f"{x}{s}" for x, s in zip(xs, suffix if isinstance(suffix, list) else [suffix] * len(xs))]

    assert run_all(f(1), f(2, suffix="!")) == ["1-", "2!"]
    assert run_all(f(1), f(2)) == ["1-", "2-"]
    assert seen == [["-", "!"], "-"]  # nobody passed it: the function's own default


def test_a_call_that_does_not_fit_the_signature_fails_only_its_caller() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def f(xs: list[int]) -> list[int]:
        return xs

    async def main() -> None:
        with pytest.raises(TypeError):
            await f(1, 2)
        with pytest.raises(TypeError):
            await f(nope=1)
        assert await f(3) == 3

    run(main())


def test_each_object_has_its_own_queue() -> None:
    class Owner:
        def __init__(self, name: str) -> None:
            self.name = name
            self.batches: list[list[int]] = []

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
        async def handle(self, xs: list[int]) -> list[str]:
            self.batches.append(xs)
            return [f"{self.name}{x}" for x in xs]

    a, b = Owner("a"), Owner("b")
    assert run_all(a.handle(1), b.handle(2), a.handle(3), b.handle(4)) == ["a1", "b2", "a3", "b4"]
    assert (a.batches, b.batches) == ([[1, 3]], [[2, 4]])


def test_a_batched_method_called_through_the_class_is_still_a_method() -> None:
    rec = Recorder()
    assert run_all(*(Recorder.handle(rec, i) for i in range(3))) == ["r0", "r1", "r2"]
    assert rec.batches == [[0, 1, 2]]


def test_max_concurrent_batches_bounds_the_batches_running_at_once() -> None:
    class Gated:
        def __init__(self) -> None:
            self.gate = asyncio.Event()
            self.running = 0
            self.most = 0
            self.batches = 0

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S, max_concurrent_batches=2)
        async def handle(self, xs: list[int]) -> list[int]:
            self.batches += 1
            self.running += 1
            self.most = max(self.most, self.running)
            await self.gate.wait()
            self.running -= 1
            return xs

    async def main() -> None:
        g = Gated()
        calls = [asyncio.ensure_future(g.handle(i)) for i in range(8)]
        await settle()
        assert (g.running, g.batches) == (2, 2)  # two batches run; the other items wait
        g.gate.set()
        assert await asyncio.gather(*calls) == list(range(8))
        assert (g.most, g.batches) == (2, 4)

    run(main())


def test_items_that_arrive_while_a_batch_runs_fill_the_next_one() -> None:
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        calls = [asyncio.ensure_future(rec.handle(i)) for i in range(3)]
        await settle()
        calls += [asyncio.ensure_future(rec.handle(i)) for i in range(3, 9)]
        await settle()
        assert rec.batches == [[0, 1, 2]]  # one slot, held
        rec.gate.set()
        await asyncio.gather(*calls)
        assert rec.batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        assert rec.most_running == 1

    run(main())


# -- errors ---------------------------------------------------------------------------------------


def test_a_result_list_of_another_length_fails_every_caller() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def short(xs: list[int]) -> list[int]:
        return xs[:1]

    async def main() -> list[Any]:
        return await asyncio.gather(short(1), short(2), return_exceptions=True)

    errors = run(main())
    for error in errors:
        assert isinstance(error, RayServeException)
        assert str(error) == (
            "Batched function doesn't preserve batch size. "
            "The input list has length 2 but the returned list has length 1."
        )


def test_a_result_that_is_not_a_list_fails_every_caller() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def nothing(xs: list[int]) -> None:
        return None

    errors = run_all(nothing(1), nothing(2), return_exceptions=True)
    assert all(isinstance(e, TypeError) and "must return a list" in str(e) for e in errors)


def test_an_exception_fails_its_batch_and_later_batches_still_run() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def picky(xs: list[int]) -> list[int]:
        if 0 in xs:
            raise ValueError("no zeros")
        return xs

    async def main() -> list[Any]:
        return await asyncio.gather(*(picky(i) for i in (0, 1, 2, 3)), return_exceptions=True)

    first, second, *rest = run(main())
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert rest == [2, 3]


# -- batch_size_fn --------------------------------------------------------------------------------


def test_batch_size_fn_sizes_a_batch_by_its_content() -> None:
    batches: list[list[str]] = []

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=LONG_S, batch_size_fn=lambda items: sum(map(len, items)))
    async def words(items: list[str]) -> list[int]:
        batches.append(items)
        return [len(w) for w in items]

    async def main() -> list[int]:
        calls = [asyncio.ensure_future(words(w)) for w in ("aaaa", "bbbbbb", "cc", "ddddddd", "eee")]
        await settle()
        # 4 + 6 is full; "cc" + "ddddddd" is 9 and "eee" would make it 12: deferred, so that
        # batch closes at 9 and "eee" waits for more.
        assert batches == [["aaaa", "bbbbbb"], ["cc", "ddddddd"]]
        return await asyncio.gather(*calls, words("fffffff"))

    assert run(main()) == [4, 6, 2, 7, 3, 7]
    assert batches == [["aaaa", "bbbbbb"], ["cc", "ddddddd"], ["eee", "fffffff"]]


def test_an_item_bigger_than_max_batch_size_fails_alone() -> None:
    @serve.batch(max_batch_size=5, batch_wait_timeout_s=0, batch_size_fn=lambda items: sum(items))
    async def f(xs: list[int]) -> list[int]:
        return xs

    async def main() -> list[Any]:
        return await asyncio.gather(f(2), f(6), f(3), return_exceptions=True)

    ok, big, after = run(main())
    assert (ok, after) == (2, 3)
    assert isinstance(big, RuntimeError)
    assert str(big).startswith("Size of item is greater than max_batch_size.")


def test_a_failing_batch_size_fn_fails_the_callers_it_sized() -> None:
    def size(items: list[Any]) -> int:
        if "bad" in items:
            raise ValueError("cannot size")
        return len(items)

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=0, batch_size_fn=size)
    async def f(xs: list[Any]) -> list[Any]:
        return xs

    async def main() -> list[Any]:
        return await asyncio.gather(f("bad"), return_exceptions=True)

    [error] = run(main())
    assert isinstance(error, ValueError)
    assert run(f("good")) == "good"


# -- streaming ------------------------------------------------------------------------------------


def test_an_async_generator_streams_each_caller_its_items() -> None:
    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)
    async def count(limits: list[int]) -> AsyncIterator[list[Any]]:
        for i in range(max(limits)):
            yield [i if i < n else StopIteration for n in limits]

    async def collect(n: int) -> list[int]:
        return [item async for item in count(n)]

    assert run_all(collect(1), collect(3), collect(2)) == [[0], [0, 1, 2], [0, 1]]


def test_stop_async_iteration_also_ends_a_caller() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def gen(xs: list[int]) -> AsyncIterator[list[Any]]:
        yield [x for x in xs]
        yield [StopAsyncIteration, xs[1] * 10]

    async def collect(x: int) -> list[int]:
        return [item async for item in gen(x)]

    assert run_all(collect(1), collect(2)) == [[1], [2, 20]]


def test_stream_items_are_never_compared_with_the_sentinels() -> None:
    class NoEquality:
        def __eq__(self, other: object) -> bool:
            raise ValueError("the truth value is ambiguous")

        __hash__ = object.__hash__

    item = NoEquality()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=LONG_S)
    async def gen(xs: list[int]) -> AsyncIterator[list[Any]]:
        yield [item]

    async def collect() -> list[Any]:
        return [i async for i in gen(1)]

    [got] = run(collect())
    assert got is item


def test_an_exception_mid_stream_reaches_every_caller_still_reading() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        yield xs
        raise KeyError("mid-stream")

    async def collect(x: int) -> list[int]:
        got = []
        with pytest.raises(KeyError):
            async for item in gen(x):
                got.append(item)
        return got

    assert run_all(collect(1), collect(2)) == [[1], [2]]


def test_a_streaming_caller_that_stops_reading_leaves_the_others_alone() -> None:
    closed = asyncio.Event()

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        try:
            for i in range(3):
                yield [x + i for x in xs]
        finally:
            closed.set()

    async def first_only(x: int) -> int:
        stream = gen(x)
        item = await anext(stream)  # type: ignore[arg-type]
        await stream.aclose()  # type: ignore[attr-defined]
        return int(item)

    async def collect(x: int) -> list[int]:
        return [item async for item in gen(x)]

    async def main() -> list[Any]:
        results = await asyncio.gather(first_only(10), collect(20))
        await closed.wait()
        return results

    assert run(main()) == [10, [20, 21, 22]]


def test_a_streaming_batch_nobody_reads_any_more_is_closed() -> None:
    closed = asyncio.Event()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=LONG_S)
    async def endless(xs: list[int]) -> AsyncIterator[list[int]]:
        try:
            while True:
                await asyncio.sleep(0)  # produce items the way real work does: between awaits
                yield xs
        finally:
            closed.set()

    async def main() -> None:
        stream = endless(1)
        assert await anext(stream) == 1  # type: ignore[arg-type]
        await stream.aclose()  # type: ignore[attr-defined]
        await closed.wait()

    run(main())


# -- cancellation ---------------------------------------------------------------------------------


def test_a_caller_cancelled_before_its_batch_runs_is_left_out() -> None:
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        busy = [asyncio.ensure_future(rec.handle(i)) for i in range(3)]
        await settle()
        waiting = [asyncio.ensure_future(rec.handle(i)) for i in range(3, 7)]
        await settle()
        waiting[1].cancel()  # item 4, queued behind the running batch
        rec.gate.set()
        done = await asyncio.gather(*busy, *waiting, return_exceptions=True)
        assert isinstance(done[4], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i != 4] == ["r0", "r1", "r2", "r3", "r5", "r6"]
        assert rec.batches == [[0, 1, 2], [3, 5, 6]]

    run(main())


def test_a_caller_cancelled_while_its_batch_runs_does_not_break_it() -> None:
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        calls = [asyncio.ensure_future(rec.handle(i)) for i in range(3)]
        await settle()
        assert rec.running == 1
        calls[0].cancel()
        await settle()
        rec.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == ["r1", "r2"]

    run(main())


def test_a_batch_whose_callers_all_went_away_does_not_run() -> None:
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        busy = [asyncio.ensure_future(rec.handle(i)) for i in range(3)]
        await settle()
        gone = [asyncio.ensure_future(rec.handle(i)) for i in range(3, 6)]
        await settle()
        for call in gone:
            call.cancel()
        rec.gate.set()
        await asyncio.gather(*busy)
        await asyncio.gather(*gone, return_exceptions=True)
        await settle()
        assert rec.batches == [[0, 1, 2]]

    run(main())


# -- live settings --------------------------------------------------------------------------------


def test_set_max_batch_size_applies_to_the_batch_being_formed() -> None:
    class Tunable:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        @serve.batch(max_batch_size=10, batch_wait_timeout_s=LONG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            self.batches.append(xs)
            return xs

        def reconfigure(self, config: dict[str, Any]) -> None:
            self.handle.set_max_batch_size(config["max_batch_size"])  # type: ignore[attr-defined]
            self.handle.set_batch_wait_timeout_s(config["timeout_s"])  # type: ignore[attr-defined]

    async def main() -> None:
        t = Tunable()
        calls = [asyncio.ensure_future(t.handle(i)) for i in range(5)]
        await settle()
        assert t.batches == []  # 5 of 10, and the wait is long
        t.reconfigure({"max_batch_size": 2, "timeout_s": LONG_S})
        assert t.handle._get_max_batch_size() == 2  # type: ignore[attr-defined]
        await settle()
        assert t.batches == [[0, 1], [2, 3]]
        t.reconfigure({"max_batch_size": 2, "timeout_s": 0})
        assert t.handle._get_batch_wait_timeout_s() == 0  # type: ignore[attr-defined]
        assert await asyncio.gather(*calls) == [0, 1, 2, 3, 4]
        assert t.batches == [[0, 1], [2, 3], [4]]

    run(main())


def test_setters_validate_like_the_decorator() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        Recorder.handle.set_max_batch_size(0)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="batch_wait_timeout_s must be a float >= 0, got -1"):
        Recorder.handle.set_batch_wait_timeout_s(-1)  # type: ignore[attr-defined]


# -- request contexts and multiplexing ------------------------------------------------------------


def test_batches_are_split_by_multiplexed_model_id_with_each_callers_context() -> None:
    seen: list[tuple[str, list[str], list[int]]] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=LONG_S)
    async def model(xs: list[int]) -> list[str]:
        ctx = context.current_request()
        seen.append((ctx.multiplexed_model_id, [c.request_id for c in get_batch_request_contexts()], xs))
        return [f"{ctx.multiplexed_model_id}:{x}" for x in xs]

    async def call(x: int, model_id: str) -> str:
        context.set_request(RequestContext(request_id=f"req{x}", app_name="app", multiplexed_model_id=model_id))
        return await model(x)

    async def main() -> list[str]:
        return await asyncio.gather(call(1, "a"), call(2, "b"), call(3, "a"), call(4, "b"))

    assert run(main()) == ["a:1", "b:2", "a:3", "b:4"]
    assert sorted(seen) == [("a", ["req1", "req3"], [1, 3]), ("b", ["req2", "req4"], [2, 4])]
    assert get_batch_request_contexts() == []


# -- validation (Ray's messages) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 1.5}, TypeError, "max_batch_size must be integer >= 1, got 1.5"),
        ({"max_batch_size": "4"}, TypeError, "max_batch_size must be integer >= 1, got 4"),
        ({"batch_wait_timeout_s": -0.1}, ValueError, "batch_wait_timeout_s must be a float >= 0, got -0.1"),
        ({"batch_wait_timeout_s": "1"}, TypeError, "batch_wait_timeout_s must be a float >= 0, got 1"),
        ({"max_concurrent_batches": 0}, TypeError, "max_concurrent_batches must be an integer >= 1, got 0"),
        ({"max_concurrent_batches": 1.0}, TypeError, "max_concurrent_batches must be an integer >= 1, got 1.0"),
        ({"batch_size_fn": 3}, TypeError, "batch_size_fn must be a callable or None, got <class 'int'>"),
    ],
)
def test_invalid_options_are_refused_with_rays_messages(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error) as info:
        serve.batch(**options)
    assert str(info.value) == message


def test_an_integral_float_max_batch_size_is_accepted() -> None:
    @serve.batch(max_batch_size=2.0)  # type: ignore[call-overload]
    async def f(xs: list[int]) -> list[int]:
        return xs

    assert f._get_max_batch_size() == 2  # type: ignore[attr-defined]


def test_sync_functions_are_refused() -> None:
    def sync(xs: list[int]) -> list[int]:
        return xs

    for decorate in (serve.batch, serve.batch(max_batch_size=2)):
        with pytest.raises(TypeError) as info:
            decorate(sync)
        assert str(info.value) == "Functions decorated with @serve.batch must be 'async def'"
    with pytest.raises(TypeError, match="can only be used to decorate functions or methods"):
        serve.batch(3)  # type: ignore[call-overload]


def test_a_batched_function_keeps_its_name_and_kind() -> None:
    import inspect

    assert Recorder.handle.__name__ == "handle"
    assert inspect.iscoroutinefunction(Recorder.handle)

    @serve.batch
    async def gen(xs: list[int]) -> AsyncIterator[list[int]]:
        yield xs

    assert inspect.isasyncgenfunction(gen)


def test_a_pickled_class_gets_fresh_queues() -> None:
    class Shipped:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            return [x + 1 for x in xs]

    local = Shipped()
    assert run_all(local.handle(1), local.handle(2)) == [2, 3]
    copy = cloudpickle.loads(cloudpickle.dumps(Shipped))
    one = copy()
    assert run_all(one.handle(5), one.handle(6)) == [6, 7]


def test_a_queue_is_made_again_on_a_new_event_loop() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def f(xs: list[int]) -> list[int]:
        return xs

    assert run(f(1)) == 1
    assert run(f(2)) == 2  # a second asyncio.run: another loop


# -- the max_ongoing_requests warning -------------------------------------------------------------


def test_warns_when_max_ongoing_requests_cannot_fill_the_batches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    replica = ReplicaContext(replica_id=ReplicaID("r1", "D", "app"), max_ongoing_requests=8)
    monkeypatch.setattr(context, "_replica_context", replica)

    class Wide:
        @serve.batch(max_batch_size=5, batch_wait_timeout_s=0, max_concurrent_batches=2)
        async def handle(self, xs: list[int]) -> list[int]:
            return xs

    with caplog.at_level(logging.WARNING, logger="shoal.serve"):
        w = Wide()
        assert run(w.handle(1)) == 1
    [record] = [r for r in caplog.records if "max_ongoing_requests" in r.getMessage()]
    assert record.getMessage() == (
        "`max_batch_size` (5) * `max_concurrent_batches` (2) is larger than `max_ongoing_requests` "
        "(8). This means the replica will never achieve the configured `max_batch_size` "
        "concurrently. Please update `max_ongoing_requests` to be >= `max_batch_size` * "
        "`max_concurrent_batches`."
    )
    caplog.clear()
    replica.max_ongoing_requests = 10
    with caplog.at_level(logging.WARNING, logger="shoal.serve"):
        assert run(w.handle(2)) == 2
        Wide.handle.set_max_batch_size(4)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if "max_ongoing_requests" in r.getMessage()]


def test_batch_metrics_size_by_batch_size_fn_utilization_and_queue_length() -> None:
    """Ray's semantics: a batch's size is ``batch_size_fn``'s (else its length), its utilization
    that size over ``max_batch_size``; callers cancelled before it runs are left out of it; the
    queue length follows the callers waiting."""

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=60, batch_size_fn=lambda items: sum(items))
    async def weigh_metrics(items: list[int]) -> list[int]:
        return items

    def hist(child: Any) -> tuple[float, float]:
        return sum(b.get() for b in child._buckets), child._sum.get()

    async def main() -> None:
        first = asyncio.ensure_future(weigh_metrics(3))
        await settle()
        queue = weigh_metrics._shoal_batcher._function_queue  # type: ignore[attr-defined]
        m = queue.metrics
        assert m.queue_length._value.get() == 1
        gone = asyncio.ensure_future(weigh_metrics(3))
        await settle()
        assert m.queue_length._value.get() == 2
        gone.cancel()
        assert await asyncio.gather(first, weigh_metrics(3), weigh_metrics(4), return_exceptions=True) == [3, 3, 4]
        assert m.queue_length._value.get() == 0
        assert m.processed._value.get() == 1
        assert hist(m.batch_size) == (1, 10)  # 3 + 3 + 4 (the cancelled caller left out)
        assert hist(m.utilization_percent) == (1, 100)
        assert hist(m.execution_time_ms)[0] == 1
        assert hist(m.wait_time_ms)[0] == 1

    run(main())

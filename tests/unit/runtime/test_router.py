"""Router: queueing, FIFO, backpressure, REJECTED backoff, draining and gone replicas.

Real ``inproc://`` sockets, a fake replica that answers when told, and a fake clock for backoffs.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from inproc import FakeClock, FakeReplica, request_id, run

from shoal.runtime import wire
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.runtime.reply import END, ReplySink
from shoal.runtime.router import Call, Router

pytestmark = pytest.mark.timeout(60)


def _call(name: str) -> tuple[Call, ReplySink]:
    sink = ReplySink()
    return Call(wire.RequestHeader("__call__", name), wire.dumps_args((), {})[1], sink), sink


def _router(clock: FakeClock, *replicas: FakeReplica, limit: int = 1, max_queued: int = -1,
            draining: tuple[FakeReplica, ...] = ()) -> Router:
    router = Router("app", "D", asyncio.get_running_loop(), clock=clock)
    router._rng = random.Random(0)
    router.update(_entry(*replicas, limit=limit, max_queued=max_queued, draining=draining))
    return router


def _entry(*replicas: FakeReplica, limit: int = 1, max_queued: int = -1,
           draining: tuple[FakeReplica, ...] = ()) -> wire.DeploymentEntry:
    return wire.DeploymentEntry(
        replicas=tuple(r.address(f"app#D#r{id(r)}") for r in replicas),
        draining=tuple(r.address(f"app#D#r{id(r)}") for r in draining),
        max_ongoing_requests=limit, max_queued_requests=max_queued,
        backpressure_status_code=429, backpressure_retry_after_s=2.0,
    )


def test_requests_over_the_limit_wait_and_go_in_fifo_order() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=1)
        calls = [_call(f"c{i}") for i in range(4)]
        for call, _ in calls:
            router.submit(call)
        assert len(router.queue) == 3  # one sent, three wait here
        for i, (_, sink) in enumerate(calls):
            identity, msg = await replica.next()
            assert request_id(msg) == f"c{i}"
            replica.answer(identity, msg, wire.Kind.RESULT, i)
            assert await sink.result() == i
        router.close()
        replica.close()

    run(main)


def test_a_full_queue_rejects_at_once_with_the_backpressure_settings() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=1, max_queued=1)
        (c1, _), (c2, s2), (c3, s3) = _call("c1"), _call("c2"), _call("c3")
        for call in (c1, c2, c3):
            router.submit(call)
        with pytest.raises(BackPressureError) as info:
            await s3.result()
        assert (info.value.status_code, info.value.retry_after_s, info.value.max_queued_requests) == (429, 2.0, 1)
        assert not s2.done()  # the queued one still waits
        router.close()
        with pytest.raises(RequestCancelledError):
            await s2.result()
        replica.close()

    run(main)


def test_rejected_goes_back_to_the_head_of_the_queue_and_skips_the_replica_for_a_backoff() -> None:
    async def main() -> None:
        a, b, clock = FakeReplica(), FakeReplica(), FakeClock()
        router = _router(clock, a, b, limit=1)
        (c1, s1) = _call("c1")
        router.submit(c1)
        assert c1.conn is not None
        first, second = (a, b) if c1.conn.replica_id == f"app#D#r{id(a)}" else (b, a)
        identity, msg = await first.next()
        first.answer(identity, msg, wire.Kind.REJECTED, q=1)  # full with other callers' requests
        identity, msg = await second.next()  # tried on the other replica at once
        assert request_id(msg) == "c1"
        second.answer(identity, msg, wire.Kind.REJECTED, q=1)
        # Both are skipped now: nothing is sent until the fake clock passes their backoffs.
        assert router._choose() is None
        clock.advance(1.0)
        identity, msg = await first.next()  # the retry timer finds a replica again
        assert request_id(msg) == "c1"
        first.answer(identity, msg, wire.Kind.RESULT, "ok")
        assert await s1.result() == "ok"
        router.close()
        a.close()
        b.close()

    run(main)


def test_a_draining_replica_keeps_its_calls_and_a_gone_one_fails_them() -> None:
    async def main() -> None:
        a, b, clock = FakeReplica(), FakeReplica(), FakeClock()
        router = _router(clock, a, limit=5)
        (c1, s1), (c2, s2) = _call("c1"), _call("c2")
        router.submit(c1)
        id1, m1 = await a.next()
        router.update(_entry(b, limit=5, draining=(a,)))  # a drains; b takes new requests
        router.submit(c2)
        _id2, m2 = await b.next()
        assert request_id(m2) == "c2"
        a.answer(id1, m1, wire.Kind.RESULT, "from a")  # the draining replica still answers
        assert await s1.result() == "from a"
        router.update(_entry(limit=5))  # b is gone without draining: its call fails
        with pytest.raises(ReplicaDiedError, match="c2"):
            await s2.result()
        router.close()
        a.close()
        b.close()

    run(main)


def test_cancel_removes_a_queued_call_and_sends_cancel_for_a_running_one() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=1)
        (c1, s1), (c2, s2) = _call("c1"), _call("c2")
        router.submit(c1)
        router.submit(c2)
        router.cancel(c2)
        assert not router.queue
        with pytest.raises(RequestCancelledError):
            await s2.result()
        _identity, msg = await replica.next()
        router.cancel(c1)
        with pytest.raises(RequestCancelledError):
            await s1.result()
        _, cancel = await replica.next(wire.Kind.CANCEL)
        assert cancel.call_id == msg.call_id
        router.close()
        replica.close()

    run(main)


def test_a_failed_or_deleted_deployment_fails_calls_at_once() -> None:
    async def main() -> None:
        clock = FakeClock()
        router = Router("app", "D", asyncio.get_running_loop(), clock=clock)
        (c1, s1), (c2, s2) = _call("c1"), _call("c2")
        router.update(None)
        router.submit(c1)
        with pytest.raises(DeploymentUnavailableError, match="does not exist"):
            await s1.result()
        router.update(wire.DeploymentEntry(failed_reason="constructor raised"))
        router.submit(c2)
        with pytest.raises(DeploymentUnavailableError, match="constructor raised"):
            await s2.result()
        router.close()

    run(main)


def test_streams_and_errors_reach_the_sink() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=5)
        (c1, s1), (c2, s2) = _call("c1"), _call("c2")
        router.submit(c1)
        router.submit(c2)
        id1, m1 = await replica.next()
        id2, m2 = await replica.next()
        replica.answer(id1, m1, wire.Kind.STREAM_ITEM, 1)
        replica.answer(id1, m1, wire.Kind.STREAM_END, 2)  # the last item rides on the end
        assert [await s1.next(), await s1.next()] == [1, 2]
        assert await s1.next() is END
        assert await s1.next() is END
        replica.answer(id2, m2, wire.Kind.ERROR, (KeyError("k"), "Traceback: remote"))
        with pytest.raises(KeyError):
            await s2.result()
        router.close()
        replica.close()

    run(main)


def test_slot_free_ends_the_backoff_at_once_without_the_clock_moving() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=1)
        (c1, s1), (c2, s2) = _call("c1"), _call("c2")
        router.submit(c1)
        identity, msg = await replica.next()
        replica.answer(identity, msg, wire.Kind.REJECTED, q=1)  # full with another caller's requests
        router.submit(c2)  # waits behind c1, in order
        # The replica frees a slot and says so: the rejected call goes now, the clock stands still.
        replica.channel.send_message(wire.Message(wire.Kind.SLOT_FREE, replica.incarnation), identity)
        identity, msg = await replica.next()
        assert request_id(msg) == "c1"
        replica.answer(identity, msg, wire.Kind.RESULT, "one")
        assert await s1.result() == "one"
        identity, msg = await replica.next()  # then the next in line
        assert request_id(msg) == "c2"
        replica.answer(identity, msg, wire.Kind.RESULT, "two")
        assert await s2.result() == "two"
        router.close()
        replica.close()

    run(main)


def test_a_slot_free_from_another_incarnation_is_ignored() -> None:
    async def main() -> None:
        replica, clock = FakeReplica(), FakeClock()
        router = _router(clock, replica, limit=2)
        (c0, s0), (c1, s1) = _call("c0"), _call("c1")
        router.submit(c0)
        router.submit(c1)
        id0, m0 = await replica.next()
        id1, m1 = await replica.next()
        replica.answer(id1, m1, wire.Kind.REJECTED, q=2)
        replica.channel.send_message(wire.Message(wire.Kind.SLOT_FREE, replica.incarnation + 1), id1)
        replica.answer(id0, m0, wire.Kind.STREAM_ITEM, "marker")  # sent after it: handled after it
        assert await s0.next() == "marker"
        assert list(router.queue) == [c1]  # still waiting for its backoff: the stale one was ignored
        replica.channel.send_message(wire.Message(wire.Kind.SLOT_FREE, replica.incarnation), id1)
        identity, msg = await replica.next()
        assert request_id(msg) == "c1"
        replica.answer(identity, msg, wire.Kind.RESULT, "ok")
        assert await s1.result() == "ok"
        router.close()
        replica.close()

    run(main)

"""ReplicaWorker: limits, REJECTED, CANCEL and replies, over real ``inproc://`` sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq
from inproc import run

from shoal.runtime import transport, wire
from shoal.runtime.asgi import HTTP_METHOD
from shoal.runtime.replica import ReplicaWorker
from shoal.runtime.replica_metrics import ReplicaMetrics
from shoal.runtime.user_code import UserCallable
from shoal.runtime.wire import HEALTH_METHOD

pytestmark = pytest.mark.timeout(60)


class Held:
    """``hold`` runs until ``release`` is called; it records being cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.released = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def hold(self) -> str:
        self.started.set()
        try:
            await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "released"

    def release(self) -> None:
        self.released.set()

    def fail(self) -> None:
        raise ValueError("user error")


class Caller:
    """A DEALER connected to the worker; replies are queued in arrival order."""

    def __init__(self, endpoint: str) -> None:
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(endpoint)
        self.replies: asyncio.Queue[wire.Message] = asyncio.Queue()
        self.channel = transport.Channel(sock, lambda frames: self.replies.put_nowait(wire.decode(frames)))
        self._ids = 0

    def send(self, method: str, incarnation: int = 1) -> int:
        self._ids += 1
        header = wire.RequestHeader(method, f"r{self._ids}")
        self.channel.send_message(wire.request(incarnation, self._ids, header, wire.dumps_args((), {})[1]))
        return self._ids

    def cancel(self, call_id: int) -> None:
        self.channel.send_message(wire.Message(wire.Kind.CANCEL, 1, call_id))

    async def reply(self) -> wire.Message:
        return await self.replies.get()


async def _worker(limit: int, metrics: ReplicaMetrics | None = None) -> tuple[ReplicaWorker, Caller, Any]:
    user = UserCallable(deployment_name="Held", func_or_class=Held, init_args=(), init_kwargs={},
                        max_ongoing_requests=limit)
    await user.construct()
    worker = ReplicaWorker(user=user, incarnation=1, max_ongoing_requests=limit, app_name="app", metrics=metrics)
    sock = transport.make_socket(zmq.ROUTER)
    sock.bind("inproc://worker")
    worker.attach(transport.Channel(sock, worker.on_message))
    return worker, Caller("inproc://worker"), user.instance


async def _close(worker: ReplicaWorker, caller: Caller) -> None:
    await worker.cancel_all()
    await worker.user.destroy()
    caller.channel.close()
    assert worker.channel is not None
    worker.channel.close()


def test_a_request_over_max_ongoing_requests_is_rejected_and_never_runs() -> None:
    async def main() -> None:
        worker, caller, instance = await _worker(limit=1)
        first = caller.send("hold")
        await instance.started.wait()
        second = caller.send("hold")
        rejected = await caller.reply()
        assert (rejected.kind, rejected.call_id) == (wire.Kind.REJECTED, second)
        assert wire.ReplyHeader.from_meta(rejected.meta).q == 1
        # An HTTP request counts like any other (its method name is reserved, not internal).
        http = caller.send(HTTP_METHOD)
        rejected = await caller.reply()
        assert (rejected.kind, rejected.call_id) == (wire.Kind.REJECTED, http)
        # Internal methods run outside the limit.
        health = caller.send(HEALTH_METHOD)
        reply = await caller.reply()
        assert (reply.kind, reply.call_id) == (wire.Kind.RESULT, health)
        instance.release()
        done = await caller.reply()
        assert (done.kind, done.call_id) == (wire.Kind.RESULT, first)
        assert wire.loads(wire.ReplyHeader.from_meta(done.meta).enc, done.payload[0]) == "released"
        assert wire.ReplyHeader.from_meta(done.meta).q == 0  # the slot is free before the reply
        # The caller was rejected (twice): after the reply that freed the slot, one SLOT_FREE.
        slot_free = await caller.reply()
        assert (slot_free.kind, slot_free.incarnation) == (wire.Kind.SLOT_FREE, 1)
        await _close(worker, caller)

    run(main)


def test_cancel_cancels_the_user_coroutine_and_answers_cancelled() -> None:
    async def main() -> None:
        worker, caller, instance = await _worker(limit=2)
        call_id = caller.send("hold")
        await instance.started.wait()
        caller.cancel(call_id)
        reply = await caller.reply()
        assert (reply.kind, reply.call_id) == (wire.Kind.CANCELLED, call_id)
        assert instance.cancelled.is_set()
        assert worker.ongoing == 0
        await _close(worker, caller)

    run(main)


def test_a_user_exception_and_another_incarnation() -> None:
    async def main() -> None:
        worker, caller, _ = await _worker(limit=2)
        call_id = caller.send("fail")
        reply = await caller.reply()
        assert (reply.kind, reply.call_id) == (wire.Kind.ERROR, call_id)
        cause, tb_text = wire.loads(wire.ReplyHeader.from_meta(reply.meta).enc, reply.payload[0])
        assert isinstance(cause, ValueError) and "user error" in tb_text
        stale = caller.send("hold", incarnation=0)  # addressed to a predecessor: never runs
        reply = await caller.reply()
        assert (reply.kind, reply.call_id, worker.ongoing) == (wire.Kind.REJECTED, stale, 0)
        await _close(worker, caller)

    run(main)


def test_requests_are_counted_when_they_end_and_only_the_users_own() -> None:
    """OK, raised and cancelled requests are counted by outcome; a rejected request and the
    supervisor's health check are not; the ongoing gauge follows the user's requests only."""
    metrics = ReplicaMetrics(deployment="HeldMetrics", replica="r", application="app", max_ongoing_requests=1)
    ongoing = metrics._ongoing

    def count(metric: Any, **labels: str) -> float:
        return sum(
            s.value for family in metric._prom.collect() for s in family.samples
            if s.name.endswith("_total") and s.labels.get("deployment") == "HeldMetrics"
            and labels.items() <= s.labels.items()
        )

    async def main() -> None:
        worker, caller, instance = await _worker(limit=1, metrics=metrics)
        first = caller.send("hold")
        await instance.started.wait()
        assert ongoing._value.get() == 1
        caller.send("hold")  # over the limit: REJECTED, never counted
        assert (await caller.reply()).kind == wire.Kind.REJECTED
        caller.send(HEALTH_METHOD)
        assert (await caller.reply()).kind == wire.Kind.RESULT
        caller.cancel(first)
        assert (await caller.reply()).kind == wire.Kind.CANCELLED
        assert (await caller.reply()).kind == wire.Kind.SLOT_FREE  # it was rejected: told of the slot
        assert ongoing._value.get() == 0
        caller.send("fail")
        assert (await caller.reply()).kind == wire.Kind.ERROR
        instance.release()
        caller.send("hold")
        assert (await caller.reply()).kind == wire.Kind.RESULT
        assert count(metrics._requests) == 1
        assert count(metrics._errors, exception_type="CancelledError") == 1
        assert count(metrics._errors, exception_type="ValueError") == 1
        assert ongoing._value.get() == 0
        await _close(worker, caller)

    run(main)


def test_drain_rejects_new_requests_and_waits_for_ongoing_ones() -> None:
    async def main() -> None:
        worker, caller, instance = await _worker(limit=2)
        first = caller.send("hold")
        await instance.started.wait()
        # The task's first step (which stops intake) runs before the loop reads the socket again.
        drained = asyncio.get_running_loop().create_task(worker.drain(timeout_s=10))
        second = caller.send("release")
        reply = await caller.reply()
        assert (reply.kind, reply.call_id) == (wire.Kind.REJECTED, second)
        assert not drained.done()
        instance.release()
        assert (await caller.reply()).call_id == first
        assert await drained is True
        await _close(worker, caller)

    run(main)


def test_a_worker_keeps_the_deployers_sys_path_order() -> None:
    from shoal.runtime.worker_main import merged_sys_path

    stdlib = "/usr/lib/python3.11"
    deployer = ["/app", stdlib, "/app/benchmarks"]  # the last one holds an http.py
    merged = merged_sys_path(deployer, ["/worker", stdlib, "/site-packages"])
    assert merged == ["/app", stdlib, "/app/benchmarks", "/worker", "/site-packages"]
    assert merged.index(stdlib) < merged.index("/app/benchmarks")


def test_only_the_callers_rejected_for_a_slot_are_told_when_one_frees_and_only_once() -> None:
    async def main() -> None:
        worker, holder, instance = await _worker(limit=1)
        other = Caller("inproc://worker")
        first = holder.send("hold")
        await instance.started.wait()
        rejected = other.send("hold")
        assert ((await other.reply()).kind, rejected) == (wire.Kind.REJECTED, rejected)
        other.send("hold")  # rejected twice: still told once
        assert (await other.reply()).kind == wire.Kind.REJECTED
        instance.release()
        done = await holder.reply()
        assert (done.kind, done.call_id) == (wire.Kind.RESULT, first)
        told = await other.reply()
        assert (told.kind, told.incarnation, told.call_id) == (wire.Kind.SLOT_FREE, 1, 0)
        # Told once, then forgotten: its next request runs and the next SLOT_FREE goes to nobody.
        again = other.send("fail")
        reply = await other.reply()
        assert (reply.kind, reply.call_id) == (wire.Kind.ERROR, again)
        # The holder, never rejected, got its reply and nothing else (this marker is next).
        marker = holder.send(HEALTH_METHOD)
        assert ((await holder.reply()).kind, marker) == (wire.Kind.RESULT, marker)
        # A request rejected because the replica drains is not remembered: draining frees no slot.
        drained = asyncio.get_running_loop().create_task(worker.drain(timeout_s=10))
        late = other.send("hold")
        assert ((await other.reply()).kind, late) == (wire.Kind.REJECTED, late)
        assert await drained is True
        assert not worker._rejected
        other.channel.close()
        await _close(worker, holder)

    run(main)

"""Routing: power of two choices over replicas, max_ongoing_requests, max_queued_requests, FIFO."""

from __future__ import annotations

import asyncio
import collections
import os
import uuid
from typing import Any

import pytest

from shoal import serve
from shoal.serve.exceptions import BackPressureError
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(60)


@serve.deployment(num_replicas=2, max_ongoing_requests=20)
class Pid:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate

    def __call__(self) -> int:
        return os.getpid()

    async def gated(self, key: str) -> int:
        await self.gate.wait.remote(key)
        return os.getpid()


@serve.deployment(max_ongoing_requests=1)
class Single:
    """Records how many requests run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.done = 0

    async def work(self, i: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.002)  # the work: while it runs, a second admitted request would overlap
        self.running -= 1
        self.done += 1
        return i

    def stats(self) -> tuple[int, int]:
        return self.peak, self.done


@serve.deployment
class Fanout:
    """A second caller of ``Single``, in another process: the replica must enforce its limit
    across callers, not only each caller's router."""

    def __init__(self, single: DeploymentHandle) -> None:
        self.single = single

    async def __call__(self, start: int, n: int) -> list[int]:
        return list(await asyncio.gather(*[self.single.work.remote(i) for i in range(start, start + n)]))


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Bounded:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate
        self.order: list[Any] = []

    async def block(self, key: str) -> str:
        self.order.append("block")
        await self.gate.wait.remote(key)
        return "unblocked"

    def ping(self) -> str:
        return "pong"


@serve.deployment(max_ongoing_requests=1)
class Recorder:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate
        self.order: list[Any] = []

    async def block(self, key: str) -> None:
        self.order.append("block")
        await self.gate.wait.remote(key)

    def record(self, i: int) -> int:
        self.order.append(i)
        return i

    def arrivals(self) -> list[Any]:
        return self.order


def _serve_until_both_seen(handle: DeploymentHandle) -> collections.Counter[int]:
    """Sequential calls until both replicas answered (at most 200)."""
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(200):
        seen[handle.remote().result(timeout_s=10)] += 1
        if len(seen) == 2 and sum(seen.values()) >= 40:
            break
    return seen


def test_both_replicas_serve(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Pid.bind(gate), app_name)
    seen = _serve_until_both_seen(handle)
    assert len(seen) == 2, seen
    # Idle replicas tie on load, so ties must not always go to the same one.
    assert min(seen.values()) >= 5, seen


def test_concurrent_calls_are_balanced(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    # 20 calls held open at once: p2c always compares both replicas, so each gets 10.
    handle = deploy(Pid.bind(gate), app_name)
    assert len(_serve_until_both_seen(handle)) == 2  # this caller's router knows both replicas
    key = uuid.uuid4().hex
    responses = [handle.gated.remote(key) for _ in range(20)]
    gate.open.remote(key).result(timeout_s=10)
    counts = collections.Counter(r.result(timeout_s=10) for r in responses)
    assert sorted(counts.values()) == [10, 10], counts


def test_max_ongoing_requests_is_never_exceeded(deploy: Any, app_name: str) -> None:
    single = deploy(Single.bind(), app_name)
    fanout = deploy(Fanout.bind(single), app_name + "_fanout")
    from_driver = [single.work.remote(i) for i in range(15)]
    from_replica = fanout.remote(100, 15)
    assert [r.result(timeout_s=30) for r in from_driver] == list(range(15))
    assert from_replica.result(timeout_s=30) == list(range(100, 115))
    peak, done = single.stats.remote().result(timeout_s=10)
    assert done == 30
    assert peak == 1


def test_backpressure_when_the_queue_is_full(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Bounded.bind(gate), app_name)
    assert handle.ping.remote().result(timeout_s=10) == "pong"  # the router knows the replica
    key = uuid.uuid4().hex
    running = handle.block.remote(key)  # takes the replica's only slot
    queued = handle.ping.remote()  # waits in the queue (1 of 1)
    rejected = handle.ping.remote()
    # At once: this does not wait for the running call.
    with pytest.raises(BackPressureError) as info:
        rejected.result(timeout_s=5)
    assert str(info.value) == (
        "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."
    )
    gate.open.remote(key).result(timeout_s=10)
    assert running.result(timeout_s=10) == "unblocked"
    assert queued.result(timeout_s=10) == "pong"


def test_queued_calls_run_in_fifo_order(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Recorder.bind(gate), app_name)
    handle.arrivals.remote().result(timeout_s=10)
    key = uuid.uuid4().hex
    blocker = handle.block.remote(key)
    queued = [handle.record.remote(i) for i in range(30)]
    gate.open.remote(key).result(timeout_s=10)
    blocker.result(timeout_s=10)
    assert [r.result(timeout_s=10) for r in queued] == list(range(30))
    assert handle.arrivals.remote().result(timeout_s=10) == ["block", *range(30)]

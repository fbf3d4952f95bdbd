"""The rest of Ray 2.60's handle API: ``options`` keywords, ``broadcast`` and handle metadata,
with real replica processes (and local testing mode for ``broadcast``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from shoal import serve
from shoal.runtime.errors import RayServeException
from shoal.serve.handle import DeploymentBroadcastResponse, DeploymentHandle

pytestmark = pytest.mark.timeout(60)


@serve.deployment(num_replicas=3, max_ongoing_requests=1)
class Cached:
    """Each replica has a cache; ``broadcast`` resets them all. The method named ``broadcast``
    is an ordinary user method: only ``options(method_name="broadcast")`` reaches it."""

    def __init__(self, gate: Any) -> None:
        self.cache: dict[str, int] = {"k": 1}
        self.gate = gate

    def reset(self, value: int = 0) -> tuple[int, int]:
        self.cache = {"k": value}
        return os.getpid(), value

    def read(self) -> tuple[int, int]:
        return os.getpid(), self.cache["k"]

    def broadcast(self, *args: Any) -> str:
        return f"user method broadcast{args}"

    def fail(self) -> None:
        raise ValueError(f"failed in {os.getpid()}")

    async def hold(self, key: str) -> int:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return os.getpid()


@pytest.fixture(scope="module")
def cached(gate: Any) -> Any:
    handle = serve.run(Cached.bind(gate), name="cached", route_prefix=None)
    yield handle
    serve.delete("cached")


def test_broadcast_runs_the_method_once_on_every_replica(cached: DeploymentHandle[Any]) -> None:
    response = cached.broadcast("reset", value=7)
    assert isinstance(response, DeploymentBroadcastResponse)
    results = response.results(timeout_s=30)
    assert len(results) == 3
    pids = {pid for pid, _ in results}
    assert len(pids) == 3 and {v for _, v in results} == {7}
    # Every replica's state changed: whichever replica answers, it reads 7.
    assert {cached.read.remote().result(timeout_s=10)[1] for _ in range(6)} == {7}


def test_broadcast_is_not_a_call_of_a_method_named_broadcast(cached: DeploymentHandle[Any]) -> None:
    assert isinstance(cached.broadcast, type(cached.remote))  # a real method, not __getattr__
    results = cached.broadcast("read").results(timeout_s=30)
    assert len(results) == 3
    # The user's own method named `broadcast` is reached the Ray way.
    assert cached.options(method_name="broadcast").remote(1).result(timeout_s=10) == "user method broadcast(1,)"


def test_broadcast_exceptions(cached: DeploymentHandle[Any]) -> None:
    with pytest.raises(ValueError, match="failed in"):
        cached.broadcast("fail").results(timeout_s=30)
    outcomes = cached.broadcast("fail").results(timeout_s=30, return_exceptions=True)
    assert len(outcomes) == 3 and all(isinstance(e, ValueError) for e in outcomes)
    with pytest.raises(RayServeException, match="does not exist"):
        cached.broadcast("no_such_method").results(timeout_s=30)
    with pytest.raises(ValueError, match="non-negative"):
        cached.broadcast("read").results(timeout_s=-1)


def test_broadcast_waits_for_a_busy_replica_and_reaches_it(cached: DeploymentHandle[Any], gate: Any) -> None:
    """With every replica at max_ongoing_requests=1, broadcast still reaches each of them once
    a slot frees (a REJECTED call is retried on the same replica, never re-routed elsewhere)."""
    key = "busy"
    held = [cached.hold.remote(key) for _ in range(3)]
    gate.arrived.remote(key, 3).result(timeout_s=30)  # all three replicas are busy now
    response = cached.broadcast("reset", value=3)
    with pytest.raises(TimeoutError, match=r"Timed out waiting for broadcast results\."):
        response.results(timeout_s=0.2)
    gate.open.remote(key).result(timeout_s=10)
    assert len({r.result(timeout_s=30) for r in held}) == 3
    results = response.results(timeout_s=30)
    assert len({pid for pid, _ in results}) == 3


def test_broadcast_results_async(cached: DeploymentHandle[Any]) -> None:
    async def main() -> list[Any]:
        results = await cached.broadcast("reset", value=5).results_async(timeout_s=30)
        with pytest.raises(RuntimeError, match="Sync methods should not be called"):
            cached.broadcast("read").results()
        return results

    assert len(asyncio.run(main())) == 3


def test_broadcast_resolves_response_arguments(cached: DeploymentHandle[Any]) -> None:
    value = cached.read.remote()  # (pid, current value)
    results = cached.broadcast("reset", value).results(timeout_s=30)
    assert len(results) == 3


def test_broadcast_in_local_testing_mode() -> None:
    @serve.deployment
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def bump(self, by: int) -> int:
            self.n += by
            return self.n

    handle = serve.run(Counter.bind(), name="local_broadcast", _local_testing_mode=True)
    assert handle.broadcast("bump", 2).results(timeout_s=10) == [2]
    assert handle.bump.remote(1).result(timeout_s=10) == 3


def test_handle_metadata_and_options(cached: DeploymentHandle[Any]) -> None:
    handle = serve.get_app_handle("cached")
    assert handle.deployment_name == "Cached" and handle.app_name == "cached"
    assert not handle.is_initialized
    handle._init()
    with pytest.raises(RuntimeError, match="Handle has already been initialized"):
        handle._init()
    derived = handle.options(method_name="read")
    assert derived.handle_id == handle.handle_id and derived.is_initialized
    assert derived.remote().result(timeout_s=10)[0] > 0
    assert handle.running_replicas_populated()
    pickled = handle.options(request_serialization="pickle", response_serialization="cloudpickle")
    assert pickled.read.remote().result(timeout_s=10)[0] > 0
    with pytest.warns(UserWarning, match="_prefer_local_routing"):
        assert handle.options(_prefer_local_routing=True).read.remote().result(timeout_s=10)[0] > 0
    response = handle.read.remote()
    assert response.by_reference is False
    with pytest.raises(RuntimeError, match="Ray ObjectRefs is not supported by shoal"):
        response._to_object_ref_sync()
    with pytest.raises(RayServeException, match="two-phase routing"):
        handle.choose_replica()
    handle.shutdown()
    asyncio.run(handle.shutdown_async())
    assert response.result(timeout_s=10)[0] > 0

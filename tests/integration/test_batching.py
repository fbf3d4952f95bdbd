"""``@serve.batch`` in real replicas: through handles, over HTTP with a real client, in local
testing mode; cancellation and client disconnects; a live ``set_max_batch_size`` from
``reconfigure`` when ``user_config`` changes.

Batches wait far longer than any test (``batch_wait_timeout_s=60``), so every batch here runs
because it is full (or because a setting changed): the tests never depend on timing. The
deployment counts what happened (callers arrived, callers cancelled, batches started) and a test
waits on those counts in the replica, never on a sleep.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from shoal import serve
from shoal.runtime.context import current_request
from shoal.serve.exceptions import RequestCancelledError
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(60)

WAIT_S = 60.0


@serve.deployment(max_ongoing_requests=50)
class Batched:
    """``handle`` batches by three; ``gate`` holds a running batch until ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.models: list[tuple[str, list[Any]]] = []
        self.counts: dict[str, int] = {"arrived": 0, "cancelled": 0, "batches": 0}
        self.changed = asyncio.Condition()
        self.gate = asyncio.Event()
        self.gate.set()

    async def _bump(self, key: str) -> None:
        async with self.changed:
            self.counts[key] += 1
            self.changed.notify_all()

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=WAIT_S)
    async def handle(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.models.append((current_request().multiplexed_model_id, list(items)))
        await self._bump("batches")
        await self.gate.wait()
        if "boom" in items:
            raise ValueError("boom in the batch")
        return [f"{item}!" for item in items]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=WAIT_S)
    async def count_to(self, limits: list[int]) -> AsyncIterator[list[Any]]:
        for i in range(max(limits)):
            yield [i if i < n else StopIteration for n in limits]

    async def call(self, item: Any) -> Any:
        await self._bump("arrived")
        try:
            return await self.handle(item)
        except asyncio.CancelledError:
            await self._bump("cancelled")
            raise

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=WAIT_S)
    async def read_bodies(self, requests: list[Request]) -> list[dict[str, int]]:
        bodies = [await request.json() for request in requests]  # each caller's body, read here
        return [{"doubled": body["n"] * 2, "batch": len(requests)} for body in bodies]

    async def __call__(self, request: Request) -> Any:
        if request.method == "POST":
            return await self.read_bodies(request)
        return await self.call(request.query_params["x"])

    async def wait_count(self, key: str, n: int) -> int:
        async with self.changed:
            await self.changed.wait_for(lambda: self.counts[key] >= n)
            return self.counts[key]

    def limit(self) -> int:
        return serve.get_replica_context().max_ongoing_requests

    def seen(self) -> list[list[Any]]:
        return self.batches

    def seen_models(self) -> list[tuple[str, list[Any]]]:
        return self.models

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


@serve.deployment(max_ongoing_requests=50, user_config={"max_batch_size": 10})
class Tunable:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.arrived = asyncio.Condition()
        self.n = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.handle.set_max_batch_size(config["max_batch_size"])

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=WAIT_S)
    async def handle(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        return items

    async def __call__(self, item: int) -> int:
        async with self.arrived:
            self.n += 1
            self.arrived.notify_all()
        return await self.handle(item)

    async def wait_arrived(self, n: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: self.n >= n)

    def state(self) -> dict[str, Any]:
        return {"max_batch_size": self.handle._get_max_batch_size(), "batches": self.batches}


def sizes(batches: list[list[Any]]) -> list[int]:
    return [len(b) for b in batches]


def test_handle_calls_are_batched(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_handles")
    responses = [h.call.remote(i) for i in range(6)]
    assert [r.result(timeout_s=30) for r in responses] == [f"{i}!" for i in range(6)]
    batches = h.seen.remote().result()
    assert sizes(batches) == [3, 3]
    assert sorted(x for b in batches for x in b) == list(range(6))
    assert h.limit.remote().result() == 50  # what @serve.batch checks its settings against


def test_http_requests_are_batched(deploy: Any) -> None:
    deploy(Batched.bind(), "batch_http", route_prefix="/batched")
    url = serve.get_http_url()
    assert url is not None

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            replies = await asyncio.gather(*(client.get("/batched", params={"x": f"h{i}"}) for i in range(3)))
        assert all(r.status_code == 200 for r in replies)
        return [r.text for r in replies]

    assert asyncio.run(main()) == ["h0!", "h1!", "h2!"]
    h = serve.get_deployment_handle("Batched", "batch_http")
    assert sizes(h.seen.remote().result()) == [3]


def test_the_batch_function_reads_each_http_request_body(deploy: Any) -> None:
    deploy(Batched.bind(), "batch_bodies", route_prefix="/bodies")
    url = serve.get_http_url()
    assert url is not None

    async def main() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            replies = await asyncio.gather(*(client.post("/bodies", json={"n": n}) for n in (1, 2, 3)))
        return [r.json() for r in replies]

    assert asyncio.run(main()) == [{"doubled": 2, "batch": 3}, {"doubled": 4, "batch": 3}, {"doubled": 6, "batch": 3}]


def test_an_exception_fails_the_whole_batch_and_the_replica_keeps_serving(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_errors")
    failing = [h.call.remote(x) for x in ("a", "boom", "b")]
    for response in failing:
        with pytest.raises(ValueError, match="boom in the batch"):
            response.result(timeout_s=30)
    assert [r.result(timeout_s=30) for r in [h.call.remote(x) for x in ("c", "d", "e")]] == ["c!", "d!", "e!"]


def test_a_cancelled_caller_leaves_its_pending_batch(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_cancel_pending")
    gone = h.call.remote("gone")
    h.wait_count.remote("arrived", 1).result(timeout_s=30)
    gone.cancel()
    h.wait_count.remote("cancelled", 1).result(timeout_s=30)
    with pytest.raises(RequestCancelledError):
        gone.result(timeout_s=30)
    rest = [h.call.remote(x) for x in ("a", "b", "c")]
    assert [r.result(timeout_s=30) for r in rest] == ["a!", "b!", "c!"]
    assert sorted(h.seen.remote().result()[0]) == ["a", "b", "c"]


def test_a_caller_cancelled_while_its_batch_runs_does_not_break_it(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_cancel_running")
    h.hold.remote().result()
    calls = {x: h.call.remote(x) for x in ("a", "b", "c")}
    h.wait_count.remote("batches", 1).result(timeout_s=30)
    calls["b"].cancel()
    h.wait_count.remote("cancelled", 1).result(timeout_s=30)
    h.release.remote().result()
    assert calls["a"].result(timeout_s=30) == "a!"
    assert calls["c"].result(timeout_s=30) == "c!"
    with pytest.raises(RequestCancelledError):
        calls["b"].result(timeout_s=30)


def test_a_client_that_disconnects_leaves_its_batch(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_disconnect", route_prefix="/gone")
    url = serve.get_http_url()
    assert url is not None
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /gone?x=left HTTP/1.1\r\nHost: x\r\n\r\n")
        h.wait_count.remote("arrived", 1).result(timeout_s=30)
    h.wait_count.remote("cancelled", 1).result(timeout_s=30)
    with httpx.Client(base_url=url, timeout=30) as client:
        rest = [h.call.remote("a"), h.call.remote("b")]
        reply = client.get("/gone", params={"x": "c"})
    assert reply.text == "c!"
    assert [r.result(timeout_s=30) for r in rest] == ["a!", "b!"]
    assert sorted(h.seen.remote().result()[0]) == ["a", "b", "c"]


def test_async_generators_stream_each_caller_its_items(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_stream")
    streams = [h.options(stream=True).count_to.remote(n) for n in (2, 4)]
    assert [list(s) for s in streams] == [[0, 1], [0, 1, 2, 3]]


def test_batches_are_split_by_multiplexed_model_id(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Batched.bind(), "batch_models")
    calls = [h.options(multiplexed_model_id=m).call.remote(f"{m}{i}") for i, m in enumerate("aab")]
    assert [c.result(timeout_s=30) for c in calls] == ["a0!", "a1!", "b2!"]
    assert sorted(h.seen_models.remote().result()) == [("a", ["a0", "a1"]), ("b", ["b2"])]


def test_reconfigure_changes_max_batch_size_live(deploy: Any) -> None:
    h: DeploymentHandle[Any] = deploy(Tunable.bind(), "batch_tunable")
    assert h.state.remote().result()["max_batch_size"] == 10
    waiting = [h.remote(i) for i in range(4)]
    h.wait_arrived.remote(4).result(timeout_s=30)
    assert h.state.remote().result()["batches"] == []  # 4 of 10, and the wait is long
    h = deploy(Tunable.options(user_config={"max_batch_size": 2}).bind(), "batch_tunable")
    assert [r.result(timeout_s=30) for r in waiting] == [0, 1, 2, 3]
    state = h.state.remote().result()
    assert state["max_batch_size"] == 2
    assert sizes(state["batches"]) == [2, 2]


def test_local_testing_mode(serve_instance: Any) -> None:
    h: DeploymentHandle[Any] = serve.run(Batched.bind(), name="batch_local", _local_testing_mode=True)
    responses = [h.call.remote(i) for i in range(6)]
    assert [r.result(timeout_s=30) for r in responses] == [f"{i}!" for i in range(6)]
    assert sizes(h.seen.remote().result()) == [3, 3]
    streams = [h.options(stream=True).count_to.remote(n) for n in (1, 3)]
    assert [list(s) for s in streams] == [[0], [0, 1, 2]]

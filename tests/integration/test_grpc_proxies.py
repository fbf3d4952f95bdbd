"""gRPC with several proxies, a proxy that dies, and draining at shutdown (one instance, two proxies)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import psutil
import pytest
from grpc_protos import stubs
from helpers import Gate, live_children, wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return stubs.modules(tmp_path_factory.mktemp("stubs"))


def _greeter(pb2: Any) -> Any:
    @serve.deployment(max_ongoing_requests=8)
    class Greeter:
        def __init__(self, gate: Any) -> None:
            self.gate = gate

        def Hello(self, request: Any) -> Any:
            return pb2.HelloReply(message=f"hello {request.name}", pid=os.getpid())

        async def Block(self, request: Any) -> Any:
            await self.gate.arrive.remote(request.name)
            await self.gate.wait.remote(request.name)
            return pb2.HelloReply(message="released")

    return Greeter


@pytest.fixture(scope="module")
def grpc_url(pb: tuple[Any, Any]) -> Iterator[str]:
    assert not live_children(), "a previous module left processes behind"
    serve.start(
        http_options={"port": 0, "num_proxies": 2},
        grpc_options={"port": 0, "grpc_servicer_functions": [stubs.SERVICER_FUNCTION]},
    )
    gate = serve.run(Gate.bind(), name="gate", route_prefix="/gate")
    serve.run(_greeter(pb[0]).bind(gate), name="greeter", route_prefix="/")
    url = serve.get_grpc_url()
    assert url is not None
    yield url
    serve.shutdown()  # normally already done by the last test
    wait_until(lambda: not live_children(), 15, "no child processes after serve.shutdown()")


GREETER = (("application", "greeter"),)


def _proxy_pids() -> list[int]:
    return [p.pid for p in serve.status().proxy_processes if str(getattr(p.status, "value", p.status)) == "HEALTHY" and p.pid]


def _hello(url: str, pb: Any, name: str = "x") -> str:
    """One call on a fresh connection (so the kernel picks a proxy again)."""
    with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = pb[1].GreeterStub(channel).Hello(pb[0].HelloRequest(name=name), metadata=GREETER, timeout=10)
    return str(reply.message)


def _serves(url: str, pb: Any) -> bool:
    try:
        return _hello(url, pb) == "hello x"
    except grpc.RpcError:
        return False


def test_every_proxy_serves_grpc_and_a_killed_one_is_replaced(grpc_url: str, pb: Any) -> None:
    first, second = wait_until(lambda: _proxy_pids() if len(_proxy_pids()) == 2 else None, 30, "two proxies")
    # Kill each proxy in turn: each time the other one
    # (the first time the original, the second time the replacement) serves gRPC alone.
    for victim in (first, second):
        psutil.Process(victim).kill()
        wait_until(lambda victim=victim: victim not in _proxy_pids(), 15, "the killed proxy is no longer healthy")
        assert wait_until(lambda: _serves(grpc_url, pb), 30, "gRPC served by the proxy left")
        wait_until(lambda: len(_proxy_pids()) == 2, 30, "the killed proxy replaced")
    assert not {first, second} & set(_proxy_pids())
    assert all(_hello(grpc_url, pb, str(i)) == f"hello {i}" for i in range(6))


def test_sigterm_drains_grpc_calls_in_flight(grpc_url: str, pb: Any) -> None:
    """SIGTERM (an orchestrator stopping the proxies): new calls get UNAVAILABLE, the call in
    flight finishes, then the proxies exit (and the supervisor restarts them)."""
    gate = serve.get_app_handle("gate")
    outcome: dict[str, Any] = {}

    async def held_call() -> None:
        async with grpc.aio.insecure_channel(grpc_url) as channel:
            stub = pb[1].GreeterStub(channel)
            outcome["reply"] = (await stub.Block(pb[0].HelloRequest(name="in-flight"), metadata=GREETER,
                                                 timeout=60)).message

    caller = threading.Thread(target=lambda: asyncio.run(held_call()))
    caller.start()
    gate.arrived.remote("in-flight").result(timeout_s=15)
    proxies = wait_until(lambda: _proxy_pids() if len(_proxy_pids()) == 2 else None, 30, "two proxies")
    for pid in proxies:
        psutil.Process(pid).terminate()

    def refused() -> bool:
        try:
            _hello(grpc_url, pb)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    wait_until(refused, 30, "new gRPC calls refused while the proxies drain")
    gate.open.remote("in-flight").result(timeout_s=15)
    caller.join(30)
    assert outcome.get("reply") == "released"
    wait_until(lambda: not set(proxies) & {p.pid for p in psutil.Process().children(recursive=True)}, 30,
               "the drained proxies exited")
    assert wait_until(lambda: _serves(grpc_url, pb), 30, "gRPC served again by the restarted proxies")

"""The gRPC ingress through a running instance, with a real grpcio client.

One instance for the module (two replicas of the Greeter app, a second app for metadata
routing, a Gate to hold calls); the stubs are generated at test time from
``tests/grpc_protos/greeter.proto`` into a temporary directory that the instance imports.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_protos import stubs
from helpers import Gate, live_children, wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return stubs.modules(tmp_path_factory.mktemp("stubs"))


def _greeter(pb2: Any) -> Any:
    from shoal.serve.exceptions import gRPCStatusError

    @serve.deployment(num_replicas=2, max_ongoing_requests=8)
    class Greeter:
        def __init__(self, gate: Any) -> None:
            self.gate = gate

        async def Hello(self, request: Any) -> Any:
            return pb2.HelloReply(message=f"hello {request.name}", pid=os.getpid())

        async def Stream(self, request: Any) -> Any:
            for i in range(request.count):
                yield pb2.HelloReply(message=f"{request.name} {i}", pid=os.getpid())

        def Fail(self, request: Any) -> Any:
            raise ValueError(f"no greeting for {request.name}")

        async def Block(self, request: Any) -> Any:
            try:
                await self.gate.arrive.remote(request.name)
                await self.gate.wait.remote(request.name)
            except asyncio.CancelledError:
                await self.gate.arrive.remote(f"cancelled:{request.name}")
                raise
            return pb2.HelloReply(message="released")

        def Context(self, request: Any, grpc_context: Any) -> Any:
            grpc_context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            grpc_context.set_details(f"{request.name} exists")
            grpc_context.set_trailing_metadata([("greeting", "set by the replica")])
            return pb2.HelloReply(message="ignored: the status is not OK")

        def StatusError(self, request: Any) -> Any:
            raise gRPCStatusError(KeyError(request.name), grpc.StatusCode.PERMISSION_DENIED, "not yours")

        def Meta(self, request: Any) -> Any:
            from shoal.runtime.context import current_request

            ctx = current_request()
            return pb2.HelloReply(message=f"{serve.get_multiplexed_model_id()}|{ctx.request_id}")

        async def Collect(self, requests: Any) -> Any:
            names = [request.name async for request in requests]
            return pb2.HelloReply(message=",".join(names))

        async def Chat(self, requests: Any) -> Any:
            async for request in requests:
                yield pb2.HelloReply(message=f"echo {request.name}")

        def Die(self, request: Any) -> Any:
            os._exit(1)

    return Greeter


def _tight(pb2: Any) -> Any:
    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
    class Tight:
        def __init__(self, gate: Any) -> None:
            self.gate = gate

        async def Block(self, request: Any) -> Any:
            await self.gate.arrive.remote(request.name)
            await self.gate.wait.remote(request.name)
            return pb2.HelloReply(message="released")

    return Tight


def _other(pb2: Any) -> Any:
    @serve.deployment
    class Other:
        def Hello(self, request: Any) -> Any:
            return pb2.HelloReply(message=f"other {request.name}")

    return Other


@pytest.fixture(scope="module")
def grpc_url(pb: tuple[Any, Any]) -> Iterator[str]:
    pb2, _ = pb
    assert not live_children(), "a previous module left processes behind"
    serve.start(
        http_options={"port": 0},
        grpc_options={"port": 0, "grpc_servicer_functions": [stubs.SERVICER_FUNCTION], "request_timeout_s": 5},
    )
    gate = serve.run(Gate.bind(), name="gate", route_prefix="/gate")
    serve.run_many([
        serve.RunTarget(_greeter(pb2).bind(gate), name="greeter", route_prefix="/greeter"),
        serve.RunTarget(_other(pb2).bind(), name="other", route_prefix="/other"),
        serve.RunTarget(_tight(pb2).bind(gate), name="tight", route_prefix="/tight"),
    ])
    url = serve.get_grpc_url()
    assert url is not None
    yield url
    serve.shutdown()
    wait_until(lambda: not live_children(), 15, "no child processes after serve.shutdown()")


@pytest.fixture
def gate() -> Any:
    return serve.get_app_handle("gate")


@pytest.fixture
def channel(grpc_url: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_url) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel, pb: tuple[Any, Any]) -> Any:
    return pb[1].GreeterStub(channel)


def _req(pb: tuple[Any, Any], name: str = "shoal", count: int = 0) -> Any:
    return pb[0].HelloRequest(name=name, count=count)


GREETER = (("application", "greeter"),)


def test_unary_call_with_application_metadata(stub: Any, pb: Any) -> None:
    reply, call = stub.Hello.with_call(_req(pb), metadata=GREETER, timeout=10)
    assert reply.message == "hello shoal"
    trailing = dict(call.trailing_metadata())
    assert trailing["request_id"]  # Ray echoes the request id in the trailing metadata


def test_request_id_given_is_echoed_and_seen_by_the_replica(stub: Any, pb: Any) -> None:
    reply, call = stub.Meta.with_call(
        _req(pb), metadata=(*GREETER, ("request_id", "rid-42"), ("multiplexed_model_id", "model-a")), timeout=10,
    )
    assert reply.message == "model-a|rid-42"
    assert dict(call.trailing_metadata())["request_id"] == "rid-42"


def test_metadata_routes_between_two_applications(stub: Any, pb: Any) -> None:
    assert stub.Hello(_req(pb), metadata=(("application", "other"),), timeout=10).message == "other shoal"
    assert stub.Hello(_req(pb), metadata=GREETER, timeout=10).message == "hello shoal"


def test_unknown_application_is_not_found(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Hello(_req(pb), metadata=(("application", "nope"),), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == (
        "Application 'nope' not found. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."
    )


def test_missing_application_metadata_with_several_apps_is_not_found(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Hello(_req(pb), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("Application metadata not set.")


def test_server_streaming(stub: Any, pb: Any) -> None:
    replies = list(stub.Stream(_req(pb, "tick", 5), metadata=GREETER, timeout=10))
    assert [r.message for r in replies] == [f"tick {i}" for i in range(5)]


def test_user_exception_is_internal_without_traceback(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Fail(_req(pb, "bob"), metadata=GREETER, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "ValueError: no greeting for bob"
    assert "Traceback" not in info.value.details()


def test_missing_method_is_internal(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Missing(_req(pb), metadata=GREETER, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL


def test_grpc_context_round_trip(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Context(_req(pb, "alice"), metadata=GREETER, timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.details() == "alice exists"
    trailing = dict(info.value.trailing_metadata())
    assert trailing["greeting"] == "set by the replica"


def test_grpc_status_error_gives_its_code_and_details(stub: Any, pb: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.StatusError(_req(pb), metadata=GREETER, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "not yours"


def test_client_streaming(stub: Any, pb: Any) -> None:
    reply = stub.Collect(iter([_req(pb, n) for n in "abc"]), metadata=GREETER, timeout=10)
    assert reply.message == "a,b,c"
    assert stub.Collect(iter([]), metadata=GREETER, timeout=10).message == ""


def test_bidirectional_streaming(grpc_url: str, pb: Any) -> None:
    """Each reply comes before the next request is sent: the stream really goes both ways."""

    async def main() -> list[str]:
        async with grpc.aio.insecure_channel(grpc_url) as ch:
            call = pb[1].GreeterStub(ch).Chat(metadata=GREETER, timeout=10)
            got = []
            for name in ("x", "y", "z"):
                await call.write(_req(pb, name))
                got.append((await call.read()).message)
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            return got

    assert asyncio.run(main()) == ["echo x", "echo y", "echo z"]


def test_two_replicas_share_concurrent_calls(grpc_url: str, pb: Any) -> None:
    async def main() -> set[int]:
        async with grpc.aio.insecure_channel(grpc_url) as ch:
            s = pb[1].GreeterStub(ch)
            replies = await asyncio.gather(*(s.Hello(_req(pb), metadata=GREETER, timeout=10) for _ in range(40)))
            return {r.pid for r in replies}

    assert len(asyncio.run(main())) == 2


def test_client_cancellation_cancels_the_replica_coroutine(stub: Any, pb: Any, gate: Any) -> None:
    future = stub.Block.future(_req(pb, "cancel-me"), metadata=GREETER, timeout=30)
    gate.arrived.remote("cancel-me").result(timeout_s=15)
    future.cancel()
    assert gate.arrived.remote("cancelled:cancel-me").result(timeout_s=15) == 1


def test_client_deadline_is_deadline_exceeded_and_cancels_the_replica(stub: Any, pb: Any, gate: Any) -> None:
    future = stub.Block.future(_req(pb, "deadline"), metadata=GREETER, timeout=2)
    gate.arrived.remote("deadline").result(timeout_s=15)
    with pytest.raises(grpc.RpcError) as info:
        future.result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gate.arrived.remote("cancelled:deadline").result(timeout_s=15) == 1


def test_request_timeout_s_is_deadline_exceeded_and_cancels_the_replica(stub: Any, pb: Any, gate: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Block(_req(pb, "server-timeout"), metadata=GREETER, timeout=30)  # request_timeout_s=5
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == "Request timed out after 5.0s."
    assert gate.arrived.remote("cancelled:server-timeout").result(timeout_s=15) == 1


def test_list_applications_and_healthz(channel: grpc.Channel) -> None:
    from shoal.serve.generated import serve_pb2, serve_pb2_grpc

    api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
    names = api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=10).application_names
    assert {"greeter", "other", "gate", "tight"} <= set(names)
    assert api.Healthz(serve_pb2.HealthzRequest(), timeout=10).message == "success"


def test_standard_health_service(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reply = health.Check(health_pb2.HealthCheckRequest(service="shoaltest.Greeter"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_reflection_lists_the_services(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"shoaltest.Greeter", "ray.serve.RayServeAPIService", "grpc.health.v1.Health"} <= services
    greeter = database.FindFileContainingSymbol("shoaltest.Greeter")
    assert greeter.package == "shoaltest"


def test_grpc_metrics_are_recorded(stub: Any, pb: Any) -> None:
    from helpers import sample_value, scrape
    from ray_serve_metrics import family_of

    stub.Hello(_req(pb), metadata=GREETER, timeout=10)

    def counted() -> float | None:
        return sample_value(scrape(), "ray_serve_num_grpc_requests_total", application="greeter",
                            method="/shoaltest.Greeter/Hello", status_code="OK")

    assert wait_until(counted, 10, "the gRPC request counted")
    with pytest.raises(grpc.RpcError):
        stub.Fail(_req(pb), metadata=GREETER, timeout=10)

    def all_series() -> set[str] | None:
        names = {name for name, _ in scrape() if "grpc" in name}
        wanted = {"ray_serve_num_grpc_error_requests_total", "ray_serve_num_deployment_grpc_error_requests_total",
                  "ray_serve_grpc_request_latency_ms_bucket", "ray_serve_num_ongoing_grpc_requests"}
        return names if wanted <= names else None

    wait_until(all_series, 10, "every gRPC series exported")
    for (name, labels), _value in scrape().items():
        if "grpc" in name:  # Ray's names, with exactly Ray's labels
            metric = family_of(name)
            assert metric is not None and metric.labels is not None, name
            assert {k for k, _ in labels} - {"le"} == set(metric.labels), name


def test_backpressure_is_resource_exhausted(grpc_url: str, pb: Any, gate: Any) -> None:
    """One call runs (max_ongoing_requests=1), one may wait (max_queued_requests=1): of two
    more, one is refused at once, and the other runs once the first ends."""
    tight = (("application", "tight"),)

    async def main() -> tuple[Any, str]:
        async with grpc.aio.insecure_channel(grpc_url) as ch:
            s = pb[1].GreeterStub(ch)
            running = asyncio.ensure_future(s.Block(_req(pb, "bp"), metadata=tight, timeout=30))
            await asyncio.to_thread(lambda: gate.arrived.remote("bp").result(timeout_s=15))
            more = [asyncio.ensure_future(s.Block(_req(pb, "bp"), metadata=tight, timeout=30)) for _ in range(2)]
            done, pending = await asyncio.wait(more, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.to_thread(lambda: gate.open.remote("bp").result(timeout_s=15))
            assert len(done) == 1 and len(pending) == 1
            assert (await running).message == (await pending.pop()).message == "released"
            return done.pop().exception(), "ok"

    error, _ = asyncio.run(main())
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests" in (error.details() or "")


def test_access_line_per_call(stub: Any, pb: Any) -> None:
    import psutil
    from helpers import run_dir_of, supervisor_of

    stub.Meta(_req(pb), metadata=(*GREETER, ("request_id", "access-rid")), timeout=10)
    proxy_log = run_dir_of(supervisor_of(psutil.Process())) / "logs" / "proxy_127.0.0.1.log"

    def line() -> str | None:
        text = proxy_log.read_text() if proxy_log.exists() else ""
        return next((x for x in text.splitlines() if "access-rid" in x), None)

    found = wait_until(line, 10, "the call's access line")
    assert "/shoaltest.Greeter/Meta greeter OK" in found


def test_failed_deployment_is_unavailable(stub: Any, pb: Any) -> None:
    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("cannot start")

    with pytest.raises(RuntimeError):
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(_req(pb), metadata=(("application", "broken"),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot start" not in (info.value.details() or "")  # no traceback
    finally:
        serve.delete("broken")


def test_replica_dying_mid_call_is_internal(stub: Any, pb: Any) -> None:
    """Last in the module: it kills one of the Greeter's replicas."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Die(_req(pb), metadata=GREETER, timeout=30)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "died" in (info.value.details() or "")

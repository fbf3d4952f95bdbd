"""proxy/grpc_builtin: Ray's RayServeAPIService, grpc.health.v1 and reflection, on a real
grpc.aio server (port 0) driven by a real grpcio client in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shoal.proxy.grpc_builtin import (
    API_SERVICE_NAME,
    BUILTIN_METHOD_PREFIXES,
    DRAINING_MESSAGE,
    HEALTH_SERVICE_NAME,
    REFLECTION_SERVICE_NAME,
    BuiltinServices,
    add_builtin_services,
)
from shoal.serve.generated import serve_pb2, serve_pb2_grpc

pytestmark = pytest.mark.timeout(60)

USER_SERVICE = "ray.serve.UserDefinedService"
CALL_TIMEOUT_S = 10.0


class Health:
    """A switchable is_healthy() for the services."""

    def __init__(self) -> None:
        self.healthy = True
        self.message = DRAINING_MESSAGE

    def __call__(self) -> bool:
        return self.healthy


@asynccontextmanager
async def serving(
    health: Health, apps: list[str] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[grpc.aio.Channel, BuiltinServices]]:
    server = grpc.aio.server()
    names = ["app1", "app2"] if apps is None else apps
    kwargs.setdefault("reflection_service_names", None)
    services = add_builtin_services(
        server, list_applications=lambda: list(names), is_healthy=health,
        unhealthy_message=lambda: health.message, **kwargs,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, services
    finally:
        services.close()
        await server.stop(None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_list_applications_and_healthz_answer_as_rays_proxy_when_healthy() -> None:
    async def test() -> None:
        async with serving(Health(), apps=["app1", "app2"]) as (channel, _):
            api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
            call = api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=CALL_TIMEOUT_S)
            assert list((await call).application_names) == ["app1", "app2"]
            assert await call.code() == grpc.StatusCode.OK
            healthz = await api.Healthz(serve_pb2.HealthzRequest(), timeout=CALL_TIMEOUT_S)
            assert healthz.message == "success"

    run(test)


def test_list_applications_asks_for_the_names_on_each_call() -> None:
    async def test() -> None:
        apps: list[str] = []
        async with serving(Health(), apps=apps) as (channel, _):
            api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
            assert list((await api.ListApplications(serve_pb2.ListApplicationsRequest())).application_names) == []
            apps.append("late")
            assert list((await api.ListApplications(serve_pb2.ListApplicationsRequest())).application_names) == ["late"]

    run(test)


@pytest.mark.parametrize("message", [DRAINING_MESSAGE, "Route table is not populated yet."])
def test_unhealthy_proxy_answers_unavailable_with_the_reason(message: str) -> None:
    async def test() -> None:
        health = Health()
        health.healthy, health.message = False, message
        async with serving(health) as (channel, _):
            api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
            for rpc, request in ((api.Healthz, serve_pb2.HealthzRequest()),
                                 (api.ListApplications, serve_pb2.ListApplicationsRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await rpc(request, timeout=CALL_TIMEOUT_S)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == message

    run(test)


def test_default_unhealthy_message_is_rays_draining_message() -> None:
    async def test() -> None:
        server = grpc.aio.server()
        add_builtin_services(server, list_applications=list, is_healthy=lambda: False, reflection_service_names=None)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await serve_pb2_grpc.RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest())
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "This node is being drained.")
        finally:
            await server.stop(None)

    run(test)


def test_health_check_serves_known_services_and_follows_is_healthy() -> None:
    async def test() -> None:
        health = Health()
        async with serving(health, service_names=[USER_SERVICE]) as (channel, _):
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
                return reply.status

            for service in ("", USER_SERVICE, API_SERVICE_NAME, HEALTH_SERVICE_NAME):
                assert await status(service) == health_pb2.HealthCheckResponse.SERVING
            health.healthy = False
            for service in ("", USER_SERVICE):
                assert await status(service) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await status("no.such.Service")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(test)


def test_reflection_names_are_known_to_the_health_service() -> None:
    async def test() -> None:
        async with serving(Health(), reflection_service_names=[USER_SERVICE]) as (channel, _):
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=USER_SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run(test)


def test_health_watch_sends_changes_and_ends_on_close() -> None:
    async def test() -> None:
        health = Health()
        async with serving(health) as (channel, services):
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
            health.healthy = False
            services.health_changed()
            assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            services.close()
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK

    run(test)


def test_health_watch_notices_a_change_without_being_told() -> None:
    """Within WATCH_INTERVAL_S (1 s) plus the client's read, bounded by the test's timeout."""

    async def test() -> None:
        health = Health()
        async with serving(health) as (channel, _):
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
            health.healthy = False
            reply = await asyncio.wait_for(stream.read(), 10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stream.cancel()

    run(test)


def test_health_watch_of_an_unknown_service_says_so() -> None:
    async def test() -> None:
        async with serving(Health()) as (channel, _):
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            stream.cancel()

    run(test)


async def _reflection(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_S)
    replies = [reply async for reply in call]
    assert len(replies) == 1
    return replies[0]


def test_reflection_lists_the_users_services_and_the_builtins() -> None:
    async def test() -> None:
        async with serving(Health(), reflection_service_names=[USER_SERVICE]) as (channel, _):
            reply = await _reflection(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
            names = [service.name for service in reply.list_services_response.service]
            assert sorted(names) == sorted([USER_SERVICE, API_SERVICE_NAME, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME])
            # and describes them: the file that defines the user's service
            reply = await _reflection(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=USER_SERVICE))
            assert reply.file_descriptor_response.file_descriptor_proto

    run(test)


def test_no_reflection_when_not_asked() -> None:
    async def test() -> None:
        async with serving(Health(), reflection_service_names=None) as (channel, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _reflection(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(test)


def test_builtin_method_prefixes_cover_the_builtins_and_no_user_service() -> None:
    from grpc_health.v1 import health_pb2 as health
    from grpc_reflection.v1alpha import reflection_pb2 as refl

    builtin_services = [
        serve_pb2.DESCRIPTOR.services_by_name["RayServeAPIService"],
        health.DESCRIPTOR.services_by_name["Health"],
        refl.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    for service in builtin_services:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            assert path.startswith(BUILTIN_METHOD_PREFIXES), path
    for name in ("UserDefinedService", "FruitService", "RayServeBenchmarkService"):
        service = serve_pb2.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            assert not f"/{service.full_name}/{method.name}".startswith(BUILTIN_METHOD_PREFIXES)
    # a user service whose name merely starts like a built-in one is not claimed
    assert not "/ray.serve.RayServeAPIServiceX/Healthz".startswith(BUILTIN_METHOD_PREFIXES)

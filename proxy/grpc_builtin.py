"""The services the gRPC proxy answers itself, beside the users' (which go to replicas).

- Ray Serve's ``ray.serve.RayServeAPIService``: ``ListApplications`` answers the running
  applications' names and ``Healthz`` answers ``success``, both with status OK and details
  ``success``; while the proxy is unhealthy (draining, or before its first route table) both end
  with ``UNAVAILABLE`` and the reason as details, as Ray's proxy does.
- The standard ``grpc.health.v1.Health`` (``Check``/``Watch``): "" and each known service are
  ``SERVING``, or ``NOT_SERVING`` while the proxy is unhealthy; another name is ``NOT_FOUND``
  (``SERVICE_UNKNOWN`` for ``Watch``). A ``Watch`` stream sends the status again when it changes:
  at once after ``BuiltinServices.health_changed()``, otherwise within ``WATCH_INTERVAL_S``.
- Server reflection (``grpc.reflection.v1alpha``), when ``gRPCOptions.enable_reflection`` asks for
  it, listing the users' services and these.

``add_builtin_services`` adds them to a ``grpc.aio.Server`` before it starts. They are ordinary
grpcio handlers: the proxy's routing of user methods must leave the paths under
``BUILTIN_METHOD_PREFIXES`` alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_reflection.v1alpha import reflection

from shoal.serve.generated import serve_pb2, serve_pb2_grpc

__all__ = [
    "API_SERVICE_NAME",
    "BUILTIN_METHOD_PREFIXES",
    "DRAINING_MESSAGE",
    "HEALTHY_MESSAGE",
    "HEALTH_SERVICE_NAME",
    "REFLECTION_SERVICE_NAME",
    "BuiltinServices",
    "add_builtin_services",
]

API_SERVICE_NAME = serve_pb2.DESCRIPTOR.services_by_name["RayServeAPIService"].full_name  # ray.serve.RayServeAPIService
REFLECTION_SERVICE_NAME: str = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection

BUILTIN_METHOD_PREFIXES: tuple[str, ...] = (
    f"/{API_SERVICE_NAME}/",
    f"/{HEALTH_SERVICE_NAME}/",
    f"/{REFLECTION_SERVICE_NAME}/",
)

HEALTHY_MESSAGE = "success"  # Ray's HEALTHY_MESSAGE
DRAINING_MESSAGE = "This node is being drained."  # Ray's DRAINING_MESSAGE
WATCH_INTERVAL_S = 1.0  # a Watch stream re-reads is_healthy() at least this often

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

Context = grpc.aio.ServicerContext[Any, Any]


class BuiltinServices:
    """The built-in services of one gRPC server (what ``add_builtin_services`` added).

    ``health_changed()``: ``is_healthy()`` may have changed (the proxy started draining, got its
    first routes): the ``Watch`` streams re-read it now. ``close()``: end the ``Watch`` streams
    (before ``server.stop(grace)``, which would otherwise wait the grace out for them).
    """

    def __init__(
        self,
        list_applications: Callable[[], list[str]],
        is_healthy: Callable[[], bool],
        unhealthy_message: Callable[[], str],
        service_names: Sequence[str],
    ) -> None:
        self._list_applications = list_applications
        self._is_healthy = is_healthy
        self._unhealthy_message = unhealthy_message
        self.service_names = frozenset(("", API_SERVICE_NAME, HEALTH_SERVICE_NAME, *service_names))
        self._changed = asyncio.Event()  # set, then replaced, on each health_changed()
        self._closed = False

    def health_changed(self) -> None:
        """Wakes the ``Watch`` streams to re-read ``is_healthy()`` (call on the server's loop)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Ends the ``Watch`` streams (each ends with status OK); new ones end at once."""
        self._closed = True
        self.health_changed()

    def _health(self) -> tuple[bool, str]:
        if self._is_healthy():
            return True, HEALTHY_MESSAGE
        return False, self._unhealthy_message()

    # -- ray.serve.RayServeAPIService --

    async def list_applications(
        self, request: serve_pb2.ListApplicationsRequest, context: Context
    ) -> serve_pb2.ListApplicationsResponse:
        healthy, message = self._health()
        _set_status(context, healthy, message)
        return serve_pb2.ListApplicationsResponse(application_names=list(self._list_applications()))

    async def healthz(self, request: serve_pb2.HealthzRequest, context: Context) -> serve_pb2.HealthzResponse:
        healthy, message = self._health()
        _set_status(context, healthy, message)
        return serve_pb2.HealthzResponse(message=message)

    # -- grpc.health.v1.Health --

    def _serving_status(self, service: str) -> int:
        if service not in self.service_names:
            return _SERVICE_UNKNOWN
        return _SERVING if self._is_healthy() else _NOT_SERVING

    async def check(self, request: health_pb2.HealthCheckRequest, context: Context) -> health_pb2.HealthCheckResponse:
        status = self._serving_status(request.service)
        if status == _SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last_status = None
        while not self._closed:
            status = self._serving_status(request.service)
            if status != last_status:
                yield health_pb2.HealthCheckResponse(status=status)
                last_status = status
            try:
                await asyncio.wait_for(self._changed.wait(), WATCH_INTERVAL_S)
            except TimeoutError:
                pass


def _set_status(context: Context, healthy: bool, message: str) -> None:
    """Ray's status for its API service: OK or UNAVAILABLE, the message as details."""
    context.set_code(grpc.StatusCode.OK if healthy else grpc.StatusCode.UNAVAILABLE)
    context.set_details(message)


class _ApiServicer(serve_pb2_grpc.RayServeAPIServiceServicer):  # type: ignore[misc]
    def __init__(self, services: BuiltinServices) -> None:
        self.ListApplications = services.list_applications
        self.Healthz = services.healthz


class _HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, services: BuiltinServices) -> None:
        self.Check = services.check  # type: ignore[method-assign]
        self.Watch = services.watch  # type: ignore[method-assign]


def add_builtin_services(
    server: grpc.aio.Server,
    *,
    list_applications: Callable[[], list[str]],
    is_healthy: Callable[[], bool],
    reflection_service_names: list[str] | None,
    unhealthy_message: Callable[[], str] = lambda: DRAINING_MESSAGE,
    service_names: Sequence[str] = (),
) -> BuiltinServices:
    """Adds the built-in services to ``server`` (before ``server.start()``).

    ``list_applications()``: the names ``ListApplications`` answers. ``is_healthy()``: False
    while the proxy should not get traffic; ``unhealthy_message()`` then says why (Ray's
    messages: ``DRAINING_MESSAGE``, "Route table is not populated yet."). Both are called on the
    server's event loop for each call, so they must be quick and must not block.
    ``reflection_service_names``: None for no reflection (``enable_reflection=False``), else the
    users' service names to list (their descriptors must be in the default descriptor pool, as
    importing their ``_pb2`` modules puts them). ``service_names``: the users' services, which the
    health service also answers for (``reflection_service_names`` counts too).
    """
    known = [*service_names, *(reflection_service_names or ())]
    services = BuiltinServices(list_applications, is_healthy, unhealthy_message, known)
    serve_pb2_grpc.add_RayServeAPIServiceServicer_to_server(_ApiServicer(services), server)
    health_pb2_grpc.add_HealthServicer_to_server(_HealthServicer(services), server)
    if reflection_service_names is not None:
        listed = sorted({*reflection_service_names, API_SERVICE_NAME, HEALTH_SERVICE_NAME})
        reflection.enable_server_reflection([*listed, REFLECTION_SERVICE_NAME], server)
    return services

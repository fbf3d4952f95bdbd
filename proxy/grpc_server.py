"""GrpcIngress: the proxy's gRPC server (Ray Serve's gRPC proxy), beside its HTTP server.

The RPCs are those the configured servicer functions register; the supervisor discovered them
(``runtime/grpc_services.py``) and the proxy registers each path with a handler that takes and
returns raw bytes: the proxy never imports the user's message classes and never parses a
message. A call:

- picks its application from the ``application`` metadata (any value, or none, when exactly one
  application runs, as in Ray), else NOT_FOUND with Ray's message;
- takes ``request_id`` (else one is made) and ``multiplexed_model_id`` from the metadata;
- is sent (msgpack: the call's plain facts and the request's bytes, ``grpc_call.request_payload``)
  to the application's ingress through its router (power of two choices), whose replica calls
  the method named as the RPC; a server-streaming RPC's items are written as they come (and
  ACKed, as HTTP responses are);
- ends with the status the replica reports (what the user set on ``grpc_context``, or a
  ``gRPCStatusError``'s, or INTERNAL for any other exception, without its traceback), plus the
  user's trailing metadata and ``request_id``, as Ray sends it.

Statuses decided here, as Ray 2.60's proxy: backpressure RESOURCE_EXHAUSTED; an unavailable
deployment (or the proxy draining) UNAVAILABLE; ``request_timeout_s`` or the client's deadline
DEADLINE_EXCEEDED (the replica's work is cancelled); the client cancelling cancels the replica's
coroutine; a replica that died with the call INTERNAL (Ray: the actor error, an INTERNAL).
Client-streaming and bidirectional RPCs (Ray 2.60 serves them too) pass the client's messages
on one at a time as the replica asks for them (PULL; ``_RequestPump``), so a client's stream is
read no faster than the method takes it; the method gets a ``gRPCInputStream`` (Ray's).

Every call is counted in the gRPC series (``proxy.metrics`` with protocol ``gRPC``) and gets an
access line (``<method path> <application> <status name> <latency>``) when those are on. As in
Ray, ``route`` is the application's name (Ray's gRPC ``route_path``); a call naming no running
application is counted with ``route`` "".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from shoal.proxy.access import AccessWriter
from shoal.proxy.metrics import IngressMetrics
from shoal.runtime import grpc_call, grpc_services, wire
from shoal.runtime.api import CallRouter, RoutingRuntime
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from shoal.runtime.grpc_services import MethodSpec
from shoal.runtime.handle import new_request_id
from shoal.runtime.reply import END, PULL, ReplySink
from shoal.runtime.router import Call, Router

if TYPE_CHECKING:
    from shoal.proxy.grpc_builtin import BuiltinServices

logger = logging.getLogger("shoal.proxy")

__all__ = ["GrpcIngress", "GrpcOptions", "build_server"]

MAX_DETAILS_CHARS = 4096  # Ray truncates status details (they travel in HTTP/2 trailers)
_NO_DEADLINE = contextlib.nullcontext()
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_LIST_APPLICATIONS = "/ray.serve.RayServeAPIService/ListApplications"


@dataclass(frozen=True)
class GrpcOptions:
    """What the proxy's gRPC server needs: where to listen, the RPCs, the limits."""

    host: str
    port: int
    methods: tuple[MethodSpec, ...]
    request_timeout_s: float | None = None
    enable_reflection: bool = True

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GrpcOptions:
        return cls(
            str(spec["host"]), int(spec["port"]),
            tuple(MethodSpec.from_wire(m) for m in spec["methods"]),
            spec.get("request_timeout_s"), bool(spec.get("enable_reflection", True)),
        )


@dataclass(frozen=True, slots=True)
class _Target:
    app_name: str
    ingress: str
    prefix: str


class _Status(Exception):
    """A call ends with this status before (or instead of) reaching a replica."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _truncate(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    notice = "... [truncated]"
    return details[: MAX_DETAILS_CHARS - len(notice)] + notice


class GrpcIngress:
    def __init__(
        self,
        runtime: RoutingRuntime,
        options: GrpcOptions,
        metrics: IngressMetrics,
        access: AccessWriter | None = None,
    ) -> None:
        self.runtime = runtime
        self.options = options
        self.metrics = metrics
        self.access = access
        self.draining = False
        self.calls = 0  # calls being answered
        self.builtins: BuiltinServices | None = None  # set by build_server
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the application's routes ------------------------------------------------------------

    def application_names(self) -> list[str]:
        """The applications a client may name (ListApplications)."""
        return sorted({r.app_name for r in self.runtime.snapshot.routes.values()})

    def is_healthy(self) -> bool:
        """Healthz and health checks: serving unless draining or before the first route table."""
        return not self.draining and self.runtime.snapshot.version > 0

    def unhealthy_message(self) -> str:
        return "This node is being drained." if self.draining else "Route table is not populated yet."

    def _target(self, app_name: str) -> _Target:
        routes = self.runtime.snapshot.routes
        apps = {r.app_name: (prefix, r) for prefix, r in routes.items()}
        found = apps.get(app_name)
        if found is None and len(apps) == 1:
            found = next(iter(apps.values()))
        if found is None:
            which = f"Application '{app_name}' not found." if app_name else "Application metadata not set."
            raise _Status(grpc.StatusCode.NOT_FOUND,
                          f"{which} Ping {_LIST_APPLICATIONS} for available applications.")
        prefix, route = found
        return _Target(route.app_name, route.ingress, prefix)

    # -- handlers -----------------------------------------------------------------------------

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """One generic handler per service, its methods taking and returning bytes."""
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        for spec in self.options.methods:
            by_service.setdefault(spec.service, {})[spec.method_name] = self._handler(spec)
        return [grpc.method_handlers_generic_handler(service, table) for service, table in by_service.items()]

    def _handler(self, spec: MethodSpec) -> grpc.RpcMethodHandler[Any, Any]:
        if spec.kind == grpc_services.UNARY_UNARY:
            async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                return await self.serve(spec, request, context, None)
            return grpc.unary_unary_rpc_method_handler(unary)
        if spec.kind == grpc_services.UNARY_STREAM:
            async def stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                await self.serve(spec, request, context, context.write)
            return grpc.unary_stream_rpc_method_handler(stream)

        if spec.kind == grpc_services.STREAM_UNARY:
            async def collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                return await self.serve(spec, b"", context, None, requests)
            return grpc.stream_unary_rpc_method_handler(collect)

        async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self.serve(spec, b"", context, context.write, requests)
        return grpc.stream_stream_rpc_method_handler(chat)

    async def serve(
        self, spec: MethodSpec, request: bytes, context: grpc.aio.ServicerContext[Any, Any],
        write: Callable[[bytes], Awaitable[None]] | None, requests: AsyncIterator[bytes] | None = None,
    ) -> bytes:
        """Answer one call (module docstring); ``write`` sends a streamed response's items
        (None: unary, the response is returned); ``requests``: a streamed request's messages
        (None: ``request`` is the one message)."""
        start_s = time.perf_counter()
        metadata = tuple(context.invocation_metadata() or ())
        app_name = request_id = model_id = ""
        for key, value in metadata:
            if key == "application":
                app_name = str(value)
            elif key == "request_id":
                request_id = str(value)[:128]
            elif key == "multiplexed_model_id":
                model_id = str(value)
        request_id = request_id or new_request_id()
        code, details = grpc.StatusCode.OK, ""
        trailing: tuple[tuple[str, Any], ...] = ()
        target: _Target | None = None
        response = b""
        self.calls += 1
        self._idle.clear()
        self.metrics.ongoing += 1
        try:
            if self.draining:
                raise _Status(grpc.StatusCode.UNAVAILABLE, "This node is being drained.")
            target = self._target(app_name)
            outcome, response = await self._forward(spec, request, context, write, target, metadata, request_id,
                                                    model_id, requests)
            code = _CODES.get(outcome.code, grpc.StatusCode.UNKNOWN)
            details, trailing = outcome.details, tuple(outcome.trailing_metadata)
            if outcome.compression is not None:
                context.set_compression(grpc.Compression(outcome.compression))
        except _Status as status:
            code, details = status.code, status.details
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, f"Client for request {request_id} disconnected."
            raise
        finally:
            self.metrics.ongoing -= 1
            self.calls -= 1
            if not self.calls:
                self._idle.set()
            # An application no route has is counted as "" (as unrouted HTTP paths): a client
            # cannot create series by naming applications.
            route = target.app_name if target is not None else ""
            deployment = target.ingress if target is not None else ""
            self._record(spec.path, route, deployment, code, (time.perf_counter() - start_s) * 1000.0, request_id)
        if not any(k == "request_id" for k, _ in trailing):
            trailing = (*trailing, ("request_id", request_id))
        context.set_trailing_metadata(trailing)
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(_truncate(details))
            return b""
        return response

    def _record(self, path: str, route: str, deployment: str, code: grpc.StatusCode, latency_ms: float,
                request_id: str) -> None:
        self.metrics.for_route(route, route, deployment).record(
            path, code.name, latency_ms, code is not grpc.StatusCode.OK)
        if self.access is not None:
            self.access.write(path, route, code.name, latency_ms, request_id)

    async def _forward(
        self, spec: MethodSpec, request: bytes, context: grpc.aio.ServicerContext[Any, Any],
        write: Callable[[bytes], Awaitable[None]] | None, target: _Target,
        metadata: Sequence[tuple[str, Any]], request_id: str, model_id: str,
        requests: AsyncIterator[bytes] | None,
    ) -> tuple[wire.GrpcOutcome, bytes]:
        """Send the call to the application's ingress and relay its answer; returns the
        outcome and a unary call's response. ``_Status`` for what the proxy decides."""
        client_left_s = context.time_remaining()
        timeout_s = self.options.request_timeout_s
        if client_left_s is not None and (timeout_s is None or client_left_s < timeout_s):
            timeout_s = max(0.0, client_left_s)
        info = wire.GrpcCallInfo(
            method_path=spec.path,
            metadata=tuple((str(k), v if isinstance(v, bytes) else str(v)) for k, v in metadata),
            peer=context.peer() or "",
            auth_context={str(k): [bytes(v) for v in vs] for k, vs in (context.auth_context() or {}).items()},
            deadline_s=client_left_s,
        )
        header = wire.request_header(
            wire.GRPC_METHOD, request_id, wire.Encoding.MSGPACK, stream=True, mx=model_id,
            route=target.prefix, http=True,
        )
        replies = ReplySink()
        call = Call(header, grpc_call.request_payload(info, spec.function, request), replies)
        router = self.runtime.router(target.app_name, target.ingress)
        if isinstance(router, Router):
            router.metrics.count_handle_request(target.prefix)
        router.submit(call)
        pump = _RequestPump(requests, router, call) if requests is not None else None
        try:
            async with _NO_DEADLINE if timeout_s is None else asyncio.timeout(timeout_s):
                return await self._relay(call, replies, write, pump)
        except TimeoutError:
            limit = self.options.request_timeout_s
            raise _Status(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"Request timed out after {limit}s." if limit is not None and timeout_s == limit else "Request timed out.",
            ) from None
        except BackPressureError as exc:
            raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message) from None
        except DeploymentUnavailableError as exc:
            raise _Status(grpc.StatusCode.UNAVAILABLE,
                          f"{exc.deployment_id} is unavailable {exc.reason.split(':', 1)[0]}.") from None
        except ReplicaUnavailableError:
            logger.warning("gRPC call %s to application '%s': its replica died", request_id, target.app_name)
            raise _Status(grpc.StatusCode.INTERNAL, "The replica handling this request died before the request "
                                                    "finished; it was not retried.") from None
        except RequestCancelledError:
            raise _Status(grpc.StatusCode.UNAVAILABLE,
                          "The replica handling this request stopped before the request finished.") from None
        except wire.ProtocolError:
            logger.exception("gRPC call %s: a malformed reply", request_id)
            raise _Status(grpc.StatusCode.INTERNAL, "Request failed due to unexpected error.") from None
        except _Status:
            raise
        except Exception:
            logger.exception("gRPC call %s to application '%s' failed", request_id, target.app_name)
            raise _Status(grpc.StatusCode.INTERNAL, "Request failed due to unexpected error.") from None
        finally:
            router.cancel(call)  # nothing if it ended; else the replica's coroutine is cancelled
            if pump is not None:
                await pump.stop()

    async def _relay(
        self, call: Call, replies: ReplySink, write: Callable[[bytes], Awaitable[None]] | None,
        pump: _RequestPump | None,
    ) -> tuple[wire.GrpcOutcome, bytes]:
        taken = 0
        while True:
            item = await replies.next()
            if item is END:
                raise wire.ProtocolError("a gRPC call ended without its outcome")
            if item is PULL:
                if pump is None:
                    raise wire.ProtocolError("a PULL for a gRPC call whose client does not stream")
                pump.pull()
                continue
            if isinstance(item, dict):
                outcome, response = grpc_call.read_final(item)
                return outcome, response or b""
            if not isinstance(item, bytes) or write is None:
                raise wire.ProtocolError("a gRPC reply item that is not a streamed message")
            await write(item)
            taken += 1
            if taken >= wire.RESPONSE_WINDOW // 2:
                call.ack(taken)
                taken = 0

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls (UNAVAILABLE; health checks say NOT_SERVING) and wait until the calls
        in flight end; False if ``timeout_s`` passed first."""
        self.draining = True
        if self.builtins is not None:
            self.builtins.health_changed()  # health Watch streams see NOT_SERVING now, not within 1 s
        try:
            async with asyncio.timeout(timeout_s):
                while self.calls:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """End the health ``Watch`` streams, before the server stops (which would otherwise wait
        its whole grace for them)."""
        if self.builtins is not None:
            self.builtins.close()


class _RequestPump:
    """A client-streaming call's messages, read from the client one per PULL the replica sends
    and forwarded (``grpc_call.input_message``); the end of the client's stream is forwarded too."""

    def __init__(self, requests: AsyncIterator[bytes], router: CallRouter, call: Call) -> None:
        self._requests = requests
        self._router = router
        self._call = call
        self._pulls = 0
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def pull(self) -> None:
        self._pulls += 1
        self._wake.set()

    async def _run(self) -> None:
        while True:
            while not self._pulls:
                self._wake.clear()
                await self._wake.wait()
            self._pulls -= 1
            data: bytes | None
            try:
                data = await anext(self._requests)
            except StopAsyncIteration:
                data = None
            if not self._router.send_receive(self._call, grpc_call.input_message(data)) or data is None:
                return

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def build_server(ingress: GrpcIngress) -> tuple[grpc.aio.Server, int]:
    """The gRPC server for ``ingress``, bound (with ``SO_REUSEPORT``, so every proxy of the
    instance listens on the same port) but not started; returns it and the port bound.
    Ray's built-in services (``RayServeAPIService``, health checking, reflection when
    ``enable_reflection``: then the servicer functions' modules are imported, for their
    descriptors) are added beside the user's RPCs."""
    from shoal.proxy.grpc_builtin import add_builtin_services
    from shoal.runtime.imports import import_attr

    options = ingress.options
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers(tuple(ingress.handlers()))
    services = sorted({spec.service for spec in options.methods})
    if options.enable_reflection:  # reflection describes the services from their imported descriptors
        for function in sorted({spec.function for spec in options.methods}):
            import_attr(function)
    ingress.builtins = add_builtin_services(
        server,
        list_applications=ingress.application_names,
        is_healthy=ingress.is_healthy,
        unhealthy_message=ingress.unhealthy_message,
        reflection_service_names=services if options.enable_reflection else None,
        service_names=services,
    )
    host = f"[{options.host}]" if ":" in options.host else options.host
    port = server.add_insecure_port(f"{host}:{options.port}")
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {options.host}:{options.port}")
    return server, port

"""The gRPC methods a servicer function registers, learned without running a server.

A servicer function is what ``grpcio-tools`` generates as ``add_<Service>Servicer_to_server(
servicer, server)``; users name them in ``gRPCOptions.grpc_servicer_functions``. ``discover``
imports one and calls it with a placeholder servicer on a ``_CapturingServer``, which keeps the
method handlers it is given: each RPC's path (``/package.Service/Method``), whether the client
and the server stream, and the request deserializer and response serializer that protobuf
generated for it.

- The supervisor discovers every configured function before anything starts (a function that
  does not import, is not callable, or does not take ``(servicer, server)`` is a
  ``GrpcServicerError`` naming it), and hands the proxies the plain table of paths and kinds
  (``MethodSpec``): the proxies register those paths with raw-bytes handlers and never import
  the user's message classes.
- A replica discovers the function a call names (once per process, ``codecs``) to parse the
  request bytes with protobuf and serialize the response. Nothing is ever unpickled.

Importing this module does not import grpc: only ``discover`` needs it (and only then).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.runtime.errors import RayServeException
from shoal.runtime.imports import import_attr

__all__ = ["GrpcServicerError", "MethodCodec", "MethodSpec", "codecs", "discover", "discover_all"]

UNARY_UNARY = "unary_unary"
UNARY_STREAM = "unary_stream"
STREAM_UNARY = "stream_unary"
STREAM_STREAM = "stream_stream"


class GrpcServicerError(RayServeException, ValueError):
    """A ``grpc_servicer_functions`` entry cannot serve: it does not import, is not callable,
    or failed when called with ``(servicer, server)``."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One RPC as the proxy registers it: plain values only (it travels in the proxy's spec)."""

    path: str  # "/package.Service/Method"
    kind: str  # UNARY_UNARY, UNARY_STREAM, STREAM_UNARY or STREAM_STREAM
    function: str  # the servicer function that registered it (the replica imports it)

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def method_name(self) -> str:
        """The RPC's name: the deployment method it calls."""
        return self.path.rsplit("/", 1)[1]

    def to_wire(self) -> list[str]:
        return [self.path, self.kind, self.function]

    @classmethod
    def from_wire(cls, data: Sequence[str]) -> MethodSpec:
        return cls(str(data[0]), str(data[1]), str(data[2]))


@dataclass(frozen=True, slots=True)
class MethodCodec:
    """How a replica reads one RPC's request and writes its response."""

    kind: str
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None

    def parse(self, data: bytes) -> Any:
        return self.request_deserializer(data) if self.request_deserializer is not None else data

    def serialize(self, response: Any) -> bytes:
        if self.response_serializer is not None:
            return self.response_serializer(response)
        if isinstance(response, bytes | bytearray | memoryview):
            return bytes(response)
        raise TypeError(f"a response to a gRPC call must be a protobuf message or bytes, got {type(response).__name__}")


class _Placeholder:
    """Stands for the user's servicer: every attribute is a method that is never called (the
    proxy replaces each handler with its own, which forwards the call to a replica)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def never_called(*_args: Any) -> Any:
            raise RuntimeError(f"the placeholder servicer's {name} was called")

        return never_called


class _CapturingServer:
    """Records the handlers a servicer function adds (the two registration methods grpcio's
    generated code calls: generic handlers, and registered method handlers since 1.62)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}  # path -> grpc.RpcMethodHandler

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        for generic in generic_rpc_handlers:
            table = getattr(generic, "_method_handlers", None)  # grpc's method_handlers_generic_handler
            if not isinstance(table, Mapping):
                raise TypeError("a generic handler that is not grpc.method_handlers_generic_handler(...)")
            self.handlers.update(table)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, Any]) -> None:
        for method, handler in method_handlers.items():
            self.handlers[f"/{service_name}/{method}"] = handler

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a servicer function called server.{name}, which shoal's gRPC proxy does not offer")


def _kind(handler: Any) -> str:
    if handler.request_streaming:
        return STREAM_STREAM if handler.response_streaming else STREAM_UNARY
    return UNARY_STREAM if handler.response_streaming else UNARY_UNARY


def _handlers(function: str) -> dict[str, Any]:
    """Import ``function`` and capture what it registers (GrpcServicerError naming it)."""
    try:
        add = import_attr(function)
    except ImportError as exc:
        raise GrpcServicerError(
            f"grpc_servicer_functions: '{function}' can't be imported ({exc}). Make sure it is importable "
            "where shoal runs (the working directory or PYTHONPATH), or rebuild the service definitions "
            "if the .proto file changed."
        ) from None
    if not callable(add):
        raise GrpcServicerError(f"grpc_servicer_functions: '{function}' is not a callable function.")
    server = _CapturingServer()
    try:
        add(_Placeholder(), server)
    except Exception as exc:
        raise GrpcServicerError(
            f"grpc_servicer_functions: '{function}' failed when called with (servicer, server): "
            f"{type(exc).__name__}: {exc}. It must be a generated add_<Service>Servicer_to_server function."
        ) from None
    if not server.handlers:
        raise GrpcServicerError(f"grpc_servicer_functions: '{function}' registered no gRPC method.")
    return server.handlers


def discover(function: str) -> list[MethodSpec]:
    """The RPCs ``function`` registers, in its order; GrpcServicerError naming it if it cannot
    serve (see the module docstring)."""
    return [MethodSpec(path, _kind(handler), function) for path, handler in _handlers(function).items()]


def discover_all(functions: Sequence[str]) -> list[MethodSpec]:
    """Every function's RPCs; a path registered twice keeps the first function's."""
    seen: dict[str, MethodSpec] = {}
    for function in functions:
        for spec in discover(function):
            seen.setdefault(spec.path, spec)
    return list(seen.values())


@functools.cache
def codecs(function: str) -> Mapping[str, MethodCodec]:
    """The request parser and response serializer of each RPC ``function`` registers (imported
    once per process)."""
    return {
        path: MethodCodec(_kind(h), h.request_deserializer, h.response_serializer)
        for path, h in _handlers(function).items()
    }

"""A gRPC call on the replica's side: parse the request, call the ingress method, answer.

The proxy sends (``request_payload``) the call's plain facts (``wire.GrpcCallInfo``: method
path, metadata, peer, deadline), the servicer function that registered the path, and the
request's serialized bytes, all msgpack. Here:

- the request is parsed with the protobuf deserializer that the servicer function registered
  for the path (``grpc_services.codecs``: imported once per process); nothing is unpickled;
- the ingress deployment's method named as the RPC (the path's last segment) is called with the
  message, and with ``grpc_context=`` a ``RayServegRPCContext`` if it takes that parameter;
- a unary RPC's response is serialized and rides on the final reply; a server-streaming RPC's
  method is a generator whose items are sent one by one (``send_item``) as they come;
- a client-streaming or bidirectional RPC's method gets, instead of a message, a
  ``gRPCInputStream`` of the client's messages (as in Ray): each is asked of the proxy when the
  method wants it (``next_message``: the replica sends PULL, the proxy reads one message from its
  client and forwards its bytes), so the client's stream is held back by the method's pace;
- the final reply (``GrpcFinal``) carries the outcome: what the user set on the context (code,
  details, trailing metadata), or, if the method raised, a ``gRPCStatusError``'s code and
  details, else INTERNAL with the exception's type and message. The traceback goes to the
  replica's log only (``logger.exception``), never to the client.

Replies are msgpack and bytes only (``wire.dumps_plain``), as on the HTTP path.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.runtime import grpc_services, wire
from shoal.runtime.errors import gRPCStatusError
from shoal.runtime.user_code import UserCallable

logger = logging.getLogger("shoal.replica")

__all__ = ["INTERNAL", "OK", "final_reply", "request_payload", "serve"]

# grpc.StatusCode values (``code.value[0]``), so the replica needs no grpc for plain outcomes.
OK = 0
UNKNOWN = 2
INTERNAL = 13
UNAVAILABLE = 14
UNIMPLEMENTED = 12


def request_payload(call: wire.GrpcCallInfo, function: str, request: bytes) -> bytes:
    """The payload of a gRPC REQUEST (msgpack): the call's facts, the servicer function, the bytes."""
    return wire.pack([call.to_meta(), function, request])


def final_reply(outcome: wire.GrpcOutcome, response: bytes | None) -> dict[str, Any]:
    """The value of a gRPC call's STREAM_END reply: the outcome, and a unary call's response."""
    return {"o": outcome.to_meta(), "b": response}


def read_final(value: Any) -> tuple[wire.GrpcOutcome, bytes | None]:
    """The inverse of ``final_reply`` (on the proxy); ProtocolError if it is not one."""
    try:
        return wire.GrpcOutcome.from_meta(value["o"]), value["b"]
    except (KeyError, TypeError, ValueError) as exc:
        raise wire.ProtocolError(f"bad gRPC reply: {exc!r}") from exc


def _status_value(code: Any) -> int:
    """A ``grpc.StatusCode`` (or its name, or its number) as its number; UNKNOWN otherwise."""
    value = getattr(code, "value", code)
    if isinstance(value, tuple):
        value = value[0]
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        import grpc

        member = getattr(grpc.StatusCode, value.upper(), None)
        if member is not None:
            return int(member.value[0])
    return UNKNOWN


def _takes_grpc_context(fn: Callable[..., Any]) -> bool:
    """Whether the method has a ``grpc_context`` parameter (asked once per function: the
    signature cost 5% of a replica's time when read on every call)."""
    target = getattr(fn, "__func__", fn)  # a bound method is new on every lookup; its function is not
    try:
        return _has_grpc_context_parameter(target)
    except TypeError:  # unhashable callable
        return _has_grpc_context_parameter.__wrapped__(target)


@functools.lru_cache(maxsize=1024)
def _has_grpc_context_parameter(fn: Callable[..., Any]) -> bool:
    try:
        return "grpc_context" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def input_message(data: bytes | None) -> dict[str, Any]:
    """A client-streaming call's next message as the proxy forwards it (None: the client's stream ended)."""
    return {"end": True} if data is None else {"m": data}


async def _messages(codec: grpc_services.MethodCodec, next_message: Callable[[], Awaitable[Any]]) -> Any:
    """The client's messages, parsed, until its stream ends."""
    while True:
        item = await next_message()
        if not isinstance(item, dict) or item.get("end"):
            return
        data = item.get("m")
        if not isinstance(data, bytes):
            raise wire.ProtocolError("a streamed gRPC request message that is not bytes")
        yield codec.parse(data)


async def serve(
    user: UserCallable, payload: bytes, request_id: str, send_item: Callable[[bytes], Awaitable[None]],
    next_message: Callable[[], Awaitable[Any]],
) -> tuple[dict[str, Any], BaseException | None]:
    """Run one gRPC call (module docstring); returns the final reply's value and the user's
    exception if the call failed with one (the replica's metrics count it)."""
    from shoal.serve.grpc_util import RayServegRPCContext, gRPCInputStream

    meta, function, request = wire.unpack(payload)
    call = wire.GrpcCallInfo.from_meta(meta)
    codec = grpc_services.codecs(function).get(call.method_path)
    if codec is None:
        outcome = wire.GrpcOutcome(UNIMPLEMENTED, f"Method {call.method_path} is not registered by {function}.", (), None)
        return final_reply(outcome, None), None
    context = RayServegRPCContext.from_call(call, request_id=request_id)
    method_name = call.method_path.rsplit("/", 1)[1]
    response: bytes | None = None
    failure: BaseException | None = None
    try:
        if codec.kind in (grpc_services.STREAM_UNARY, grpc_services.STREAM_STREAM):
            message: Any = gRPCInputStream(_messages(codec, next_message))
        else:
            message = codec.parse(request)
        fn, _ = user.resolve(method_name)
        kwargs = {"grpc_context": context} if _takes_grpc_context(fn) else {}
        if codec.kind in (grpc_services.UNARY_STREAM, grpc_services.STREAM_STREAM):
            async for item in user.stream(method_name, (message,), kwargs):
                await send_item(codec.serialize(item))
        else:
            response = codec.serialize(await user.call(method_name, (message,), kwargs))
        outcome = context.outcome()
    except gRPCStatusError as exc:
        logger.exception("gRPC call %s failed with the user-set status code %s", call.method_path, exc.grpc_code)
        original = exc.original_exception
        details = exc.grpc_details or str(original)
        outcome = _with_context(context, wire.GrpcOutcome(_status_value(exc.grpc_code), details, (), None))
        failure, response = exc, None
    except Exception as exc:
        logger.exception("gRPC call %s failed", call.method_path)
        outcome = _with_context(context, wire.GrpcOutcome(INTERNAL, f"{type(exc).__name__}: {exc}", (), None))
        failure, response = exc, None
    return final_reply(outcome, response), failure


def _with_context(context: Any, fallback: wire.GrpcOutcome) -> wire.GrpcOutcome:
    """The failed call's outcome: what the user set on the context wins (Ray keeps a code and
    details set before the error), the rest comes from ``fallback``."""
    try:
        set_by_user = context.outcome()
    except Exception:
        return fallback
    return wire.GrpcOutcome(
        set_by_user.code or fallback.code,
        set_by_user.details or fallback.details,
        set_by_user.trailing_metadata,
        set_by_user.compression,
    )

"""``shoal.serve.grpc_util``: what Ray Serve's ``ray.serve.grpc_util`` offers gRPC applications.

``RayServegRPCContext`` is the ``grpc_context`` a deployment method receives when it asks for one
(a parameter of that name). It mirrors grpcio's ``ServicerContext``: the method reads the call's
metadata and peer, and sets the status code, details, trailing metadata and compression that the
proxy then puts on the call. The proxy and the replica are different processes, so the context is
plain data both ways: the replica builds it from the ``GrpcCallInfo`` the proxy sent
(``from_call``) and hands the proxy back a ``GrpcOutcome`` (``outcome``); nothing a client sent
is ever pickled.

``gRPCInputStream`` is the async iterator over a client's request stream that Ray passes to
client-streaming and bidirectional methods.

Importing this module imports ``grpc``; ``shoal.serve`` and ``shoal.runtime`` do not import it
(only gRPC applications pay for it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

import grpc

from shoal.runtime.wire import GrpcCallInfo, GrpcOutcome

__all__ = ["RayServegRPCContext", "gRPCInputStream"]

T = TypeVar("T")

REQUEST_ID_KEY = "request_id"

# gRPC metadata keys: lowercase letters, digits, "-", "_" and "." (HTTP/2 header names).
_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class RayServegRPCContext:
    """The gRPC call as a deployment method sees it: Ray's ``RayServegRPCContext``.

    Reading: ``invocation_metadata()``, ``peer()``, ``auth_context()``, ``peer_identities()``,
    ``peer_identity_key()``, and Ray's shortcuts into the metadata (``request_id()``,
    ``application()``, ``multiplexed_model_id()``, ``traceparent()``, ``tracestate()``).
    Setting: ``set_code()``, ``set_details()``, ``set_trailing_metadata()``,
    ``set_compression()``; ``code()``, ``details()`` and ``trailing_metadata()`` read them back.
    As in Ray, what a method sets reaches the client when the method returns (or, streaming, with
    its results); a method that raises after ``set_code`` ends the call with that code and details
    (``gRPCStatusError``), otherwise with ``INTERNAL``.
    """

    def __init__(self, call: GrpcCallInfo, *, request_id: str = "") -> None:
        """Prefer ``from_call``. ``request_id``: the id the proxy gave the call, which Ray echoes
        in the trailing metadata (kept first there whatever the method sets)."""
        self._call = call
        self._metadata_by_key: dict[str, str | bytes] = {}
        for key, value in call.metadata:
            self._metadata_by_key[key] = value  # the last value of a repeated key, as Ray
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing_metadata: list[tuple[str, str | bytes]] = [(REQUEST_ID_KEY, request_id)] if request_id else []
        self._compression: grpc.Compression | None = None

    @classmethod
    def from_call(cls, call: GrpcCallInfo, *, request_id: str = "") -> RayServegRPCContext:
        """The context of ``call``, as the proxy described it; see ``__init__`` for ``request_id``."""
        return cls(call, request_id=request_id)

    def outcome(self) -> GrpcOutcome:
        """What the method set, as plain data for the proxy (code 0 when it set none)."""
        return GrpcOutcome(
            code=0 if self._code is None else int(self._code.value[0]),
            details=self._details,
            trailing_metadata=tuple(self._trailing_metadata),
            compression=None if self._compression is None else int(self._compression),
        )

    # -- the call, as the client made it --

    def method_path(self) -> str:
        """``/package.Service/Method`` (not in Ray's context; grpcio's handler call details)."""
        return self._call.method_path

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        """The metadata the client sent, in order (``bytes`` values for ``-bin`` keys)."""
        return list(self._call.metadata)

    def peer(self) -> str:
        """The client's address as grpcio names it, e.g. ``ipv4:127.0.0.1:50000``."""
        return self._call.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        """The call's auth properties: name -> values (grpcio's ``auth_context()``)."""
        return {name: list(values) for name, values in self._call.auth_context.items()}

    def peer_identity_key(self) -> str | None:
        """The auth property that names an authenticated peer (``x509_subject_alternative_name``
        when its certificate has one, else ``x509_common_name``, grpc core's rule), or None when
        the peer is not authenticated."""
        for key in ("x509_subject_alternative_name", "x509_common_name"):
            if self._call.auth_context.get(key):
                return key
        return None

    def peer_identities(self) -> list[bytes] | None:
        """The authenticated peer's identities (the values of ``peer_identity_key()``), or None."""
        key = self.peer_identity_key()
        return None if key is None else list(self._call.auth_context[key])

    def request_id(self) -> str | None:
        """The ``request_id`` metadata the client sent, or None."""
        return self._text_metadata(REQUEST_ID_KEY)

    def application(self) -> str | None:
        """The ``application`` metadata the client sent (the target app's name), or None."""
        return self._text_metadata("application")

    def multiplexed_model_id(self) -> str | None:
        """The ``multiplexed_model_id`` metadata the client sent, or None."""
        return self._text_metadata("multiplexed_model_id")

    def traceparent(self) -> str | None:
        """The ``traceparent`` metadata the client sent, or None."""
        return self._text_metadata("traceparent")

    def tracestate(self) -> str | None:
        """The ``tracestate`` metadata the client sent, or None."""
        return self._text_metadata("tracestate")

    def _text_metadata(self, key: str) -> str | None:
        value = self._metadata_by_key.get(key)
        return value if isinstance(value, str) else None

    # -- what the method sets --

    def code(self) -> grpc.StatusCode | None:
        """The status code the method set, or None if it set none."""
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status code the call ends with. TypeError unless ``code`` is a ``grpc.StatusCode``."""
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(
                f"set_code() takes a grpc.StatusCode (e.g. grpc.StatusCode.NOT_FOUND), got {code!r}"
            )
        self._code = code

    def details(self) -> str:
        """The details string the method set ("" if none)."""
        return self._details

    def set_details(self, details: str | None) -> None:
        """The details string the call ends with (None clears it, as Ray lets Serve fill it)."""
        if details is not None and not isinstance(details, str):
            raise TypeError(f"set_details() takes a str, got {type(details).__name__}: {details!r}")
        self._details = details or ""

    def trailing_metadata(self) -> list[tuple[str, str | bytes]]:
        """The trailing metadata the call ends with: the request id first (if the proxy gave
        one), then what the method set last."""
        return list(self._trailing_metadata)

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Replaces the method's trailing metadata (the request id stays, as in Ray).

        Each item is ``(key, value)``: a lowercase key of letters, digits, ``-``, ``_``, ``.``,
        and a ``str`` value, or ``bytes`` for a key ending in ``-bin``. TypeError or ValueError,
        naming the item, otherwise (grpcio would only fail when the call ends).
        """
        items = [_metadata_item(item) for item in trailing_metadata]
        kept = [item for item in self._trailing_metadata if item[0] == REQUEST_ID_KEY][:1]
        self._trailing_metadata = kept + items

    def set_compression(self, compression: grpc.Compression | None) -> None:
        """The compression of the call's response (``grpc.Compression.Gzip``...)."""
        if compression is not None and not isinstance(compression, grpc.Compression):
            raise TypeError(f"set_compression() takes a grpc.Compression, got {compression!r}")
        self._compression = compression


def status_code(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a ``GrpcOutcome.code``; ValueError if it names none."""
    try:
        return _STATUS_CODES[number]
    except KeyError:
        raise ValueError(f"{number!r} is not a gRPC status code number (0-16)") from None


def _metadata_item(item: Any) -> tuple[str, str | bytes]:
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise TypeError(f"trailing metadata items are (key, value) pairs, got {item!r}")
    key, value = item
    if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
        raise ValueError(
            f"trailing metadata key {key!r}: use lowercase letters, digits, '-', '_' and '.'"
        )
    if key.endswith("-bin"):
        if not isinstance(value, bytes | str):
            raise TypeError(f"trailing metadata {key!r}: a '-bin' key takes bytes, got {value!r}")
    elif not isinstance(value, str):
        raise TypeError(
            f"trailing metadata {key!r}: the value must be a str (bytes only for keys ending in '-bin'), got {value!r}"
        )
    return key, value


class gRPCInputStream(AsyncIterator[T]):
    """The client's request messages of a client-streaming or bidirectional RPC (Ray's class).

    ``async for request in stream`` yields them in order and stops when the client ends its
    stream or the call is cancelled (``cancel()``, or ``cancel_event`` set).
    """

    def __init__(self, request_iterator: AsyncIterator[T], *, cancel_event: asyncio.Event | None = None) -> None:
        self._request_iterator = request_iterator
        self._cancel_event = cancel_event if cancel_event is not None else asyncio.Event()
        self._exhausted = False

    def __aiter__(self) -> gRPCInputStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._exhausted or self._cancel_event.is_set():
            self._exhausted = True
            raise StopAsyncIteration
        try:
            return await self._request_iterator.__anext__()
        except StopAsyncIteration:
            self._exhausted = True
            raise

    def is_cancelled(self) -> bool:
        """Whether the stream was cancelled (the client went away or ``cancel()`` ran)."""
        return self._cancel_event.is_set()

    def cancel(self) -> None:
        """Ends the iteration: the next ``__anext__`` stops."""
        self._cancel_event.set()

    @property
    def is_exhausted(self) -> bool:
        """Whether the iteration has ended."""
        return self._exhausted


# -- the proxy's side: a grpcio call to plain data and back --


def call_info(method_path: str, context: grpc.aio.ServicerContext[Any, Any]) -> GrpcCallInfo:
    """The ``GrpcCallInfo`` of a call the proxy's grpcio server is serving (read at its start)."""
    return GrpcCallInfo(
        method_path=method_path,
        metadata=tuple((str(key), value) for key, value in context.invocation_metadata() or ()),
        peer=context.peer(),
        auth_context={str(name): list(values) for name, values in context.auth_context().items()},
        deadline_s=context.time_remaining(),
    )


def apply_outcome(context: grpc.aio.ServicerContext[Any, Any], outcome: GrpcOutcome) -> None:
    """Sets on a grpcio call what the method set on its ``RayServegRPCContext``, as Ray's proxy
    does: only what it set (a code of 0, empty details, no trailing metadata, no compression are
    left alone, for the proxy's own status to fill)."""
    if outcome.code:
        context.set_code(status_code(outcome.code))
    if outcome.compression is not None:
        context.set_compression(grpc.Compression(outcome.compression))
    if outcome.details:
        context.set_details(outcome.details)
    if outcome.trailing_metadata:
        context.set_trailing_metadata(outcome.trailing_metadata)

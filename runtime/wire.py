"""Framing: the only module that knows how messages look on a ZeroMQ socket.

A message is one ZeroMQ frame (the ROUTER identity, if any, is a frame of its own, stripped by the
socket owner before ``decode`` and added back after ``encode``):

    bytes 0-16   fixed header, big-endian: kind (u8), incarnation (u32), call_id (u64),
                 meta length (u32)
    then         meta: a msgpack map of plain values (method name, request id, flags, ...)
    then         payload, the rest of the frame (absent if empty): opaque bytes whose encoding
                 ``meta["enc"]`` names

One frame rather than one per part: each ZeroMQ send is a call into libzmq, and a message of
three small frames costs several times one frame of the same bytes.

``incarnation`` identifies one worker process of a replica; a replica drops requests addressed to
another incarnation and callers drop replies from one they did not send to, so a restarted
replica never answers for its predecessor. ``call_id`` correlates a reply with its request on one
connection.

Values travel as msgpack when they are plain (None, bool, int, float, str, bytes, list, dict of
those: exactly, with no tuple-to-list drift) and as cloudpickle otherwise. cloudpickle is only
ever decoded from processes of the same user behind the 0700 run directory; data that came from
an HTTP client travels as msgpack and raw bytes and is never unpickled.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import msgpack

PROTOCOL_VERSION = 2

_HEADER = struct.Struct("!BIQI")


class Kind(enum.IntEnum):
    # caller -> replica
    REQUEST = 1
    CANCEL = 2
    RECEIVE = 9  # a later ASGI receive message of a running request (WebSockets)
    # replica -> caller; every request gets exactly one terminal reply
    RESULT = 3  # terminal
    ERROR = 4  # terminal: payload is an encoded exception plus its traceback text
    STREAM_ITEM = 5
    STREAM_END = 6  # terminal
    REJECTED = 7  # terminal: replica at max_ongoing_requests or draining; nothing ran
    CANCELLED = 8  # terminal: the request was cancelled on the replica
    # control plane (client or worker <-> supervisor)
    READY = 20  # worker -> supervisor, meta carries pid, protocol, endpoint
    INIT_FAILED = 21  # worker -> supervisor, meta carries the constructor traceback
    CALL = 22  # client -> supervisor: meta["op"] names the operation
    REPLY = 23  # supervisor -> client: the answer to a CALL


TERMINAL_KINDS = frozenset(
    {Kind.RESULT, Kind.ERROR, Kind.STREAM_END, Kind.REJECTED, Kind.CANCELLED}
)


class Encoding(enum.IntEnum):
    MSGPACK = 0
    PICKLE = 1
    RAW = 2  # bytes passed through untouched (HTTP bodies)


class ProtocolError(Exception):
    """A frame that does not follow this module's layout."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    incarnation: int = 0
    call_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: tuple[bytes, ...] = ()


def encode(msg: Message) -> list[bytes]:
    """Return the frames of ``msg`` (one); the inverse of ``decode``."""
    meta = msgpack.packb(msg.meta, use_bin_type=True)
    if len(msg.payload) > 1:
        raise ValueError("a message carries at most one payload")
    header = _HEADER.pack(msg.kind, msg.incarnation, msg.call_id, len(meta))
    return [b"".join((header, meta, *msg.payload))]


def decode(frames: list[bytes]) -> Message:
    """Parse frames produced by ``encode``. Raises ProtocolError on a malformed message.

    The payload is returned as it is; nothing is unpickled here.
    """
    if len(frames) != 1 or len(frames[0]) < _HEADER.size:
        raise ProtocolError(f"expected one frame of at least {_HEADER.size} bytes")
    data = frames[0]
    kind, incarnation, call_id, meta_len = _HEADER.unpack_from(data)
    end = _HEADER.size + meta_len
    if end > len(data):
        raise ProtocolError("the meta length runs past the end of the frame")
    try:
        meta = msgpack.unpackb(data[_HEADER.size:end], raw=False, strict_map_key=False)
        kind = Kind(kind)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"bad meta frame: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError("meta frame is not a map")
    payload = (data[end:],) if end < len(data) else ()
    return Message(kind, incarnation, call_id, meta, payload)


# -- values -------------------------------------------------------------------------------------


def dumps(value: Any) -> tuple[Encoding, bytes]:
    """Encode one Python value: msgpack when it round-trips exactly, else cloudpickle.

    Raises whatever cloudpickle raises for an object that cannot be serialized.
    """
    try:
        data = msgpack.packb(value, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError):
        return Encoding.PICKLE, cloudpickle.dumps(value)
    # msgpack packs bytearray and memoryview as bin, which comes back as bytes; a bin marker
    # byte anywhere in the output is the cheap hint to look for them.
    if _BIN_MARKERS.search(data) and _holds_buffer(value):
        return Encoding.PICKLE, cloudpickle.dumps(value)
    return Encoding.MSGPACK, data


_BIN_MARKERS = re.compile(b"[\xc4-\xc6]")
_SCALARS = (int, float, str, bytes, bool, type(None))


def _holds_buffer(value: Any) -> bool:
    """True if ``value`` (plain msgpack types only) contains a bytearray or memoryview."""
    kind = type(value)
    if kind in _SCALARS:
        return False
    if kind is list:
        return any(_holds_buffer(v) for v in value)
    if kind is dict:
        return any(_holds_buffer(k) or _holds_buffer(v) for k, v in value.items())
    return kind in (bytearray, memoryview)


def loads(enc: int, data: bytes) -> Any:
    """Decode a value produced by ``dumps``. Only for frames from processes of the same user."""
    if enc == Encoding.MSGPACK:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if enc == Encoding.PICKLE:
        return cloudpickle.loads(data)
    if enc == Encoding.RAW:
        return bytes(data)
    raise ProtocolError(f"unknown payload encoding {enc}")


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Encoding, bytes]:
    """Encode call arguments; positional arguments come back as a tuple from ``loads_args``."""
    return dumps([list(args), kwargs])


def loads_args(enc: int, data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = loads(enc, data)
    return tuple(args), kwargs


def deployment_key(app_name: str, deployment_name: str) -> str:
    """The key of a deployment in snapshots and queue reports: ``app#deployment``."""
    return f"{app_name}#{deployment_name}"


def pack(value: Any) -> bytes:
    """msgpack for control-plane bodies: plain values only."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)

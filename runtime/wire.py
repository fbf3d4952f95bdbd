"""Framing: the only module that knows how messages look on a ZeroMQ socket.

A message is one ZeroMQ frame (the ROUTER identity, if any, is a frame of its own, stripped by the
socket owner before ``decode`` and added back after ``encode``):

    bytes 0-16   fixed header, big-endian: kind (u8), incarnation (u32), call_id (u64),
                 meta length (u32)
    then         meta: a msgpack map of plain values: a ``RequestHeader`` or ``ReplyHeader`` (see
                 below) on the data plane, operation fields on the control plane
    then         payload, the rest of the frame (absent if empty): opaque bytes whose encoding
                 the header's ``enc`` names

One frame rather than one per part: each ZeroMQ send is a call into libzmq, and a message of
three small frames costs several times one frame of the same bytes.

The exception is a value's large buffers (numpy arrays, and ``bytes``/``bytearray``/``memoryview``
of ``OOB_MIN_BYTES`` or more; see ``dumps_oob``): they travel out of band, each as a frame of its
own after the message frame, sent and received without a copy, or, from ``shm.THRESHOLD_BYTES``
up, in a shared-memory segment whose name rides in the meta (key ``"shm"``: ``[[index, name,
nbytes], ...]``, the buffer's place among the message's buffers). ``Message.buffers`` holds them
in order: frames (any buffer) and ``SegmentRef``s. A message without buffers is one frame, as
before.

Several messages for the same peer may travel as one BATCH (``encode_batch``, ``decode_batch``):
the sockets' owners queue what they send during one loop iteration and send it at its end
(``transport.Channel.post``); a receiver handles each message of a batch as if it came alone.

``incarnation`` identifies one worker process of a replica; a replica drops requests addressed to
another incarnation and callers drop replies from one they did not send to, so a restarted
replica never answers for its predecessor. ``call_id`` correlates a reply with its request on one
connection.

Values travel as msgpack when they are plain (None, bool, int, float, str, bytes, list, dict of
those: exactly, with no tuple-to-list drift) and as cloudpickle otherwise. cloudpickle is only
ever decoded from processes of the same user behind the 0700 run directory; data that came from
an HTTP client travels as msgpack and raw bytes and is never unpickled, and the replies to it
are msgpack only (``dumps_plain`` raises for anything else; ``ReplyHeader`` decoding refuses
pickle for them).

The data plane's headers (``RequestHeader``, ``ReplyHeader``) and the controller's routing
``Snapshot`` are frozen dataclasses; their keys on the wire are known to this module only.
"""

from __future__ import annotations

import enum
import functools
import hmac
import io
import os
import pickle
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import cloudpickle
import msgpack  # type: ignore[import-untyped,unused-ignore]

PROTOCOL_VERSION = 4  # 3: out-of-band buffers as extra frames or segments; requests name their caller

# Methods the supervisor calls on a replica (``controller/replica_control``); they run outside
# max_ongoing_requests.
HEALTH_METHOD = "__shoal_check_health__"
RECONFIGURE_METHOD = "__shoal_reconfigure__"
METRICS_METHOD = "__shoal_metrics__"  # -> requests running on the replica, this call excluded
ROUTING_STATS_METHOD = "__shoal_routing_stats__"  # -> [enc, data] of record_routing_stats(), or None
# A gRPC call from the proxy (with ``http`` set: msgpack replies only); see ``runtime/grpc_call.py``.
GRPC_METHOD = "__shoal_grpc__"
# 4: BATCH frames (several messages to one peer in one ZeroMQ message) and SLOT_FREE

_HEADER = struct.Struct("!BIQI")


class Kind(enum.IntEnum):
    # caller -> replica
    REQUEST = 1
    CANCEL = 2
    RECEIVE = 9  # a later ASGI receive message of a running request (WebSockets, body chunks)
    ACK = 11  # meta["n"]: the caller's HTTP client took n more response batches (flow control)
    # replica -> caller; every request gets exactly one terminal reply
    RESULT = 3  # terminal
    ERROR = 4  # terminal: payload is an encoded exception plus its traceback text
    STREAM_ITEM = 5
    STREAM_END = 6  # terminal
    REJECTED = 7  # terminal: replica at max_ongoing_requests or draining; nothing ran
    CANCELLED = 8  # terminal: the request was cancelled on the replica
    PULL = 10  # not terminal: an HTTP request's app wants the next body chunk (a RECEIVE)
    SLOT_FREE = 13  # not terminal: a slot freed on a replica that REJECTED this caller before
    # either way: several messages to the same peer in one ZeroMQ message (``encode_batch``)
    BATCH = 12
    # control plane (client or worker <-> supervisor)
    READY = 20  # worker -> supervisor, meta carries pid, protocol, endpoint
    ROUTING_INFO = 24  # worker -> supervisor: the multiplexed model ids it holds (``routing_info``)
    CALL = 22  # client -> supervisor: meta["op"] names the operation
    REPLY = 23  # supervisor -> client: the answer to a CALL


# An HTTP request's replica sends at most this many response batches (STREAM_ITEMs) ahead of
# its caller's ACKs; a caller ACKs at least every RESPONSE_WINDOW // 2 batches it passed on.
RESPONSE_WINDOW = 16

TERMINAL_KINDS = frozenset(
    {Kind.RESULT, Kind.ERROR, Kind.STREAM_END, Kind.REJECTED, Kind.CANCELLED}
)


class Encoding(enum.IntEnum):
    MSGPACK = 0
    PICKLE = 1


_ENCODINGS = {int(e): e for e in Encoding}  # a dict lookup: cheaper than Encoding(n) per message


class ProtocolError(Exception):
    """A frame that does not follow this module's layout."""


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """An out-of-band buffer in a shared-memory segment (``shm``): its file name in the
    instance's segment directory and its size."""

    name: str
    nbytes: int


# A buffer of a message: a frame of its own (anything with the buffer protocol) or a segment.
Buffer = Any


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    incarnation: int = 0
    call_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: tuple[bytes, ...] = ()
    buffers: tuple[Buffer, ...] = ()  # the payload's out-of-band buffers, in order


def encode(msg: Message) -> list[Any]:
    """Return the frames of ``msg``: one, then one per out-of-band buffer that is not a
    ``SegmentRef``; the inverse of ``decode``. The buffer frames are the buffers themselves
    (not copies): whoever sends them must keep them unchanged until they are sent."""
    meta_map = msg.meta
    frames: list[Any] = []
    if msg.buffers:
        segments = [[i, b.name, b.nbytes] for i, b in enumerate(msg.buffers) if type(b) is SegmentRef]
        if segments:
            meta_map = {**meta_map, "shm": segments}
        frames = [b for b in msg.buffers if type(b) is not SegmentRef]
    meta = msgpack.packb(meta_map, use_bin_type=True)
    if len(msg.payload) > 1:
        raise ValueError("a message carries at most one payload")
    header = _HEADER.pack(msg.kind, msg.incarnation, msg.call_id, len(meta))
    first = b"".join((header, meta, *msg.payload))
    return [first, *frames] if frames else [first]


def decode(frames: Sequence[Any]) -> Message:
    """Parse frames produced by ``encode``. Raises ProtocolError on a malformed message.

    The payload is returned as it is, and the buffer frames as they were received (not
    copied); nothing is unpickled and no segment is opened here.
    """
    if not frames or len(frames[0]) < _HEADER.size:
        raise ProtocolError(f"expected a first frame of at least {_HEADER.size} bytes")
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
    if len(frames) == 1 and "shm" not in meta:
        return Message(kind, incarnation, call_id, meta, payload)
    return Message(kind, incarnation, call_id, meta, payload, _buffers(meta.pop("shm", ()), frames[1:]))


# -- batches ------------------------------------------------------------------------------------
#
# A batch is several encoded messages for the same peer in one ZeroMQ message: every ZeroMQ send
# is a call into libzmq that drops the GIL and may wake its I/O thread (an eventfd write), so a
# socket owner that produced many messages for one peer in one loop iteration sends them as one.
# Its first frame is the fixed header (kind BATCH, incarnation 0, call_id = the number of
# messages, meta length 0) followed, per message, by its first frame's length (u32), the number
# of its buffer frames (u32) and that first frame; the buffer frames of all the messages follow
# as frames of their own, in order (not copied).

_ENTRY = struct.Struct("!II")
_BATCH_KIND = int(Kind.BATCH)


def encode_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """The frames of one BATCH of ``messages``, each given as the frames ``encode`` returned
    (its first frame as bytes); ``decode_batch`` is the inverse. The buffer frames are passed
    through as they are."""
    parts: list[Any] = [_HEADER.pack(_BATCH_KIND, 0, len(messages), 0)]
    buffers: list[Any] = []
    pack = _ENTRY.pack
    for frames in messages:
        first = frames[0]
        parts.append(pack(len(first), len(frames) - 1))
        parts.append(first)
        if len(frames) > 1:
            buffers.extend(frames[1:])
    batch = b"".join(parts)
    return [batch, *buffers] if buffers else [batch]


def is_batch(frame: Any) -> bool:
    """True if ``frame`` (a message's first frame) opens a BATCH."""
    return len(frame) >= _HEADER.size and frame[0] == _BATCH_KIND


def decode_batch(frames: Sequence[Any]) -> list[list[Any]]:
    """The messages of a BATCH (``frames`` as received), each as the frames ``decode`` takes:
    first frames as bytes, buffer frames as received. ProtocolError if the batch is malformed
    (anything but exactly its messages and buffer frames)."""
    data = frames[0]
    if not is_batch(data):
        raise ProtocolError("not a batch frame")
    _kind, _incarnation, count, meta_len = _HEADER.unpack_from(data)
    if meta_len:
        raise ProtocolError("a batch frame has no meta")
    messages: list[list[Any]] = []
    offset, end = _HEADER.size, len(data)
    next_buffer, n_frames = 1, len(frames)
    unpack = _ENTRY.unpack_from
    for _ in range(count):
        if offset + _ENTRY.size > end:
            raise ProtocolError("a batch entry runs past the end of the frame")
        length, n_buffers = unpack(data, offset)
        offset += _ENTRY.size
        if offset + length > end:
            raise ProtocolError("a batched message runs past the end of the frame")
        if next_buffer + n_buffers > n_frames:
            raise ProtocolError("a batched message names more buffer frames than came")
        first = bytes(data[offset:offset + length])
        offset += length
        if n_buffers:
            messages.append([first, *frames[next_buffer:next_buffer + n_buffers]])
            next_buffer += n_buffers
        else:
            messages.append([first])
    if offset != end or next_buffer != n_frames:
        raise ProtocolError("a batch frame holds more than its messages")
    return messages


def _buffers(segments: Any, frames: Sequence[Any]) -> tuple[Buffer, ...]:
    """The buffers of a message: its extra frames, with the segments put back in place."""
    if not segments:
        return tuple(frames)
    try:
        placed = {int(i): SegmentRef(str(name), int(nbytes)) for i, name, nbytes in segments}
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad segment list: {exc!r}") from exc
    buffers: list[Buffer] = []
    rest = iter(frames)
    for i in range(len(placed) + len(frames)):
        ref = placed.get(i)
        if ref is not None:
            buffers.append(ref)
        else:
            buffers.append(next(rest, None))
    if None in buffers or len(buffers) != len(placed) + len(frames):
        raise ProtocolError("the segment list does not match the message's frames")
    return tuple(buffers)


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


def _holds_buffer(value: Any, large_bytes: bool = False) -> bool:
    """True if ``value`` (plain msgpack types only) contains a bytearray or memoryview or, with
    ``large_bytes``, a ``bytes`` of ``OOB_MIN_BYTES`` or more."""
    kind = type(value)
    if kind is bytes:
        return large_bytes and len(value) >= OOB_MIN_BYTES
    if kind in _SCALARS:
        return False
    if kind is list:
        return any(_holds_buffer(v, large_bytes) for v in value)
    if kind is dict:
        return any(_holds_buffer(k, large_bytes) or _holds_buffer(v, large_bytes) for k, v in value.items())
    return kind in (bytearray, memoryview)


def loads(enc: int, data: bytes, buffers: Sequence[Buffer] = ()) -> Any:
    """Decode a value produced by ``dumps`` or ``dumps_oob`` (with the buffers it gave, as
    ``decode`` returned them). Only for frames from processes of the same user.

    Out-of-band buffers are not copied: the arrays and memoryviews decoded point into the
    received frames or shared-memory segments (``shm.attach``), which stay alive as long as
    they do. They are read-only, as Ray Serve's are (copy one to modify it).
    """
    if enc == Encoding.MSGPACK:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if enc == Encoding.PICKLE:
        if not buffers:
            return cloudpickle.loads(data)
        return cloudpickle.loads(data, buffers=[_readable(b) for b in buffers])
    raise ProtocolError(f"unknown payload encoding {enc}")


def _readable(buffer: Buffer) -> memoryview:
    if type(buffer) is SegmentRef:
        from shoal.runtime import shm  # only processes that receive segments map them

        return shm.attach(buffer)
    return memoryview(buffer).toreadonly()


# Buffers smaller than this stay inside the pickle (a copy is cheaper than a frame of its own).
OOB_MIN_BYTES = 64 * 1024


def dumps_oob(value: Any) -> tuple[Encoding, bytes, list[pickle.PickleBuffer]]:
    """``dumps``, with the large buffers ``value`` holds left out of the payload: numpy arrays
    (anything whose pickle protocol 5 reduction gives ``PickleBuffer``s) and ``bytes``,
    ``bytearray`` and ``memoryview`` objects of ``OOB_MIN_BYTES`` or more. Returns the
    encoding, the payload and those buffers, uncopied: they must stay unchanged until sent.
    ``loads(enc, payload, buffers)`` is the inverse; a ``bytes`` or ``bytearray`` comes back
    as its own type (one copy, on receipt), a memoryview or array as a read-only view of the
    received buffer."""
    if not _large_buffer_at_top(value):
        try:
            data = msgpack.packb(value, use_bin_type=True, strict_types=True)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            if not _BIN_MARKERS.search(data) or not _holds_buffer(value, len(data) >= OOB_MIN_BYTES):
                return Encoding.MSGPACK, data, []
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _OobPickler(out, buffers).dump(_wrap_bytes(value))
    return Encoding.PICKLE, out.getvalue(), buffers


def dumps_args_oob(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Encoding, bytes, list[pickle.PickleBuffer]]:
    """``dumps_args`` with out-of-band buffers (see ``dumps_oob``)."""
    return dumps_oob([list(args), kwargs])


_BUFFER_TYPES = (bytes, bytearray, memoryview)


def _large_buffer_at_top(value: Any, depth: int = 2) -> bool:
    """A cheap look for the common case: a large buffer among the arguments (``depth`` levels
    of lists and dicts), so that it is not packed into msgpack first for nothing."""
    kind = type(value)
    if kind in _BUFFER_TYPES:
        return bool(len(value) >= OOB_MIN_BYTES)
    if depth and kind is list:
        return any(_large_buffer_at_top(v, depth - 1) for v in value)
    if depth and kind is dict:
        return any(_large_buffer_at_top(v, depth - 1) for v in value.values())
    return False


class _OobBytes:
    """A large ``bytes`` or ``bytearray`` to pickle out of band: the pickler's fast path for
    those types bypasses ``reducer_override``, so ``_wrap_bytes`` puts them in this first."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        rebuild = _bytes_of if type(self.value) is bytes else _bytearray_of
        return rebuild, (pickle.PickleBuffer(self.value),)


def _wrap_bytes(value: Any) -> Any:
    """``value`` with every large ``bytes``/``bytearray`` inside lists, tuples and dicts (of
    exactly those types) wrapped in ``_OobBytes``; ``value`` itself if it holds none."""
    kind = type(value)
    if kind is bytes or kind is bytearray:
        return _OobBytes(value) if len(value) >= OOB_MIN_BYTES else value
    if kind is list or kind is tuple:
        items = [_wrap_bytes(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items if kind is list else tuple(items)
    if kind is dict:
        pairs = {k: _wrap_bytes(v) for k, v in value.items()}
        return value if all(pairs[k] is v for k, v in value.items()) else pairs
    return value


def _bytes_of(buffer: Any) -> bytes:
    return bytes(buffer)


def _bytearray_of(buffer: Any) -> bytearray:
    return bytearray(buffer)


def _memoryview_of(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if view.format == fmt and view.shape == shape:
        return view
    return view.cast("B").cast(cast(Any, fmt), shape)


class _OobPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle protocol 5 with buffers of ``OOB_MIN_BYTES`` or more out of band."""

    def __init__(self, out: io.BytesIO, buffers: list[pickle.PickleBuffer]) -> None:
        # Not a bound method: a pickler that refers to itself through its callback is a cycle
        # that the C pickler's garbage collection support does not handle (it crashed).
        super().__init__(out, protocol=5, buffer_callback=functools.partial(_take, buffers))

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is memoryview and obj.nbytes >= OOB_MIN_BYTES and obj.contiguous:
            return _memoryview_of, (pickle.PickleBuffer(obj), obj.format, obj.shape)
        return super().reducer_override(obj)


def _take(buffers: list[pickle.PickleBuffer], buffer: pickle.PickleBuffer) -> bool:
    """False (out of band: appended to ``buffers``) for a large contiguous buffer, True (in
    band) for the rest."""
    if not _contiguous(buffer) or buffer.raw().nbytes < OOB_MIN_BYTES:
        return True
    buffers.append(buffer)
    return False


def _contiguous(buffer: pickle.PickleBuffer) -> bool:
    try:
        buffer.raw()
    except BufferError:
        return False
    return True


def dumps_plain(value: Any) -> tuple[Encoding, bytes]:
    """Encode a value that must stay msgpack (replies to HTTP calls): TypeError if it is not
    plain (an ``IntEnum`` such as ``HTTPStatus``, a tuple, a bytearray ... included)."""
    try:
        data = msgpack.packb(value, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"not a plain msgpack value: {exc}") from exc
    if _BIN_MARKERS.search(data) and _holds_buffer(value):
        raise TypeError("not a plain msgpack value: holds a bytearray or memoryview")
    return Encoding.MSGPACK, data


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Encoding, bytes]:
    """Encode call arguments; positional arguments come back as a tuple from ``loads_args``."""
    return dumps([list(args), kwargs])


def loads_args(enc: int, data: bytes, buffers: Sequence[Buffer] = ()) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = loads(enc, data, buffers)
    return tuple(args), kwargs


def deployment_key(app_name: str, deployment_name: str) -> str:
    """The key of a deployment in snapshots and queue reports: ``app#deployment``."""
    return f"{app_name}#{deployment_name}"


def pack(value: Any) -> bytes:
    """msgpack for control-plane bodies: plain values only."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- data-plane headers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """The meta of a REQUEST: which method, for which request, how the payload is encoded.

    ``http``: the payload is an ASGI scope and receive message from the proxy; the replies must
    be msgpack (see ``ReplyHeader.from_meta``).
    """

    method: str = "__call__"
    request_id: str = ""
    enc: Encoding = Encoding.MSGPACK
    stream: bool = False
    multiplexed_model_id: str = ""
    route: str = ""
    http: bool = False

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"m": self.method, "rid": self.request_id, "enc": int(self.enc)}
        if self.stream:
            meta["s"] = True
        if self.multiplexed_model_id:
            meta["mx"] = self.multiplexed_model_id
        if self.route:
            meta["route"] = self.route
        if self.http:
            meta["http"] = True
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RequestHeader:
        """The header of a REQUEST's meta; ProtocolError if its encoding is unknown."""
        get = meta.get
        return request_header(
            get("m", "__call__"), get("rid", ""), _encoding(meta), get("s", False), get("mx", ""),
            get("route", ""), get("http", False),
        )


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """The meta of a reply: the payload's encoding and, on terminal replies, the replica's count
    of ongoing requests (all callers) after this one (``q``)."""

    enc: Encoding = Encoding.MSGPACK
    q: int = 0

    def to_meta(self) -> dict[str, Any]:
        return {"enc": int(self.enc), "q": self.q}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], plain_only: bool = False) -> ReplyHeader:
        """ProtocolError on an unknown encoding, or on pickle when ``plain_only`` (a reply to an
        HTTP call: nothing on that path is ever unpickled)."""
        enc = _encoding(meta)
        if plain_only and enc is not Encoding.MSGPACK:
            raise ProtocolError("a reply to an HTTP call must be msgpack")
        return _new_reply_header(enc, meta.get("q", 0))


def _setters(cls: type, *names: str) -> tuple[Any, ...]:
    return tuple(cls.__dict__[name].__set__ for name in names)


# Headers are decoded once per message. A frozen dataclass's generated __init__ assigns each field
# through object.__setattr__, several times slower than setting the slots directly, as these do.
_REQUEST_SETTERS = _setters(RequestHeader, "method", "request_id", "enc", "stream", "multiplexed_model_id", "route", "http")
_REPLY_SETTERS = _setters(ReplyHeader, "enc", "q")
_new_object = object.__new__


def request_header(
    method: str, request_id: str, enc: Encoding = Encoding.MSGPACK, stream: bool = False, mx: str = "",
    route: str = "", http: bool = False,
) -> RequestHeader:
    """``RequestHeader(...)``, built faster (the hot path builds one per call)."""
    m, r, e, s, x, t, h = _REQUEST_SETTERS
    header: RequestHeader = _new_object(RequestHeader)
    m(header, method), r(header, request_id), e(header, enc), s(header, stream), x(header, mx)
    t(header, route), h(header, http)
    return header


def _new_reply_header(enc: Encoding, q: int) -> ReplyHeader:
    e, q_set = _REPLY_SETTERS
    header: ReplyHeader = _new_object(ReplyHeader)
    e(header, enc), q_set(header, q)
    return header


def _encoding(meta: Mapping[str, Any]) -> Encoding:
    """The ``enc`` of a header; ProtocolError if it names no encoding."""
    value = meta.get("enc", 0)
    enc = _ENCODINGS.get(value) if isinstance(value, int) else None
    if enc is None:
        raise ProtocolError(f"unknown payload encoding {value!r}")
    return enc


def request(incarnation: int, call_id: int, header: RequestHeader, payload: bytes,
            buffers: tuple[Buffer, ...] = ()) -> Message:
    """A REQUEST. Its meta names the calling process (``p``: its pid), so that a reply's
    shared-memory segments name the process that must remove them (``shm``)."""
    meta = header.to_meta()
    meta["p"] = os.getpid()
    return Message(Kind.REQUEST, incarnation, call_id, meta, (payload,), buffers)


def caller_pid(meta: Mapping[str, Any]) -> int:
    """The pid of the process that sent a REQUEST (0 if it did not say)."""
    pid = meta.get("p", 0)
    return pid if isinstance(pid, int) else 0


def reply(kind: Kind, incarnation: int, call_id: int, enc: Encoding | None = None, data: bytes = b"",
          q: int = 0, model_ids: ModelIds | None = None, buffers: tuple[Buffer, ...] = ()) -> Message:
    """A reply of ``kind``; with ``enc``, it carries ``data`` (encoded that way) and its
    out-of-band ``buffers``. ``model_ids``: the multiplexed models the replica holds, riding on
    a terminal reply to a multiplexed call."""
    if model_ids is None:
        if enc is None:
            return Message(kind, incarnation, call_id, {"q": q})
        return Message(kind, incarnation, call_id, {"enc": int(enc), "q": q}, (data,), buffers)
    meta: dict[str, Any] = {"q": q} if enc is None else {"enc": int(enc), "q": q}
    meta["mx"] = [model_ids.version, list(model_ids.ids)]
    return Message(kind, incarnation, call_id, meta, () if enc is None else (data,), buffers)


@dataclass(frozen=True, slots=True)
class ModelIds:
    """The multiplexed model ids a replica holds (loaded or loading); ``version`` grows with
    every change, so a router keeps the newest of what replies and snapshots tell it."""

    version: int = 0
    ids: tuple[str, ...] = ()


def reply_model_ids(meta: Mapping[str, Any]) -> ModelIds | None:
    """The ``ModelIds`` a reply carries, if any."""
    value = meta.get("mx")
    return _model_ids(value) if value is not None else None


def _model_ids(value: Any) -> ModelIds:
    version, ids = value
    return ModelIds(int(version), tuple(str(i) for i in ids))


def routing_info(model_ids: ModelIds) -> dict[str, Any]:
    """The meta of a ROUTING_INFO message (the worker adds who it is, as for READY)."""
    return {"mx": [model_ids.version, list(model_ids.ids)]}


def routing_info_model_ids(meta: Mapping[str, Any]) -> ModelIds:
    """The ``ModelIds`` of a ROUTING_INFO message; ProtocolError if malformed."""
    try:
        return _model_ids(meta["mx"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad routing info: {exc!r}") from exc


# -- the controller's routing snapshot -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaAddress:
    """One replica incarnation and the endpoint its ROUTER socket is bound to."""

    replica_id: str
    incarnation: int
    endpoint: str


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """Which request router the callers of a deployment use (``RequestRouterConfig``).

    ``request_router_class`` is the built-in router's import path (``DEFAULT_ROUTER``), or a
    custom class cloudpickled by value at deploy (bytes; decoded only by processes of the same
    user, never by the supervisor's routing code).
    """

    request_router_class: str | bytes = ""
    request_router_kwargs: Mapping[str, Any] = field(default_factory=dict)
    initial_backoff_s: float = 0.025
    backoff_multiplier: float = 2.0
    max_backoff_s: float = 0.5

    @property
    def is_default(self) -> bool:
        return not self.request_router_class or self.request_router_class == DEFAULT_ROUTER


DEFAULT_ROUTER = "shoal.runtime.request_router:PowerOfTwoChoicesRequestRouter"


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    """What a router needs to know about one deployment. ``draining`` replicas take no new
    requests but keep their calls; ``failed_reason`` set means every call fails at once.
    ``model_ids`` and ``routing_stats`` are by replica id: the multiplexed models each holds,
    and the last ``record_routing_stats()`` of each, encoded (``dumps``: enc, data)."""

    replicas: tuple[ReplicaAddress, ...] = ()
    draining: tuple[ReplicaAddress, ...] = ()
    max_ongoing_requests: int = 5
    max_queued_requests: int = -1
    backpressure_status_code: int = 503
    backpressure_retry_after_s: float | None = None
    autoscaling: bool = False
    failed_reason: str | None = None
    router: RouterSpec = field(default_factory=RouterSpec)
    model_ids: Mapping[str, ModelIds] = field(default_factory=dict)
    routing_stats: Mapping[str, tuple[int, bytes]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """The application serving a route prefix, and its ingress deployment."""

    app_name: str
    ingress: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The controller's routing state, versioned: a router never applies an older one over a
    newer one. ``deployments`` is keyed by ``deployment_key``, ``routes`` by route prefix."""

    version: int = 0
    deployments: Mapping[str, DeploymentEntry] = field(default_factory=dict)
    routes: Mapping[str, RouteEntry] = field(default_factory=dict)

    def deployment(self, app_name: str, deployment_name: str) -> DeploymentEntry | None:
        return self.deployments.get(deployment_key(app_name, deployment_name))

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack values; ``Snapshot.from_wire`` is the inverse."""
        return {
            "version": self.version,
            "deployments": {key: _entry_to_wire(e) for key, e in self.deployments.items()},
            "routes": {p: {"app": r.app_name, "ingress": r.ingress} for p, r in self.routes.items()},
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Snapshot:
        """ProtocolError if ``data`` is not a snapshot."""
        try:
            return cls(
                int(data["version"]),
                {key: _entry_from_wire(e) for key, e in data.get("deployments", {}).items()},
                {p: RouteEntry(r["app"], r["ingress"]) for p, r in data.get("routes", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"bad snapshot: {exc!r}") from exc


def _entry_to_wire(entry: DeploymentEntry) -> dict[str, Any]:
    backpressure: dict[str, Any] = {"status_code": entry.backpressure_status_code}
    if entry.backpressure_retry_after_s is not None:
        backpressure["retry_after_s"] = entry.backpressure_retry_after_s
    return {
        "replicas": [[r.replica_id, r.incarnation, r.endpoint] for r in entry.replicas],
        "draining": [[r.replica_id, r.incarnation, r.endpoint] for r in entry.draining],
        "max_ongoing_requests": entry.max_ongoing_requests,
        "max_queued_requests": entry.max_queued_requests,
        "backpressure": backpressure,
        "autoscaling": entry.autoscaling,
        "failed_reason": entry.failed_reason,
        "router": _router_to_wire(entry.router),
        "model_ids": {rid: [m.version, list(m.ids)] for rid, m in entry.model_ids.items()},
        "routing_stats": {rid: [enc, data] for rid, (enc, data) in entry.routing_stats.items()},
    }


def _router_to_wire(spec: RouterSpec) -> dict[str, Any]:
    return {
        "class": spec.request_router_class,
        "kwargs": dict(spec.request_router_kwargs),
        "backoff": [spec.initial_backoff_s, spec.backoff_multiplier, spec.max_backoff_s],
    }


def _router_from_wire(data: Mapping[str, Any] | None) -> RouterSpec:
    if not data:
        return RouterSpec()
    initial, multiplier, maximum = data.get("backoff") or (0.025, 2.0, 0.5)
    return RouterSpec(data.get("class") or "", dict(data.get("kwargs") or {}), float(initial), float(multiplier), float(maximum))


def _entry_from_wire(data: Mapping[str, Any]) -> DeploymentEntry:
    backpressure = data.get("backpressure") or {}
    return DeploymentEntry(
        tuple(ReplicaAddress(str(r), int(i), str(e)) for r, i, e in data["replicas"]),
        tuple(ReplicaAddress(str(r), int(i), str(e)) for r, i, e in data.get("draining") or ()),
        int(data["max_ongoing_requests"]),
        int(data.get("max_queued_requests", -1)),
        int(backpressure.get("status_code", 503)),
        backpressure.get("retry_after_s"),
        bool(data.get("autoscaling", False)),
        data.get("failed_reason"),
        _router_from_wire(data.get("router")),
        {str(rid): _model_ids(m) for rid, m in (data.get("model_ids") or {}).items()},
        {str(rid): (int(enc), bytes(d)) for rid, (enc, d) in (data.get("routing_stats") or {}).items()},
    )


# -- authentication -----------------------------------------------------------------------------
#
# Every process that joins an instance holds the instance's secret key (``KEY_BYTES`` random
# bytes in a 0600 file of the run directory, created by the supervisor; see
# ``transport.read_key``). A signed frame is the frame followed by the first ``MAC_BYTES`` of
# HMAC-SHA256(key, frame). The MAC covers the whole frame (kind, incarnation, call id, meta and
# payload), so a READY signed for one replica incarnation cannot pass for another's, and a frame
# cut short or changed anywhere fails. ``verify`` looks at nothing but the length and the MAC:
# a frame is checked before any of it is decoded.
#
# Signed: every frame on the control socket (CALL, READY, REPLY). Not signed: the data plane
# (requests to replicas and their replies), whose sockets only the 0700 run directory guards.
# Measured (python -m timeit, best of 15 to 50, on a busy 2-core machine): sign 2.4-3.9 us and
# verify 2.8-3.9 us at 100 B, about the same at 1 KiB, 50-80 us each at 64 KiB. A handle call
# signs and verifies twice (request and reply): 11-15 us at typical sizes (a 63 B request, a 32 B
# reply), 4-5 % of a 280 us round trip, and over 100 us (35 % or more) when the request carries
# 64 KiB: over the 2 % we allowed it.

KEY_BYTES = 32
MAC_BYTES = 16


def sign(frame: bytes, key: bytes) -> bytes:
    """``frame`` followed by its MAC under ``key``; ``verify`` is the inverse."""
    return frame + hmac.digest(key, frame, "sha256")[:MAC_BYTES]


def verify(frame: bytes, key: bytes) -> bytes:
    """The frame ``sign`` was given, without its MAC. ProtocolError if ``frame`` is too short to
    be a signed frame or its MAC is not the one ``key`` gives (compared in constant time)."""
    if len(frame) < _HEADER.size + MAC_BYTES:
        raise ProtocolError(f"a signed frame has at least {_HEADER.size + MAC_BYTES} bytes, got {len(frame)}")
    body = frame[:-MAC_BYTES]
    if not hmac.compare_digest(frame[-MAC_BYTES:], hmac.digest(key, body, "sha256")[:MAC_BYTES]):
        raise ProtocolError("the frame's MAC does not match: not signed with this instance's key")
    return body


# -- gRPC calls ---------------------------------------------------------------------------------
#
# A gRPC call reaches a replica as plain data (``GrpcCallInfo``) and its status comes back as
# plain data (``GrpcOutcome``): the replica builds the user's ``RayServegRPCContext`` from the one
# and reads the other back from it (``shoal.serve.grpc_util``). Both are msgpack maps of plain
# values; nothing a gRPC client sent is ever pickled or unpickled. Metadata values are ``str``, or
# ``bytes`` for binary keys (ending in ``-bin``), as grpcio gives and takes them.

GrpcMetadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class GrpcCallInfo:
    """What the proxy knows of a gRPC call that a replica's ``RayServegRPCContext`` shows.

    ``method_path``: ``/package.Service/Method``. ``metadata``: the client's invocation metadata,
    in order. ``peer``: grpcio's peer string (``ipv4:127.0.0.1:5555``). ``auth_context``: grpcio's
    auth properties (name -> values), empty if unknown. ``deadline_s``: the seconds the call had
    left on the client's deadline when the proxy took it (``ServicerContext.time_remaining()``),
    None without a deadline.
    """

    method_path: str
    metadata: GrpcMetadata = ()
    peer: str = ""
    auth_context: dict[str, list[bytes]] = field(default_factory=dict)
    deadline_s: float | None = None

    def to_meta(self) -> dict[str, Any]:
        return {
            "path": self.method_path,
            "md": [[key, value] for key, value in self.metadata],
            "peer": self.peer,
            "auth": {name: list(values) for name, values in self.auth_context.items()},
            "dl": self.deadline_s,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> GrpcCallInfo:
        """The inverse of ``to_meta``; ProtocolError if ``meta`` is not one."""
        try:
            path, md, peer, auth, deadline_s = meta["path"], meta["md"], meta["peer"], meta["auth"], meta["dl"]
            if not isinstance(path, str) or not isinstance(peer, str) or not isinstance(auth, dict):
                raise TypeError("path, peer and auth must be str, str and map")
            if deadline_s is not None and not isinstance(deadline_s, int | float):
                raise TypeError(f"deadline {deadline_s!r} is not a number")
            auth_context = {_str(name): [_bytes(v) for v in values] for name, values in auth.items()}
            return cls(path, _grpc_metadata(md), peer, auth_context,
                       None if deadline_s is None else float(deadline_s))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad gRPC call info: {exc}") from exc


@dataclass(frozen=True, slots=True)
class GrpcOutcome:
    """What the user's method set on its ``RayServegRPCContext``, for the proxy to put on the call.

    ``code``: the ``grpc.StatusCode`` number (``StatusCode.X.value[0]``); 0 (OK) also when the
    method set none. ``details``: "" when it set none. ``trailing_metadata``: in order, the
    request id first when the proxy gave one. ``compression``: a ``grpc.Compression`` number, None
    when it set none.
    """

    code: int = 0
    details: str = ""
    trailing_metadata: GrpcMetadata = ()
    compression: int | None = None

    def to_meta(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "details": self.details,
            "tm": [[key, value] for key, value in self.trailing_metadata],
            "comp": self.compression,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> GrpcOutcome:
        """The inverse of ``to_meta``; ProtocolError if ``meta`` is not one."""
        try:
            code, details, tm, compression = meta["code"], meta["details"], meta["tm"], meta["comp"]
            if not isinstance(code, int) or isinstance(code, bool) or not isinstance(details, str):
                raise TypeError("code and details must be int and str")
            if compression is not None and (not isinstance(compression, int) or isinstance(compression, bool)):
                raise TypeError(f"compression {compression!r} is not an int")
            return cls(code, details, _grpc_metadata(tm), compression)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad gRPC outcome: {exc}") from exc


def _grpc_metadata(pairs: Any) -> GrpcMetadata:
    if not isinstance(pairs, list | tuple):
        raise TypeError(f"metadata {pairs!r} is not a list")
    metadata: list[tuple[str, str | bytes]] = []
    for pair in pairs:
        key, value = pair
        if not isinstance(value, str | bytes):
            raise TypeError(f"metadata value {value!r} is neither str nor bytes")
        metadata.append((_str(key), value))
    return tuple(metadata)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a str")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{value!r} is not bytes")
    return value

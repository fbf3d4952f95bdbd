"""shoal.runtime.wire: framing of messages and encoding of values (pure; no sockets)."""

from __future__ import annotations

import collections
import enum
import fractions
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgpack
import pytest
from helpers import exactly_equal

from shoal.runtime import wire
from shoal.runtime.wire import Encoding, Kind, Message, ProtocolError

# -- golden frames --------------------------------------------------------------------------------
#
# One REQUEST exactly as it goes on the socket. If this test fails, the framing changed: bump
# PROTOCOL_VERSION (replicas and supervisors of different versions must refuse each other) and
# update the bytes here in the same change, so the diff shows the new layout.


@pytest.fixture
def golden_request() -> tuple[Message, list[bytes]]:
    msg = Message(
        Kind.REQUEST,
        incarnation=7,
        call_id=42,
        meta={"m": "predict", "rid": "req-1", "enc": 0, "s": True},
        payload=(bytes.fromhex("92910180"),),  # msgpack of [[1], {}]: args (1,), no kwargs
    )
    frames = [
        # kind=1 (u8) | incarnation=7 (u32) | call_id=42 (u64) | meta length=29 (u32), big-endian
        bytes.fromhex("01" "00000007" "000000000000002a" "0000001d")
        # fixmap(4): "m": "predict", "rid": "req-1", "enc": 0, "s": true
        + bytes.fromhex("84" "a16d" "a770726564696374" "a3726964" "a57265712d31" "a3656e63" "00" "a173" "c3")
        # the payload
        + bytes.fromhex("92910180"),
    ]
    return msg, frames


def test_protocol_version_is_4() -> None:
    # Changing the layout below means a new protocol version; see the comment above.
    # (2: one frame per message instead of header, meta and payload frames; 3: a value's large
    # buffers as frames after it or shared-memory segments named in the meta, "p" in requests;
    # 4: BATCH frames and SLOT_FREE.)
    assert wire.PROTOCOL_VERSION == 4


def test_a_batch_encodes_to_golden_frames() -> None:
    one = wire.encode(Message(Kind.CANCEL, 1, 2))[0]
    two = wire.encode(Message(Kind.SLOT_FREE, 3))[0]
    with_buffer = [wire.encode(Message(Kind.RESULT, 1, 5, {"enc": 1}, (b"p",)))[0], b"BUF"]
    frames = wire.encode_batch([[one], [two], with_buffer])
    assert frames == [
        # kind=12 (BATCH) | incarnation=0 | call_id=3 (the number of messages) | meta length=0
        bytes.fromhex("0c" "00000000" "0000000000000003" "00000000")
        # per message: its frame's length (u32), its number of buffer frames (u32), the frame
        + bytes.fromhex("00000012" "00000000") + one
        + bytes.fromhex("00000012" "00000000") + two
        + bytes.fromhex("00000018" "00000001") + with_buffer[0],
        b"BUF",  # the buffer frames follow, in order
    ]
    assert wire.decode_batch(frames) == [[one], [two], with_buffer]


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([bytes.fromhex("0c" "00000000" "0000000000000001" "00000000")], "past the end"),
        ([bytes.fromhex("0c" "00000000" "0000000000000001" "00000000" "000000ff" "00000000") + b"x"], "past the end"),
        ([bytes.fromhex("0c" "00000000" "0000000000000001" "00000000" "00000001" "00000001") + b"x"], "buffer frames"),
        ([bytes.fromhex("0c" "00000000" "0000000000000000" "00000000") + b"extra"], "more than"),
        ([bytes.fromhex("0c" "00000000" "0000000000000000" "00000000"), b"stray buffer"], "more than"),
        ([bytes.fromhex("0c" "00000000" "0000000000000000" "00000001") + b"m"], "no meta"),
        ([bytes.fromhex("01" "00000000" "0000000000000000" "00000000")], "not a batch"),
    ],
)
def test_a_malformed_batch_is_a_protocol_error(frames: list[bytes], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        wire.decode_batch(frames)


def test_request_encodes_to_golden_frames(golden_request: tuple[Message, list[bytes]]) -> None:
    msg, frames = golden_request
    assert [bytes(f) for f in wire.encode(msg)] == frames


def test_golden_frames_decode_to_request(golden_request: tuple[Message, list[bytes]]) -> None:
    msg, frames = golden_request
    decoded = wire.decode(frames)
    assert decoded == msg
    assert decoded.kind is Kind.REQUEST
    assert wire.loads_args(decoded.meta["enc"], decoded.payload[0]) == ((1,), {})


def test_kind_numbers_are_stable() -> None:
    # New kinds may be added; the numbers of existing ones never change within a protocol version.
    assert {k.name: int(k) for k in Kind}.items() >= {
        "REQUEST": 1, "CANCEL": 2, "RESULT": 3, "ERROR": 4, "STREAM_ITEM": 5, "STREAM_END": 6,
        "REJECTED": 7, "CANCELLED": 8, "READY": 20, "CALL": 22, "REPLY": 23,
    }.items()
    assert {Kind.RESULT, Kind.ERROR, Kind.STREAM_END, Kind.REJECTED, Kind.CANCELLED} == wire.TERMINAL_KINDS


# -- message round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Message(Kind.CANCEL),
        Message(Kind.RESULT, 1, 2, {"enc": 1, "q": 0}, (b"\x80\x05payload",)),
        Message(Kind.STREAM_ITEM, 2**32 - 1, 2**64 - 1, {"enc": 0}, (b"\xc0",)),
        Message(Kind.ERROR, 3, 4, {"nested": {"a": [1, 2, {"b": None}]}, "bin": b"\x00\xff"}, (b"xyz",)),
        Message(Kind.READY, 9, 0, {"pid": 123, "protocol": 1, "endpoint": "ipc:///tmp/x/r1.sock"}),
        Message(Kind.CALL, 0, 17, {"op": "status", 5: "int key"}),
        Message(Kind.REQUEST, 1, 1, {"m": "__call__"}, (bytes(range(256)) * 4096,)),  # 1 MiB payload
    ],
    ids=lambda m: m.kind.name,
)
def test_message_round_trip(msg: Message) -> None:
    frames = wire.encode(msg)
    assert len(frames) == 1  # one frame per message
    assert frames[0].endswith(msg.payload[0] if msg.payload else b"")  # the payload, untouched, last
    assert wire.decode(frames) == msg


def test_at_most_one_payload() -> None:
    with pytest.raises(ValueError, match="at most one payload"):
        wire.encode(Message(Kind.RESULT, payload=(b"a", b"b")))


def test_decode_accepts_memoryview_frames() -> None:
    # Frames received with copy=False arrive as buffers, not bytes.
    msg = Message(Kind.RESULT, 5, 6, {"enc": 0}, (b"\x01",))
    frames = [memoryview(bytes(f)) for f in wire.encode(msg)]
    decoded = wire.decode(frames)  # type: ignore[arg-type]
    assert (decoded.kind, decoded.incarnation, decoded.call_id, decoded.meta) == (Kind.RESULT, 5, 6, {"enc": 0})
    assert [bytes(p) for p in decoded.payload] == [b"\x01"]


def test_message_is_frozen() -> None:
    msg = Message(Kind.CANCEL)
    with pytest.raises(AttributeError):
        msg.kind = Kind.RESULT  # type: ignore[misc]


# -- decode rejects garbage -----------------------------------------------------------------------


def _frame(kind: int, meta: bytes, meta_len: int | None = None, payload: bytes = b"") -> bytes:
    """One frame of the current layout: kind, incarnation 1, call_id 1, meta length, meta, payload."""
    length = len(meta) if meta_len is None else meta_len
    return bytes([kind]) + (1).to_bytes(4, "big") + (1).to_bytes(8, "big") + length.to_bytes(4, "big") + meta + payload


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([], id="no frames"),
        pytest.param([b""], id="empty frame"),
        pytest.param([_frame(1, b"")[:-1]], id="short header"),
        pytest.param([_frame(0x63, msgpack.packb({}))], id="unknown kind"),
        pytest.param([_frame(1, b"")], id="empty meta"),
        pytest.param([_frame(1, b"\xc1")], id="reserved msgpack byte"),
        pytest.param([_frame(1, b"\x82\xa1a")], id="truncated meta"),
        pytest.param([_frame(1, msgpack.packb({}), meta_len=100)], id="meta length past the end"),
        pytest.param([_frame(1, msgpack.packb({}) + b"\x00")], id="trailing bytes in meta"),
        pytest.param([_frame(1, msgpack.packb([1, 2]))], id="meta is a list"),
        pytest.param([_frame(1, msgpack.packb("text"))], id="meta is a str"),
        pytest.param([_frame(1, b"\x81\x90\x00")], id="meta with an unhashable (list) key"),
        pytest.param([_frame(1, b"\x81\x80\x00")], id="meta with an unhashable (map) key"),
        pytest.param([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], id="http"),
    ],
)
def test_decode_raises_protocol_error_on_garbage(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(frames)


def test_loads_rejects_unknown_encoding() -> None:
    with pytest.raises(ProtocolError, match="unknown payload encoding 9"):
        wire.loads(9, b"")


# -- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    x: int
    y: int


class Color(enum.IntEnum):
    RED = 1


class Weird:
    """A plain object with state; compared through its state."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Weird and other.value == self.value

    def __repr__(self) -> str:  # a stable test id
        return f"Weird({self.value!r})"

    __hash__ = None  # type: ignore[assignment]


PLAIN_VALUES = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, float("inf"), "", "héllo ✓", b"", b"\x00\xff",
    [], {}, [1, "a", None, [2.5, [b"x"]]], {"a": {"b": {"c": [1, {"d": None}]}}}, {1: "int key", 2: [3]},
]

PICKLED_VALUES = [
    (), (1,), (1, [2, (3,)]), [(1, 2), (3, 4)], {"k": (1, 2)}, {(1, 2): "tuple key"},
    2**64, -(2**63) - 1, 10**100, {"big": 2**70},
    Point(1, 2), [Point(3, 4)], Weird({"nested": (1, b"x")}), Color.RED, {1, 2, 3}, frozenset({"a"}),
    collections.OrderedDict(a=1), fractions.Fraction(1, 3), complex(1, 2),
    ValueError("an exception"),
]

# Containers msgpack would flatten into another type (bytearray -> bytes, dict subclass -> dict).
SUBTYPE_VALUES = [bytearray(b"ab"), [bytearray(b"")], collections.Counter("aab"), collections.defaultdict(int)]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=repr)
def test_plain_values_travel_as_msgpack(value: Any) -> None:
    enc, data = wire.dumps(value)
    assert enc is Encoding.MSGPACK
    assert exactly_equal(wire.loads(enc, data), value)


@pytest.mark.parametrize("value", PICKLED_VALUES, ids=repr)
def test_other_values_travel_as_pickle_and_round_trip_exactly(value: Any) -> None:
    enc, data = wire.dumps(value)
    assert enc is Encoding.PICKLE
    back = wire.loads(enc, data)
    if isinstance(value, BaseException):
        assert type(back) is type(value) and back.args == value.args
    else:
        assert exactly_equal(back, value)


@pytest.mark.parametrize("value", SUBTYPE_VALUES, ids=repr)
def test_subtypes_of_plain_types_keep_their_type(value: Any) -> None:
    # dumps promises msgpack only "when it round-trips exactly"; a bytearray argument must not
    # arrive in the replica as bytes.
    assert exactly_equal(wire.loads(*wire.dumps(value)), value)


def test_nan_round_trips() -> None:
    enc, data = wire.dumps(float("nan"))
    back = wire.loads(enc, data)
    assert isinstance(back, float) and back != back


def test_tuple_and_list_stay_distinct() -> None:
    for value, kind in (([1, 2], list), ((1, 2), tuple), ([(1,), [2]], list)):
        back = wire.loads(*wire.dumps(value))
        assert type(back) is kind
    nested = wire.loads(*wire.dumps([(1,), [2]]))
    assert type(nested[0]) is tuple and type(nested[1]) is list


def test_bool_is_not_confused_with_int() -> None:
    assert wire.loads(*wire.dumps([True, 1, 0, False])) == [True, 1, 0, False]
    assert [type(v) for v in wire.loads(*wire.dumps([True, 1, 0, False]))] == [bool, int, int, bool]


def test_there_are_two_encodings() -> None:
    assert {e.name: int(e) for e in Encoding} == {"MSGPACK": 0, "PICKLE": 1}


@pytest.mark.parametrize(
    "value",
    [HTTPStatus.OK, (1, 2), bytearray(b"x"), [Point(1, 2)], {"status": HTTPStatus.NOT_FOUND}, 2**64],
    ids=repr,
)
def test_dumps_plain_refuses_what_would_need_pickle(value: Any) -> None:
    with pytest.raises(TypeError, match="not a plain msgpack value"):
        wire.dumps_plain(value)


def test_dumps_plain_accepts_asgi_messages() -> None:
    batch = [{"type": "http.response.start", "status": 200, "headers": [[b"a", b"b"]]},
             {"type": "http.response.body", "body": b"hi", "more_body": False}]
    assert wire.loads(*wire.dumps_plain(batch)) == batch


def test_function_and_lambda_round_trip() -> None:
    square = wire.loads(*wire.dumps(lambda x: x * x))
    assert square(7) == 49


def test_dumps_raises_for_an_unpicklable_value() -> None:
    import threading

    with pytest.raises(TypeError):
        wire.dumps(threading.Lock())


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1, "a"), {}),
        ((), {"x": [1, 2]}),
        (((1, 2), [3]), {"t": (4,)}),
        ((Point(1, 2),), {"p": Point(3, 4)}),
    ],
)
def test_call_arguments_round_trip(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    back_args, back_kwargs = wire.loads_args(*wire.dumps_args(args, kwargs))
    assert type(back_args) is tuple
    assert exactly_equal(back_args, args)
    assert exactly_equal(back_kwargs, kwargs)


def test_pack_unpack_control_bodies() -> None:
    body = {"name": "app", "deployments": [{"definition": b"\x80\x05", "config": {"num_replicas": 2}}]}
    assert wire.unpack(wire.pack(body)) == body

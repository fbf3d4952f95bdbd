"""Out-of-band buffers in ``wire``: values with large buffers round-trip, and neither encoding
nor decoding copies them (proven with ``np.shares_memory``), while small messages stay one frame."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
import zmq

from shoal.runtime import transport, wire
from shoal.runtime.reply import decode_reply

np = pytest.importorskip("numpy")

BIG = wire.OOB_MIN_BYTES


def _frames_of(value: Any) -> tuple[wire.Encoding, list[Any]]:
    enc, data, buffers = wire.dumps_oob(value)
    msg = wire.reply(wire.Kind.RESULT, 1, 2, enc, data, buffers=tuple(b.raw() for b in buffers))
    return enc, wire.encode(msg)


def _round_trip(value: Any) -> Any:
    _, frames = _frames_of(value)
    msg = wire.decode(frames)
    return decode_reply(msg).value


def test_small_values_stay_one_msgpack_frame() -> None:
    for value in (None, 1, "x", b"y" * 100, [1, {"a": b"z" * (BIG - 100)}]):
        enc, frames = _frames_of(value)
        assert enc is wire.Encoding.MSGPACK
        assert len(frames) == 1
        assert _round_trip(value) == value


def test_small_arrays_stay_in_band() -> None:
    array = np.arange(16, dtype=np.float32)
    enc, frames = _frames_of(array)
    assert enc is wire.Encoding.PICKLE
    assert len(frames) == 1
    assert np.array_equal(_round_trip(array), array)


def test_an_array_travels_as_its_own_frame_without_a_copy() -> None:
    array = np.arange(BIG, dtype=np.float32)
    _, frames = _frames_of(array)
    assert len(frames) == 2
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float32), array)  # sent uncopied
    back = decode_reply(wire.decode(frames)).value
    assert np.array_equal(back, array)
    assert np.shares_memory(back, np.frombuffer(frames[1], dtype=np.float32))  # received uncopied
    assert not back.flags.writeable  # read-only, as Ray Serve's


def test_buffer_types_keep_their_type() -> None:
    raw = bytes(range(256)) * (BIG // 256 + 1)
    value = {"b": raw, "ba": bytearray(raw), "mv": memoryview(raw), "nested": [(raw, 1)]}
    _, frames = _frames_of(value)
    assert len(frames) == 5  # the message, then one frame per large buffer
    back = _round_trip(value)
    assert type(back["b"]) is bytes and back["b"] == raw
    assert type(back["ba"]) is bytearray and back["ba"] == raw
    assert type(back["mv"]) is memoryview and back["mv"].tobytes() == raw
    assert back["nested"] == [(raw, 1)]


def test_a_received_memoryview_points_into_the_frame() -> None:
    raw = bytearray(BIG * 2)
    _, frames = _frames_of(memoryview(raw).cast("B", (2, BIG)))
    back = decode_reply(wire.decode(frames)).value
    assert back.shape == (2, BIG)
    assert np.shares_memory(np.asarray(back), np.frombuffer(frames[1], dtype=np.uint8))


def test_nested_arrays_in_objects_and_shared_arrays() -> None:
    a = np.ones((512, 64), dtype=np.float64)
    b = a[::2]  # not contiguous: pickled in band
    value = {"a": a, "again": a, "b": b, "t": (a, 3)}
    _, frames = _frames_of(value)
    assert len(frames) == 2  # ``a`` once, however often it appears
    back = _round_trip(value)
    assert back["a"] is back["again"]
    assert np.array_equal(back["b"], b)
    assert back["t"][1] == 3


def test_arguments_round_trip_with_buffers() -> None:
    array = np.arange(BIG, dtype=np.int64)
    enc, data, buffers = wire.dumps_args_oob((array, "x"), {"k": bytes(BIG)})
    assert len(buffers) == 2
    args, kwargs = wire.loads_args(enc, data, [b.raw() for b in buffers])
    assert np.array_equal(args[0], array) and args[1] == "x" and kwargs["k"] == bytes(BIG)


def test_segment_refs_keep_their_place_among_the_frames() -> None:
    frame_a, frame_b = b"a" * 10, b"b" * 10
    buffers = (frame_a, wire.SegmentRef("1-0-1", 100), frame_b, wire.SegmentRef("1-0-2", 200))
    msg = wire.Message(wire.Kind.RESULT, 1, 2, {"enc": 1, "q": 0}, (b"payload",), buffers)
    frames = wire.encode(msg)
    assert frames[1:] == [frame_a, frame_b]
    back = wire.decode(frames)
    assert back.buffers == buffers
    assert "shm" not in back.meta


@pytest.mark.parametrize("segments", [[[5, "1-0-1", 10]], [["x", "1-0-1", 10]], [[0, "1-0-1"]]])
def test_a_bad_segment_list_is_a_protocol_error(segments: Any) -> None:
    frames = wire.encode(wire.Message(wire.Kind.RESULT, 1, 2, {"enc": 1, "shm": segments}, (b"p",)))
    with pytest.raises(wire.ProtocolError):
        wire.decode(frames)


def test_a_reply_to_an_http_call_refuses_buffers() -> None:
    msg = wire.Message(wire.Kind.RESULT, 1, 2, {"enc": 0, "q": 0}, (wire.pack(1),), (b"x" * 10,))
    with pytest.raises(wire.ProtocolError):
        decode_reply(msg, plain_only=True)


def test_pickle_buffers_are_what_dumps_oob_returns() -> None:
    _, _, buffers = wire.dumps_oob(np.zeros(BIG, dtype=np.uint8))
    assert all(isinstance(b, pickle.PickleBuffer) for b in buffers)


def test_a_channel_receives_buffers_without_copies(tmp_path: Any) -> None:
    """Through real sockets, the array that comes out points into the frame ZeroMQ received."""
    endpoint = f"ipc://{tmp_path}/oob.sock"

    async def main() -> tuple[Any, Any, list[Any]]:
        router = transport.make_socket(zmq.ROUTER)
        router.bind(endpoint)
        got: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        server = transport.Channel(router, got.set_result)
        dealer = transport.make_socket(zmq.DEALER)
        dealer.connect(endpoint)
        client = transport.Channel(dealer, lambda frames: None)
        try:
            array = np.arange(1 << 20, dtype=np.float32)
            enc, data, buffers = wire.dumps_oob(array)
            header = wire.request_header("m", "r", enc)
            client.send_message(wire.request(1, 1, header, data, tuple(b.raw() for b in buffers)))
            async with asyncio.timeout(10):
                frames = await got
            msg = wire.decode(frames[1:])
            return array, wire.loads(msg.meta["enc"], msg.payload[0], msg.buffers), frames
        finally:
            client.close()
            server.close()

    array, back, frames = asyncio.run(main())
    assert [type(f) for f in frames] == [bytes, bytes, memoryview]  # identity, message, buffer
    assert np.array_equal(back, array)
    assert np.shares_memory(back, np.frombuffer(frames[2], dtype=np.float32))

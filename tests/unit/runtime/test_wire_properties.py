"""Property-based round trips of shoal.runtime.wire (skipped when hypothesis is not installed)."""

from __future__ import annotations

from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from helpers import exactly_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.runtime import wire
from shoal.runtime.wire import Kind, Message, ProtocolError

# No example database (nothing is written to the checkout); applied per test, not as a global
# profile, so other modules' hypothesis settings stay theirs.
property_test = settings(database=None, deadline=None, max_examples=100)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: big ints must fall back to pickle
    st.floats(allow_nan=True),
    st.text(),
    st.binary(),
)
hashable = st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary())
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(hashable, st.tuples(hashable)), children, max_size=4),
    ),
    max_leaves=20,
)

meta_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(), st.binary()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(), children, max_size=3)),
    max_leaves=10,
)
messages = st.builds(
    Message,
    kind=st.sampled_from(list(Kind)),
    incarnation=st.integers(0, 2**32 - 1),
    call_id=st.integers(0, 2**64 - 1),
    meta=st.dictionaries(st.one_of(st.text(), st.integers(0, 1000)), meta_values, max_size=5),
    payload=st.lists(st.binary(min_size=1, max_size=64), max_size=1).map(tuple),  # empty = no payload
)


@property_test
@given(values)
def test_any_value_round_trips_exactly(value: Any) -> None:
    assert exactly_equal(wire.loads(*wire.dumps(value)), value)


@property_test
@given(st.lists(values, max_size=3).map(tuple), st.dictionaries(st.text(), values, max_size=3))
def test_call_arguments_round_trip_exactly(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    back_args, back_kwargs = wire.loads_args(*wire.dumps_args(args, kwargs))
    assert exactly_equal(back_args, args)
    assert exactly_equal(back_kwargs, kwargs)


@property_test
@given(messages)
def test_any_message_round_trips(msg: Message) -> None:
    assert wire.decode(wire.encode(msg)) == msg


@property_test
@given(st.lists(st.binary(max_size=40), max_size=4))
def test_decode_of_arbitrary_frames_is_a_message_or_protocol_error(frames: list[bytes]) -> None:
    try:
        msg = wire.decode(frames)
    except ProtocolError:
        return
    assert isinstance(msg, Message) and isinstance(msg.meta, dict)


@property_test
@given(st.binary(max_size=40), st.binary(max_size=8))
def test_decode_of_arbitrary_meta_is_a_message_or_protocol_error(meta: bytes, payload: bytes) -> None:
    # One frame of the current layout whose meta length is right but whose meta is anything.
    header = bytes.fromhex("03" "00000001" "0000000000000001") + len(meta).to_bytes(4, "big")
    try:
        msg = wire.decode([header + meta + payload])
    except ProtocolError:
        return
    assert msg.kind is Kind.RESULT and isinstance(msg.meta, dict)


request_headers = st.builds(
    wire.RequestHeader,
    method=st.text(), request_id=st.text(), enc=st.sampled_from(list(wire.Encoding)), stream=st.booleans(),
    multiplexed_model_id=st.text(), route=st.text(), http=st.booleans(),
)
reply_headers = st.builds(wire.ReplyHeader, enc=st.sampled_from(list(wire.Encoding)), q=st.integers(0, 2**31))
addresses = st.builds(wire.ReplicaAddress, replica_id=st.text(), incarnation=st.integers(0, 2**32 - 1), endpoint=st.text())
entries = st.builds(
    wire.DeploymentEntry,
    replicas=st.lists(addresses, max_size=3).map(tuple), draining=st.lists(addresses, max_size=2).map(tuple),
    max_ongoing_requests=st.integers(1, 10**6), max_queued_requests=st.integers(-1, 10**6),
    backpressure_status_code=st.integers(100, 599),
    backpressure_retry_after_s=st.none() | st.floats(0, 1e6), autoscaling=st.booleans(),
    failed_reason=st.none() | st.text(),
)
snapshots = st.builds(
    wire.Snapshot,
    version=st.integers(0, 2**62),
    deployments=st.dictionaries(st.text(), entries, max_size=3),
    routes=st.dictionaries(st.text(), st.builds(wire.RouteEntry, st.text(), st.text()), max_size=3),
)


@property_test
@given(request_headers, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32))
def test_any_request_round_trips_through_frames(header: wire.RequestHeader, inc: int, call_id: int, payload: bytes) -> None:
    msg = wire.decode(wire.encode(wire.request(inc, call_id, header, payload)))
    assert (msg.kind, msg.incarnation, msg.call_id, msg.payload) == (Kind.REQUEST, inc, call_id, (payload,))
    assert wire.RequestHeader.from_meta(msg.meta) == header


@property_test
@given(reply_headers, st.sampled_from(sorted(wire.TERMINAL_KINDS | {Kind.STREAM_ITEM})), st.binary(max_size=16))
def test_any_reply_header_round_trips_through_frames(header: wire.ReplyHeader, kind: Kind, data: bytes) -> None:
    msg = wire.decode(wire.encode(wire.reply(kind, 1, 2, header.enc, data, header.q)))
    assert wire.ReplyHeader.from_meta(msg.meta) == header


@property_test
@given(snapshots)
def test_any_snapshot_round_trips_through_msgpack(snapshot: wire.Snapshot) -> None:
    assert wire.Snapshot.from_wire(wire.unpack(wire.pack(snapshot.to_wire()))) == snapshot


@property_test
@given(st.lists(st.tuples(messages, st.lists(st.binary(max_size=32), max_size=3)), min_size=1, max_size=8))
def test_a_batch_of_messages_round_trips_in_order_with_their_buffer_frames(
    batch: list[tuple[Message, list[bytes]]],
) -> None:
    encoded = [[wire.encode(msg)[0], *buffers] for msg, buffers in batch]
    frames = wire.encode_batch(encoded)
    assert wire.is_batch(frames[0])
    assert len(frames) == 1 + sum(len(buffers) for _, buffers in batch)
    decoded = wire.decode_batch(frames)
    assert decoded == encoded
    assert [wire.decode(parts[:1]) for parts in decoded] == [msg for msg, _ in batch]


@property_test
@given(messages)
def test_no_single_message_frame_is_taken_for_a_batch(msg: Message) -> None:
    assert wire.is_batch(wire.encode(msg)[0]) is (msg.kind is Kind.BATCH)


@property_test
@given(st.lists(st.binary(max_size=24), min_size=1, max_size=4), st.binary(max_size=40))
def test_a_cut_or_extended_batch_is_refused_not_misread(bodies: list[bytes], junk: bytes) -> None:
    frame = wire.encode_batch([[b] for b in bodies])[0]
    for cut in range(wire._HEADER.size, len(frame)):
        with pytest.raises(ProtocolError):
            wire.decode_batch([frame[:cut]])
    if junk:
        with pytest.raises(ProtocolError):
            wire.decode_batch([frame + junk])

"""Property-based round trips of shoal.runtime.wire (skipped when hypothesis is not installed)."""

from __future__ import annotations

from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from helpers import exactly_equal  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from shoal.runtime import wire  # noqa: E402
from shoal.runtime.wire import Kind, Message, ProtocolError  # noqa: E402

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
@given(st.binary(max_size=40))
def test_decode_of_arbitrary_meta_is_a_message_or_protocol_error(meta: bytes) -> None:
    header = bytes.fromhex("03" "00000001" "0000000000000001")
    try:
        wire.decode([header, meta])
    except ProtocolError:
        pass

"""shoal.runtime.wire: the data-plane headers and the routing snapshot, as they look on the wire.

Golden values: if one of these fails, the contract changed; bump ``PROTOCOL_VERSION`` and update
the bytes in the same change.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest

from shoal.runtime import wire
from shoal.runtime.errors import RemoteError
from shoal.runtime.reply import END, decode_reply
from shoal.runtime.wire import Encoding, Kind, ProtocolError


def test_request_header_golden_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # a request names its caller: "p"
    header = wire.RequestHeader("predict", "req-1", Encoding.MSGPACK, stream=True)
    frames = wire.encode(wire.request(7, 42, header, bytes.fromhex("92910180")))
    assert frames == [
        bytes.fromhex("01" "00000007" "000000000000002a" "00000022")
        + bytes.fromhex("85" "a16d" "a770726564696374" "a3726964" "a57265712d31" "a3656e63" "00" "a173" "c3")
        + bytes.fromhex("a170" "cd1092")
        + bytes.fromhex("92910180")
    ]


def test_request_header_keys() -> None:
    header = wire.RequestHeader("m1", "r1", Encoding.PICKLE, True, "model-a", "/app", True)
    assert header.to_meta() == {"m": "m1", "rid": "r1", "enc": 1, "s": True, "mx": "model-a", "route": "/app", "http": True}
    # Defaults stay off the wire: a plain call carries method, request id and encoding only.
    assert wire.RequestHeader("__call__", "r2").to_meta() == {"m": "__call__", "rid": "r2", "enc": 0}
    assert wire.RequestHeader.from_meta({"m": "__call__", "rid": "r2", "enc": 0}) == wire.RequestHeader("__call__", "r2")


def test_reply_golden_frame() -> None:
    frames = wire.encode(wire.reply(Kind.RESULT, 7, 42, Encoding.MSGPACK, b"\x01", q=3))
    assert frames == [
        bytes.fromhex("03" "00000007" "000000000000002a" "00000009")
        + bytes.fromhex("82" "a3656e63" "00" "a171" "03")  # {"enc": 0, "q": 3}
        + b"\x01"
    ]
    assert wire.encode(wire.reply(Kind.REJECTED, 1, 2, q=5)) == [
        bytes.fromhex("07" "00000001" "0000000000000002" "00000004") + bytes.fromhex("81" "a171" "05")
    ]


@pytest.mark.parametrize("meta", [{"enc": 9}, {"m": "x", "enc": "zip"}], ids=repr)
def test_headers_refuse_unknown_encodings(meta: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        wire.ReplyHeader.from_meta(meta)
    with pytest.raises(ProtocolError):
        wire.RequestHeader.from_meta(meta)


def test_replies_to_http_calls_refuse_pickle() -> None:
    msg = wire.reply(Kind.STREAM_ITEM, 1, 1, *wire.dumps((1, 2)))  # a tuple needs pickle
    with pytest.raises(ProtocolError, match="must be msgpack"):
        decode_reply(msg, plain_only=True)
    assert decode_reply(msg).value == (1, 2)


def test_decode_reply_kinds() -> None:
    result = decode_reply(wire.reply(Kind.RESULT, 1, 1, *wire.dumps({"a": 1}), q=4))
    assert (result.kind, result.value, result.q) == (Kind.RESULT, {"a": 1}, 4)
    assert decode_reply(wire.reply(Kind.STREAM_END, 1, 1)).value is END
    assert decode_reply(wire.reply(Kind.STREAM_END, 1, 1, *wire.dumps(None))).value is None
    error = decode_reply(wire.reply(Kind.ERROR, 1, 1, *wire.dumps((ValueError("bad"), "Traceback ..."))))
    assert isinstance(error.value, ValueError) and isinstance(error.value, RemoteError)
    plain = decode_reply(wire.reply(Kind.ERROR, 1, 1, *wire.dumps_plain([None, "text"])), plain_only=True)
    assert "text" in str(plain.value)


# What controller/controller.py::_publish sends today; routers must keep reading it.
CONTROLLER_SNAPSHOT = {
    "version": 3,
    "deployments": {
        "app#D": {
            "replicas": [["app#D#a1", 2, "ipc:///run/a1.sock"]],
            "draining": [["app#D#a0", 1, "ipc:///run/a0.sock"]],
            "max_ongoing_requests": 7,
            "max_queued_requests": 10,
            "backpressure": {"status_code": 429, "retry_after_s": 1.5},
            "autoscaling": True,
            "failed_reason": None,
        },
        "app#E": {
            "replicas": [], "draining": [], "max_ongoing_requests": 5, "max_queued_requests": -1,
            "backpressure": {}, "autoscaling": False, "failed_reason": "boom",
        },
    },
    "routes": {"/app": {"app": "app", "ingress": "D"}},
}


def test_snapshot_from_the_controller() -> None:
    snap = wire.Snapshot.from_wire(msgpack.unpackb(msgpack.packb(CONTROLLER_SNAPSHOT), raw=False))
    assert snap.version == 3
    d = snap.deployment("app", "D")
    assert d == wire.DeploymentEntry(
        replicas=(wire.ReplicaAddress("app#D#a1", 2, "ipc:///run/a1.sock"),),
        draining=(wire.ReplicaAddress("app#D#a0", 1, "ipc:///run/a0.sock"),),
        max_ongoing_requests=7, max_queued_requests=10, backpressure_status_code=429,
        backpressure_retry_after_s=1.5, autoscaling=True, failed_reason=None,
    )
    e = snap.deployment("app", "E")
    assert e is not None and e.failed_reason == "boom" and e.backpressure_status_code == 503
    assert snap.deployment("app", "missing") is None
    assert snap.routes == {"/app": wire.RouteEntry("app", "D")}
    assert wire.Snapshot.from_wire(snap.to_wire()) == snap


@pytest.mark.parametrize("data", [{}, {"version": "x"}, {"version": 1, "deployments": {"k": {"replicas": [[1]]}}}], ids=repr)
def test_bad_snapshots_raise_protocol_error(data: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        wire.Snapshot.from_wire(data)


def test_the_fast_header_constructors_build_equal_frozen_headers() -> None:
    fast = wire.request_header("m", "r", Encoding.PICKLE, True, "mx", "/r", True)
    assert fast == wire.RequestHeader("m", "r", Encoding.PICKLE, True, "mx", "/r", True)
    assert wire.request_header("m", "r") == wire.RequestHeader("m", "r")
    assert hash(fast) == hash(wire.RequestHeader("m", "r", Encoding.PICKLE, True, "mx", "/r", True))
    with pytest.raises(AttributeError):
        fast.method = "other"  # type: ignore[misc]
    assert wire.ReplyHeader.from_meta({"enc": 1, "q": 2}) == wire.ReplyHeader(Encoding.PICKLE, 2)

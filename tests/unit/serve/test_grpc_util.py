"""shoal.serve.grpc_util: RayServegRPCContext built from plain call data and read back as plain
data (GrpcCallInfo/GrpcOutcome in runtime/wire.py), gRPCInputStream, and the proxy-side
conversions, end to end through a real grpc.aio server and client."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.runtime.wire import GrpcCallInfo, GrpcOutcome, ProtocolError
from shoal.serve import grpc_util
from shoal.serve.grpc_util import RayServegRPCContext, apply_outcome, call_info, gRPCInputStream, status_code

pytestmark = pytest.mark.timeout(60)

RAY_PYTHON = Path("/work/ray-venv/bin/python")

CALL = GrpcCallInfo(
    method_path="/ray.serve.UserDefinedService/Method1",
    metadata=(("application", "app1"), ("request_id", "rid-1"), ("multiplexed_model_id", "m7"),
              ("traceparent", "00-abc-def-01"), ("tracestate", "k=v"), ("blob-bin", b"\x00\xff"),
              ("application", "app2")),
    peer="ipv4:127.0.0.1:5555",
    auth_context={"transport_security_type": [b"insecure"]},
    deadline_s=4.5,
)


def over_the_wire(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` after msgpack, as wire.py packs and unpacks a message's meta."""
    unpacked: dict[str, Any] = msgpack.unpackb(msgpack.packb(meta, use_bin_type=True), raw=False, strict_map_key=False)
    return unpacked


# -- reading the call --


def test_context_reads_the_call_as_rays_does() -> None:
    ctx = RayServegRPCContext.from_call(CALL)
    assert ctx.invocation_metadata() == list(CALL.metadata)
    assert ctx.peer() == "ipv4:127.0.0.1:5555"
    assert ctx.auth_context() == {"transport_security_type": [b"insecure"]}
    assert ctx.application() == "app2"  # the last value of a repeated key, as Ray's dict
    assert ctx.request_id() == "rid-1"
    assert ctx.multiplexed_model_id() == "m7"
    assert (ctx.traceparent(), ctx.tracestate()) == ("00-abc-def-01", "k=v")
    assert ctx.method_path() == "/ray.serve.UserDefinedService/Method1"
    assert (ctx.peer_identity_key(), ctx.peer_identities()) == (None, None)
    assert ctx.code() is None and ctx.details() == "" and ctx.trailing_metadata() == []


def test_missing_metadata_reads_none() -> None:
    ctx = RayServegRPCContext.from_call(GrpcCallInfo("/s.S/M"))
    assert (ctx.application(), ctx.request_id(), ctx.multiplexed_model_id()) == (None, None, None)
    assert ctx.invocation_metadata() == [] and ctx.auth_context() == {}


def test_peer_identity_follows_grpc_cores_rule() -> None:
    cn_only = GrpcCallInfo("/s.S/M", auth_context={"x509_common_name": [b"client"]})
    ctx = RayServegRPCContext.from_call(cn_only)
    assert (ctx.peer_identity_key(), ctx.peer_identities()) == ("x509_common_name", [b"client"])
    with_san = GrpcCallInfo("/s.S/M", auth_context={"x509_common_name": [b"client"],
                                                    "x509_subject_alternative_name": [b"a.example", b"b.example"]})
    ctx = RayServegRPCContext.from_call(with_san)
    assert ctx.peer_identity_key() == "x509_subject_alternative_name"
    assert ctx.peer_identities() == [b"a.example", b"b.example"]


def test_returned_lists_are_copies() -> None:
    ctx = RayServegRPCContext.from_call(CALL)
    ctx.invocation_metadata().clear()
    ctx.auth_context()["transport_security_type"].clear()
    assert ctx.invocation_metadata() == list(CALL.metadata)
    assert ctx.auth_context() == {"transport_security_type": [b"insecure"]}


# -- setting the outcome --


def test_nothing_set_is_an_empty_outcome() -> None:
    assert RayServegRPCContext.from_call(CALL).outcome() == GrpcOutcome(0, "", (), None)


def test_outcome_carries_what_the_method_set() -> None:
    ctx = RayServegRPCContext.from_call(CALL, request_id="rid-9")
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("no such fruit")
    ctx.set_trailing_metadata([("fruit", "kiwi"), ("raw-bin", b"\x01")])
    ctx.set_compression(grpc.Compression.Gzip)
    assert ctx.code() is grpc.StatusCode.NOT_FOUND
    assert ctx.details() == "no such fruit"
    assert ctx.outcome() == GrpcOutcome(
        code=5, details="no such fruit",
        trailing_metadata=(("request_id", "rid-9"), ("fruit", "kiwi"), ("raw-bin", b"\x01")),
        compression=int(grpc.Compression.Gzip),
    )


def test_request_id_stays_first_in_trailing_metadata_as_in_ray() -> None:
    ctx = RayServegRPCContext.from_call(CALL, request_id="rid-9")
    assert ctx.trailing_metadata() == [("request_id", "rid-9")]
    ctx.set_trailing_metadata([("a", "1")])
    ctx.set_trailing_metadata([("b", "2")])  # replaces, as grpcio and Ray do
    assert ctx.trailing_metadata() == [("request_id", "rid-9"), ("b", "2")]
    ctx.set_trailing_metadata(iter([("c", "3")]))  # any iterable of pairs
    assert ctx.trailing_metadata() == [("request_id", "rid-9"), ("c", "3")]
    without_id = RayServegRPCContext.from_call(CALL)
    without_id.set_trailing_metadata([("a", "1")])
    assert without_id.trailing_metadata() == [("a", "1")]


def test_set_code_ok_and_details_none() -> None:
    ctx = RayServegRPCContext.from_call(CALL)
    ctx.set_code(grpc.StatusCode.OK)
    ctx.set_details("x")
    ctx.set_details(None)
    assert ctx.outcome() == GrpcOutcome(0, "", (), None)


@pytest.mark.parametrize("bad", [5, "NOT_FOUND", None])
def test_set_code_takes_a_status_code(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"set_code\(\) takes a grpc.StatusCode"):
        RayServegRPCContext.from_call(CALL).set_code(bad)


def test_set_details_and_compression_refuse_other_types() -> None:
    ctx = RayServegRPCContext.from_call(CALL)
    with pytest.raises(TypeError, match=r"set_details\(\) takes a str"):
        ctx.set_details(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"set_compression\(\) takes a grpc.Compression"):
        ctx.set_compression("gzip")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        ([("Upper", "x")], ValueError, "use lowercase letters"),
        ([("sp ace", "x")], ValueError, "'sp ace'"),
        ([(1, "x")], ValueError, "key 1"),
        ([("k", b"bytes")], TypeError, "bytes only for keys ending in '-bin'"),
        ([("k", 3)], TypeError, "must be a str"),
        ([("k-bin", 3)], TypeError, "a '-bin' key takes bytes"),
        (["kv"], TypeError, "pairs, got 'kv'"),
        ([("a", "b", "c")], TypeError, "pairs"),
    ],
)
def test_bad_trailing_metadata_is_refused_naming_it(items: list[Any], error: type[Exception], match: str) -> None:
    ctx = RayServegRPCContext.from_call(CALL, request_id="r")
    with pytest.raises(error, match=match):
        ctx.set_trailing_metadata(items)
    assert ctx.trailing_metadata() == [("request_id", "r")]  # unchanged


def test_status_code_numbers() -> None:
    for code in grpc.StatusCode:
        assert status_code(code.value[0]) is code
    with pytest.raises(ValueError, match="17 is not a gRPC status code"):
        status_code(17)


def test_context_pickles_for_a_handle_call_between_the_users_processes() -> None:
    """Ray's context is serializable; a method may pass it on to another deployment."""
    ctx = RayServegRPCContext.from_call(CALL, request_id="r")
    ctx.set_code(grpc.StatusCode.ABORTED)
    copy = pickle.loads(pickle.dumps(ctx))
    assert copy.outcome() == ctx.outcome()
    assert copy.invocation_metadata() == ctx.invocation_metadata()


# -- the wire dataclasses --


# No deadline: on a loaded machine an example may take longer than hypothesis's default 200 ms.
property_test = settings(database=None, deadline=None, max_examples=100)
_text = st.text(max_size=20)
_metadata = st.lists(st.tuples(_text, st.one_of(_text, st.binary(max_size=20))), max_size=5).map(tuple)


@property_test
@given(
    st.builds(
        GrpcCallInfo, method_path=_text, metadata=_metadata, peer=_text,
        auth_context=st.dictionaries(_text, st.lists(st.binary(max_size=10), max_size=3), max_size=3),
        deadline_s=st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
    )
)
def test_call_info_round_trips_through_msgpack(call: GrpcCallInfo) -> None:
    assert GrpcCallInfo.from_meta(over_the_wire(call.to_meta())) == call


@property_test
@given(
    st.builds(
        GrpcOutcome, code=st.integers(0, 16), details=_text, trailing_metadata=_metadata,
        compression=st.one_of(st.none(), st.integers(0, 2)),
    )
)
def test_outcome_round_trips_through_msgpack(outcome: GrpcOutcome) -> None:
    assert GrpcOutcome.from_meta(over_the_wire(outcome.to_meta())) == outcome


def test_wire_dataclasses_are_plain_msgpack() -> None:
    # strict_types: a tuple or any non-plain object would fail to pack
    msgpack.packb(CALL.to_meta(), use_bin_type=True, strict_types=True)
    msgpack.packb(RayServegRPCContext.from_call(CALL, request_id="r").outcome().to_meta(),
                  use_bin_type=True, strict_types=True)


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"path": 1, "md": [], "peer": "", "auth": {}, "dl": None},
        {"path": "/a/b", "md": [["k", 1]], "peer": "", "auth": {}, "dl": None},
        {"path": "/a/b", "md": [["k"]], "peer": "", "auth": {}, "dl": None},
        {"path": "/a/b", "md": "x", "peer": "", "auth": {}, "dl": None},
        {"path": "/a/b", "md": [], "peer": "", "auth": {"k": ["not bytes"]}, "dl": None},
        {"path": "/a/b", "md": [], "peer": "", "auth": {}, "dl": "soon"},
    ],
)
def test_malformed_call_info_is_a_protocol_error(meta: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="bad gRPC call info"):
        GrpcCallInfo.from_meta(meta)


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"code": "5", "details": "", "tm": [], "comp": None},
        {"code": True, "details": "", "tm": [], "comp": None},
        {"code": 0, "details": b"", "tm": [], "comp": None},
        {"code": 0, "details": "", "tm": [[1, "v"]], "comp": None},
        {"code": 0, "details": "", "tm": [], "comp": "gzip"},
    ],
)
def test_malformed_outcome_is_a_protocol_error(meta: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="bad gRPC outcome"):
        GrpcOutcome.from_meta(meta)


# -- gRPCInputStream --


async def _requests(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


def test_input_stream_yields_the_requests_then_stops() -> None:
    async def test() -> None:
        stream: gRPCInputStream[int] = gRPCInputStream(_requests(3))
        assert [r async for r in stream] == [0, 1, 2]
        assert stream.is_exhausted and not stream.is_cancelled()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(test())


def test_input_stream_stops_when_cancelled() -> None:
    async def test() -> None:
        event = asyncio.Event()
        stream: gRPCInputStream[int] = gRPCInputStream(_requests(5), cancel_event=event)
        assert await stream.__anext__() == 0
        event.set()
        assert stream.is_cancelled()
        assert [r async for r in stream] == []
        assert stream.is_exhausted
        other: gRPCInputStream[int] = gRPCInputStream(_requests(5))
        other.cancel()
        assert [r async for r in other] == [] and other.is_cancelled()

    asyncio.run(test())


# -- end to end: a real grpcio call, through plain data, and back --


def test_a_call_through_plain_data_and_back_reaches_the_client() -> None:
    """The proxy's side (call_info, apply_outcome) around the replica's (from_call, outcome),
    with msgpack between them as on the wire."""

    async def test() -> None:
        seen: dict[str, Any] = {}

        async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            info_meta = over_the_wire(call_info("/test.Echo/Call", context).to_meta())
            # -- in the replica --
            ctx = RayServegRPCContext.from_call(GrpcCallInfo.from_meta(info_meta), request_id="rid-42")
            seen.update(app=ctx.application(), peer=ctx.peer(), md=ctx.invocation_metadata(),
                        deadline_s=GrpcCallInfo.from_meta(info_meta).deadline_s)
            ctx.set_code(grpc.StatusCode.NOT_FOUND)
            ctx.set_details("nothing here")
            ctx.set_trailing_metadata([("extra", "1"), ("extra-bin", b"\x00\x01")])
            outcome_meta = over_the_wire(ctx.outcome().to_meta())
            # -- back in the proxy --
            apply_outcome(context, GrpcOutcome.from_meta(outcome_meta))
            return request

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Echo/Call")(
                    b"hi", metadata=(("application", "fruit"), ("key-bin", b"\xff")), timeout=20)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                error = info.value
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert error.details() == "nothing here"
                trailing = list(error.trailing_metadata() or ())
                assert ("request_id", "rid-42") in trailing
                assert ("extra", "1") in trailing and ("extra-bin", b"\x00\x01") in trailing
        finally:
            await server.stop(None)
        assert seen["app"] == "fruit"
        assert ("key-bin", b"\xff") in seen["md"]
        assert seen["peer"].startswith("ipv4:127.0.0.1:")
        assert 0 < seen["deadline_s"] <= 20

    asyncio.run(asyncio.wait_for(test(), 30))


def test_apply_outcome_leaves_alone_what_the_method_did_not_set() -> None:
    async def test() -> None:
        async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            if request == b"nothing set":
                apply_outcome(context, GrpcOutcome())
                assert context.code() is None and context.details() == "" and context.trailing_metadata() == ()
            else:
                apply_outcome(context, GrpcOutcome(trailing_metadata=(("k", "v"),), compression=int(grpc.Compression.Gzip)))
            return b"ok"

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Echo/Call")(b"nothing set", timeout=20)
                assert await call == b"ok"
                assert await call.code() == grpc.StatusCode.OK
                call = channel.unary_unary("/test.Echo/Call")(b"metadata, gzip", timeout=20)
                assert await call == b"ok"
                assert await call.code() == grpc.StatusCode.OK
                assert ("k", "v") in list(await call.trailing_metadata() or ())
        finally:
            await server.stop(None)

    asyncio.run(asyncio.wait_for(test(), 30))


# -- the same names as Ray's module --

_RAY_NAMES = """
import inspect, json
import ray.serve.grpc_util as m
classes = {name: sorted(n for n in dir(obj) if not n.startswith("_"))
           for name, obj in vars(m).items() if inspect.isclass(obj) and obj.__module__ == m.__name__}
print(json.dumps(classes))
"""


def _ray_public_classes() -> dict[str, list[str]]:
    if not RAY_PYTHON.exists():
        pytest.skip(f"Ray Serve is not installed at {RAY_PYTHON} (the reference for Ray's names)")
    done = subprocess.run([str(RAY_PYTHON), "-c", _RAY_NAMES], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"Ray's ray.serve.grpc_util does not import there: {done.stderr.strip()[-300:]}")
    names: dict[str, list[str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return names


def test_module_offers_rays_classes_and_their_public_methods() -> None:
    ray_classes = _ray_public_classes()
    assert set(ray_classes) <= set(grpc_util.__all__)
    for name, methods in ray_classes.items():
        ours = getattr(grpc_util, name)
        missing = [m for m in methods if not hasattr(ours, m)]
        assert not missing, f"{name} lacks Ray's {missing}"

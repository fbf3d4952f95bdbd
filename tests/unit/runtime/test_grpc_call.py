"""A gRPC call on the replica's side (``grpc_call.serve``), with the user's class in-process."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_protos import stubs

from shoal.runtime import grpc_call, wire
from shoal.runtime.errors import gRPCStatusError
from shoal.runtime.user_code import UserCallable


@pytest.fixture(scope="module")
def pb2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return stubs.modules(tmp_path_factory.mktemp("stubs"))[0]


def _user(pb2: Any) -> UserCallable:
    class Greeter:
        def Hello(self, request: Any) -> Any:
            return pb2.HelloReply(message=f"hello {request.name}")

        async def Stream(self, request: Any) -> Any:
            for i in range(request.count):
                yield pb2.HelloReply(message=str(i))

        def Fail(self, request: Any) -> Any:
            raise ValueError("bad")

        def StatusError(self, request: Any) -> Any:
            raise gRPCStatusError(ValueError("x"), grpc.StatusCode.NOT_FOUND, "")

        def Context(self, request: Any, grpc_context: Any) -> Any:
            grpc_context.set_code(grpc.StatusCode.ABORTED)
            grpc_context.set_details("stop")
            return pb2.HelloReply()

        async def Collect(self, requests: Any) -> Any:
            return pb2.HelloReply(message=",".join([r.name async for r in requests]))

    return UserCallable(deployment_name="Greeter", func_or_class=Greeter, init_args=(), init_kwargs={},
                        max_ongoing_requests=4)


def _serve(pb2: Any, method: str, request: Any = None, streamed: list[Any] | None = None) -> tuple[Any, list[bytes]]:
    async def main() -> tuple[Any, list[bytes]]:
        user = _user(pb2)
        await user.construct()
        items: list[bytes] = []
        queue = list(streamed or [])

        async def send_item(data: bytes) -> None:
            items.append(data)

        async def next_message() -> Any:
            return grpc_call.input_message(queue.pop(0).SerializeToString() if queue else None)

        call = wire.GrpcCallInfo(method_path=f"/shoaltest.Greeter/{method}")
        data = request.SerializeToString() if request is not None else b""
        payload = grpc_call.request_payload(call, stubs.SERVICER_FUNCTION, data)
        final, _error = await grpc_call.serve(user, payload, "rid-1", send_item, next_message)
        return grpc_call.read_final(wire.unpack(wire.pack(final))), items

    return asyncio.run(main())


def test_unary(pb2: Any) -> None:
    (outcome, response), _ = _serve(pb2, "Hello", pb2.HelloRequest(name="x"))
    assert outcome.code == grpc_call.OK
    assert pb2.HelloReply.FromString(response).message == "hello x"
    assert ("request_id", "rid-1") in outcome.trailing_metadata


def test_server_streaming_sends_each_item(pb2: Any) -> None:
    (outcome, response), items = _serve(pb2, "Stream", pb2.HelloRequest(count=3))
    assert outcome.code == grpc_call.OK and response is None
    assert [pb2.HelloReply.FromString(i).message for i in items] == ["0", "1", "2"]


def test_client_streaming_reads_the_messages(pb2: Any) -> None:
    (outcome, response), _ = _serve(pb2, "Collect", streamed=[pb2.HelloRequest(name=n) for n in "ab"])
    assert outcome.code == grpc_call.OK
    assert pb2.HelloReply.FromString(response).message == "a,b"


def test_user_exception_is_internal_with_type_and_message(pb2: Any) -> None:
    (outcome, response), _ = _serve(pb2, "Fail", pb2.HelloRequest())
    assert (outcome.code, outcome.details, response) == (grpc.StatusCode.INTERNAL.value[0], "ValueError: bad", None)


def test_grpc_status_error_without_details_gives_the_original_message(pb2: Any) -> None:
    (outcome, _), _ = _serve(pb2, "StatusError", pb2.HelloRequest())
    assert (outcome.code, outcome.details) == (grpc.StatusCode.NOT_FOUND.value[0], "x")


def test_grpc_context_outcome(pb2: Any) -> None:
    (outcome, _), _ = _serve(pb2, "Context", pb2.HelloRequest())
    assert (outcome.code, outcome.details) == (grpc.StatusCode.ABORTED.value[0], "stop")


def test_a_path_the_function_does_not_register_is_unimplemented(pb2: Any) -> None:
    (outcome, _), _ = _serve(pb2, "Nope", pb2.HelloRequest())
    assert outcome.code == grpc.StatusCode.UNIMPLEMENTED.value[0]

"""Discovering the RPCs of a servicer function (stubs generated in-process with grpcio-tools)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_protos import stubs

from shoal.runtime import grpc_services
from shoal.runtime.grpc_services import GrpcServicerError, MethodSpec


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("stubs")
    stubs.generate(out)
    stubs.importable(out)
    yield out


def test_discover_lists_paths_and_kinds(generated: Path) -> None:
    specs = {s.path: s for s in grpc_services.discover(stubs.SERVICER_FUNCTION)}
    assert specs["/shoaltest.Greeter/Hello"].kind == grpc_services.UNARY_UNARY
    assert specs["/shoaltest.Greeter/Stream"].kind == grpc_services.UNARY_STREAM
    assert specs["/shoaltest.Greeter/Collect"].kind == grpc_services.STREAM_UNARY
    assert specs["/shoaltest.Greeter/Chat"].kind == grpc_services.STREAM_STREAM
    hello = specs["/shoaltest.Greeter/Hello"]
    assert (hello.service, hello.method_name) == ("shoaltest.Greeter", "Hello")
    assert MethodSpec.from_wire(hello.to_wire()) == hello


def test_codecs_parse_and_serialize_with_protobuf(generated: Path) -> None:
    import greeter_pb2

    codec = grpc_services.codecs(stubs.SERVICER_FUNCTION)["/shoaltest.Greeter/Hello"]
    request = codec.parse(greeter_pb2.HelloRequest(name="x", count=3).SerializeToString())
    assert (request.name, request.count) == ("x", 3)
    data = codec.serialize(greeter_pb2.HelloReply(message="m"))
    assert greeter_pb2.HelloReply.FromString(data).message == "m"


def test_discover_all_keeps_the_first_function_of_a_path(generated: Path) -> None:
    specs = grpc_services.discover_all([stubs.SERVICER_FUNCTION, stubs.SERVICER_FUNCTION])
    assert len(specs) == len({s.path for s in specs}) == 11


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("no_such_module_pb2_grpc.add_X", "'no_such_module_pb2_grpc.add_X' can't be imported"),
        ("os.sep", "'os.sep' is not a callable function"),
        ("os.getcwd", "'os.getcwd' failed when called with (servicer, server)"),
        ("builtins.print", "'builtins.print' registered no gRPC method"),
    ],
)
def test_a_function_that_cannot_serve_is_named(function: str, error: str) -> None:
    with pytest.raises(GrpcServicerError) as info:
        grpc_services.discover(function)
    assert error in str(info.value)

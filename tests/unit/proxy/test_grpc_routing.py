"""The gRPC ingress's pure parts: which application a call goes to, health, options, details."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest

from shoal.proxy.grpc_server import MAX_DETAILS_CHARS, GrpcIngress, GrpcOptions, _Status, _truncate
from shoal.proxy.metrics import IngressMetrics
from shoal.runtime import wire
from shoal.runtime.grpc_services import UNARY_UNARY, MethodSpec


class FakeRuntime:
    def __init__(self, routes: dict[str, tuple[str, str]], version: int = 1) -> None:
        self.snapshot = wire.Snapshot(version, {}, {p: wire.RouteEntry(a, i) for p, (a, i) in routes.items()})


def _ingress(routes: dict[str, tuple[str, str]], version: int = 1) -> GrpcIngress:
    options = GrpcOptions("127.0.0.1", 0, (MethodSpec("/pkg.S/M", UNARY_UNARY, "m_pb2_grpc.add"),))
    metrics = IngressMetrics(socket.gethostname(), "127.0.0.1", protocol="gRPC")
    return GrpcIngress(FakeRuntime(routes, version), options, metrics)  # type: ignore[arg-type]


def test_application_metadata_picks_the_application() -> None:
    ingress = _ingress({"/a": ("a", "A"), "/b": ("b", "B")})
    target = ingress._target("b")
    assert (target.app_name, target.ingress, target.prefix) == ("b", "B", "/b")
    assert ingress.application_names() == ["a", "b"]


def test_one_application_takes_every_call_as_in_ray() -> None:
    ingress = _ingress({"/": ("only", "Ingress")})
    assert ingress._target("").app_name == "only"
    assert ingress._target("anything").app_name == "only"


@pytest.mark.parametrize(
    ("app", "details"),
    [
        ("", "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."),
        ("c", "Application 'c' not found. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."),
    ],
)
def test_unknown_or_missing_application_is_not_found_with_rays_message(app: str, details: str) -> None:
    with pytest.raises(_Status) as info:
        _ingress({"/a": ("a", "A"), "/b": ("b", "B")})._target(app)
    assert (info.value.code, info.value.details) == (grpc.StatusCode.NOT_FOUND, details)


def test_health_follows_routes_and_draining() -> None:
    assert not _ingress({}, version=0).is_healthy()
    assert _ingress({}, version=0).unhealthy_message() == "Route table is not populated yet."
    ingress = _ingress({"/": ("a", "A")})
    assert ingress.is_healthy()
    ingress.draining = True
    assert not ingress.is_healthy()
    assert ingress.unhealthy_message() == "This node is being drained."


def test_options_from_the_proxy_spec() -> None:
    spec: dict[str, Any] = {"host": "127.0.0.1", "port": 9001, "methods": [["/pkg.S/M", UNARY_UNARY, "m.add"]],
                            "request_timeout_s": 2.5, "enable_reflection": False}
    options = GrpcOptions.from_spec(spec)
    assert options == GrpcOptions("127.0.0.1", 9001, (MethodSpec("/pkg.S/M", UNARY_UNARY, "m.add"),), 2.5, False)


def test_long_details_are_truncated_as_ray_does() -> None:
    assert _truncate("short") == "short"
    long = _truncate("x" * 10_000)
    assert len(long) == MAX_DETAILS_CHARS and long.endswith("... [truncated]")

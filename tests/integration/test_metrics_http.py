"""The proxy's HTTP ingress metrics and the router/handle metrics, scraped from a real instance.

A real supervisor, proxy and replicas (``metrics_port: 0``); real HTTP and WebSocket clients;
the instance's metrics endpoint read with ``helpers.scrape``. Counts are exact: each test uses
its own application and route, and waits (``wait_until``) for the count it expects, since the
proxy records a request just after its last byte went out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI, WebSocket
from helpers import Samples, live_children, sample_value, scrape, shutdown_serve, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "metrics_port": 0})
    base = serve.get_http_url()
    assert base is not None
    yield base
    shutdown_serve()


def settled(check: Any, timeout_s: float = 15) -> Samples:
    """Scrape until ``check(samples)`` holds (the proxy records just after it answered); the samples."""
    return wait_until(lambda: (lambda s: s if check(s) else None)(scrape()), timeout_s, str(check))  # type: ignore[no-any-return]


def labels_of(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    wanted = set(labels.items())
    return [dict(have) for (sample, have) in samples if sample == name and wanted <= have]


@serve.deployment
class Plain:
    async def __call__(self, request: Request) -> Any:
        kind = request.url.path.rsplit("/", 1)[-1]
        if kind == "fail":
            raise ValueError("user code failed")
        if kind == "stream":
            return StreamingResponse(iter([b"a", b"b", b"c"]))
        return "ok"


def test_http_outcomes_are_counted_with_rays_labels(url: str) -> None:
    app, route = "metrics_plain", "/mplain"
    serve.run(Plain.bind(), name=app, route_prefix=route)
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            assert client.get(f"{route}/ok").status_code == 200
        assert client.get(f"{route}/fail").status_code == 500
        with client.stream("GET", f"{route}/stream") as streamed:
            assert b"".join(streamed.iter_bytes()) == b"abc"
        assert client.post("/no-such-route/x").status_code == 404

    common = {"route": route, "application": app, "method": "GET"}
    ok = {**common, "status_code": "200"}
    samples = settled(lambda s: sample_value(s, "ray_serve_num_http_requests_total", **ok) == 4
                      and sample_value(s, "ray_serve_num_http_requests_total", **common, status_code="500") == 1
                      and sample_value(s, "ray_serve_num_http_requests_total", route="", method="POST") == 1)
    assert sample_value(samples, "ray_serve_http_request_latency_ms_count", **ok) == 4
    assert sample_value(samples, "ray_serve_http_request_latency_ms_bucket", **ok, le="+Inf") == 4
    assert sample_value(samples, "ray_serve_http_request_latency_ms_bucket", **ok, le="600000.0") == 4
    assert sample_value(samples, "ray_serve_http_request_latency_ms_count", **common, status_code="500") == 1

    # Errors: per route and per (ingress) deployment; a 200 is not one.
    assert sample_value(samples, "ray_serve_num_http_error_requests_total", **common, error_code="500") == 1
    assert sample_value(samples, "ray_serve_num_http_error_requests_total", **common, error_code="200") is None
    assert sample_value(samples, "ray_serve_num_deployment_http_error_requests_total", **common,
                        deployment="Plain", error_code="500") == 1
    # A path no route matches: route, application and deployment "" (Ray: no per-path series).
    assert labels_of(samples, "ray_serve_num_http_requests_total", method="POST") == [
        {"route": "", "method": "POST", "application": "", "status_code": "404"}
    ]
    assert sample_value(samples, "ray_serve_num_http_error_requests_total", route="", method="POST",
                        application="", error_code="404") == 1
    assert sample_value(samples, "ray_serve_num_deployment_http_error_requests_total", route="", method="POST",
                        application="", deployment="", error_code="404") == 1

    # The ongoing gauge has the proxy's node labels and is back to 0.
    ongoing = labels_of(samples, "ray_serve_num_ongoing_http_requests")
    assert len(ongoing) == 1 and set(ongoing[0]) == {"node_id", "node_ip_address"}
    assert ongoing[0]["node_ip_address"] == "127.0.0.1"
    assert sample_value(samples, "ray_serve_num_ongoing_http_requests") == 0

    # The proxy's router and handle for the ingress: 5 requests reached it (not the 404).
    router = {"deployment": "Plain", "application": app, "actor_id": "proxy"}
    assert sample_value(samples, "ray_serve_num_router_requests_total", **router, route=route) == 5
    [router_labels] = labels_of(samples, "ray_serve_num_router_requests_total", **router)
    handle_id = router_labels["handle"]
    assert sample_value(samples, "ray_serve_handle_request_counter_total", deployment="Plain", application=app,
                        route=route, handle=f"{app}#Plain#{handle_id}") == 5
    settled(lambda s: sample_value(s, "ray_serve_deployment_queued_queries", **router, handle=handle_id) == 0
            and sample_value(s, "ray_serve_num_ongoing_requests_at_replicas", **router, handle=handle_id) == 0)


def test_health_and_routes_are_counted_as_ray_counts_them(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        before = sample_value(scrape(), "ray_serve_num_http_requests_total", route="/-/healthz") or 0
        assert client.get("/-/healthz").status_code == 200
    settled(lambda s: sample_value(s, "ray_serve_num_http_requests_total", route="/-/healthz", method="GET",
                                   application="", status_code="200") == before + 1)


@serve.deployment
class Child:
    def __call__(self, x: int) -> int:
        return x + 1


@serve.deployment
class Parent:
    def __init__(self, child: DeploymentHandle) -> None:
        self.child = child

    async def __call__(self, request: Request) -> int:
        first = await self.child.remote(1)
        return int(await self.child.remote(first))


def test_composition_records_router_and_handle_metrics_in_the_replica(url: str) -> None:
    app, route = "metrics_compose", "/mcompose"
    serve.run(Parent.bind(Child.bind()), name=app, route_prefix=route)
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            assert client.get(route).text == "3"

    child = {"deployment": "Child", "application": app}
    samples = settled(lambda s: sample_value(s, "ray_serve_num_router_requests_total", **child, route=route) == 6
                      and sample_value(s, "ray_serve_handle_request_counter_total", **child, route=route) == 6)
    [router] = labels_of(samples, "ray_serve_num_router_requests_total", **child)
    assert router["actor_id"].startswith(f"{app}#Parent#")  # the calling replica's full id
    [handle] = labels_of(samples, "ray_serve_handle_request_counter_total", **child)
    assert handle["handle"].startswith(f"{app}#Child#")
    tags = {**child, "handle": router["handle"], "actor_id": router["actor_id"]}
    settled(lambda s: sample_value(s, "ray_serve_deployment_queued_queries", **tags) == 0
            and sample_value(s, "ray_serve_num_ongoing_requests_at_replicas", **tags) == 0)
    # The HTTP side saw three 200s for the parent's route (the proxy flushes on its own schedule).
    settled(lambda s: sample_value(s, "ray_serve_num_http_requests_total", route=route, application=app,
                                   status_code="200") == 3)


ws_api = FastAPI()


@serve.deployment
@serve.ingress(ws_api)
class Sockets:
    @ws_api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message.get("text") == "close-me":
                await websocket.close(code=4001)
                return
            if message["type"] == "websocket.disconnect":
                return
            await websocket.send_text("echo")


def test_websockets_are_counted_with_their_close_codes(url: str) -> None:
    app, route = "metrics_ws", "/mws"
    serve.run(Sockets.bind(), name=app, route_prefix=route)
    ws_url = url.replace("http", "ws") + f"{route}/ws"

    async def talk(close_me: bool) -> None:
        async with websockets.connect(ws_url) as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo"
            if close_me:
                await ws.send("close-me")
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()

    asyncio.run(talk(close_me=True))  # the app closes with 4001: an error
    asyncio.run(talk(close_me=False))  # the client closes with 1000: an error too, as in Ray
    ws = {"route": route, "application": app, "method": "WS"}
    samples = settled(lambda s: sample_value(s, "ray_serve_num_http_requests_total", **ws, status_code="4001") == 1
                      and sample_value(s, "ray_serve_num_http_requests_total", **ws, status_code="1000") == 1)
    assert sample_value(samples, "ray_serve_num_http_error_requests_total", **ws, error_code="4001") == 1
    assert sample_value(samples, "ray_serve_num_deployment_http_error_requests_total", **ws, deployment="Sockets",
                        error_code="4001") == 1


def test_head_refusals_are_counted_without_a_route(url: str) -> None:
    before = sample_value(scrape(), "ray_serve_num_http_requests_total", route="", status_code="431") or 0
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/mplain/ok", headers={"x-big": "y" * (128 * 1024)}).status_code == 431
    samples = settled(lambda s: sample_value(s, "ray_serve_num_http_requests_total", route="", application="",
                                             status_code="431") == before + 1)
    assert sample_value(samples, "ray_serve_num_http_error_requests_total", route="", error_code="431") == before + 1


def test_a_driver_handle_records_nothing_in_the_instance(url: str) -> None:
    """A driver's handles record in the driver's memory: the exposition has no DRIVER series."""
    app = "metrics_driver"
    handle = serve.run(Child.bind(), name=app, route_prefix=None)
    assert handle.remote(1).result() == 2
    assert labels_of(scrape(), "ray_serve_num_router_requests_total", application=app) == []

"""HTTP through the proxy: routing, request and response conversion, ingress apps, streaming,
WebSockets, request ids, timeouts, cancellation, backpressure and body limits.

Real proxy and replica processes, real HTTP and WebSocket clients; one instance per module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import websockets
from fastapi import Depends, FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse
from helpers import wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve
from shoal.runtime.context import current_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def url(serve_instance: Any) -> str:
    base = serve.get_http_url()
    assert base is not None
    return base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def run_http(app: Any, name: str, prefix: str) -> None:
    serve.run(app, name=name, route_prefix=prefix)


@pytest.fixture
def mounted(serve_instance: Any) -> Iterator[Any]:
    """``mounted(app, name, prefix)`` deploys with a route prefix; deleted after the test."""
    names: list[str] = []

    def deploy(app: Any, name: str, prefix: str) -> None:
        names.append(name)
        serve.run(app, name=name, route_prefix=prefix)

    yield deploy
    for name in reversed(names):
        serve.delete(name)


# -- plain deployments ---------------------------------------------------------------------------


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path"),
            "query": dict(request.query_params),
            "header": request.headers.get("x-custom"),
            "body_len": len(body),
            "body_head": body[:16].decode("latin-1"),
            "request_id": current_request().request_id,
        }


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Item(pydantic.BaseModel):
    name: str
    price: float


@serve.deployment
class Returns:
    async def __call__(self, request: Request) -> Any:
        kind = request.query_params["kind"]
        return {
            "str": "héllo",
            "bytes": b"\x00raw",
            "none": None,
            "dict": {"a": 1},
            "list": [1, "two"],
            "dataclass": Point(1, 2),
            "pydantic": Item(name="x", price=1.5),
            "response": PlainTextResponse("custom", status_code=201, headers={"x-made": "yes"}),
        }[kind]


@serve.deployment
def no_arg() -> str:
    return "no argument"


@serve.deployment
class Raises:
    def __call__(self, request: Request) -> str:
        raise ValueError("secret detail in /secret/path")


def test_plain_request_reaches_the_replica_intact(mounted: Any, client: httpx.Client) -> None:
    mounted(Echo.bind(), "echo", "/echo")
    r = client.post("/echo/sub/path?a=1&b=two", content=b"hello body", headers={"x-custom": "value"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["method"] == "POST"
    assert data["path"] == "/echo/sub/path"
    assert data["root_path"] == "/echo"
    assert data["query"] == {"a": "1", "b": "two"}
    assert data["header"] == "value"
    assert data["body_len"] == len(b"hello body")


def test_large_and_chunked_bodies(mounted: Any, client: httpx.Client) -> None:
    mounted(Echo.bind(), "echo_big", "/big")
    big = os.urandom(3 * 1024 * 1024)
    assert client.post("/big", content=big).json()["body_len"] == len(big)

    def chunks() -> Iterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * 10_000

    r = client.post("/big", content=chunks())  # no Content-Length: chunked transfer encoding
    assert r.json()["body_len"] == 500_000
    assert r.json()["body_head"] == "A" * 16


@pytest.mark.parametrize(
    ("kind", "content_type", "body"),
    [
        ("str", "text/plain; charset=utf-8", "héllo".encode()),
        ("bytes", "text/plain; charset=utf-8", b"\x00raw"),
        ("none", "text/plain; charset=utf-8", b""),
        ("dict", "application/json", b'{"a":1}'),
        ("list", "application/json", b'[1,"two"]'),
        ("dataclass", "application/json", b'{"x":1,"y":2}'),
        ("pydantic", "application/json", b'{"name":"x","price":1.5}'),
    ],
)
def test_return_values_become_responses(
    serve_instance: Any, client: httpx.Client, kind: str, content_type: str, body: bytes
) -> None:
    serve.run(Returns.bind(), name="returns", route_prefix="/returns")
    r = client.get("/returns", params={"kind": kind})
    assert r.status_code == 200
    assert r.headers["content-type"] == content_type
    assert r.content == body


def test_starlette_response_is_sent_as_is(mounted: Any, client: httpx.Client) -> None:
    mounted(Returns.bind(), "returns_resp", "/resp")
    r = client.get("/resp", params={"kind": "response"})
    assert (r.status_code, r.text, r.headers["x-made"]) == (201, "custom", "yes")


def test_function_without_arguments(mounted: Any, client: httpx.Client) -> None:
    mounted(no_arg.bind(), "no_arg", "/noarg")
    assert client.get("/noarg").text == "no argument"


def test_user_exception_is_a_500_without_the_traceback(mounted: Any, client: httpx.Client) -> None:
    mounted(Raises.bind(), "raises", "/raises")
    r = client.get("/raises")
    assert r.status_code == 500
    assert r.text == "Internal Server Error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert client.get("/raises").status_code == 500  # the replica keeps serving


def test_nothing_from_the_client_is_unpickled(mounted: Any, client: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    mounted(Echo.bind(), "echo_pickle", "/pickle")
    payload = pickle.dumps(Exploit())
    r = client.post("/pickle", content=payload, headers={"content-type": "application/python-pickle"})
    assert r.json()["body_len"] == len(payload)
    assert not marker.exists()


# -- routing and system endpoints ----------------------------------------------------------------


def test_longest_prefix_routing_and_404(mounted: Any, client: httpx.Client) -> None:
    mounted(Echo.bind(), "route_a", "/a")
    mounted(Echo.bind(), "route_ab", "/a/b")
    assert client.get("/a").json()["root_path"] == "/a"
    assert client.get("/a/x").json()["root_path"] == "/a"
    assert client.get("/a/b/c").json()["root_path"] == "/a/b"
    r = client.get("/ab")
    assert r.status_code == 404
    assert "/-/routes" in r.text and r.headers["content-type"].startswith("text/plain")
    routes = client.get("/-/routes").json()
    assert routes["/a"] == "route_a" and routes["/a/b"] == "route_ab"
    health = client.get("/-/healthz")
    assert (health.status_code, health.text) == (200, "success")


def test_two_apps_with_one_prefix_are_refused(mounted: Any) -> None:
    mounted(Echo.bind(), "first_owner", "/owned")
    with pytest.raises(Exception, match="Prefix /owned is being used by application"):
        serve.run(Echo.bind(), name="second_owner", route_prefix="/owned")


def test_deleted_app_route_is_gone(serve_instance: Any, client: httpx.Client) -> None:
    serve.run(Echo.bind(), name="to_delete", route_prefix="/gone")
    assert client.get("/gone").status_code == 200
    serve.delete("to_delete")
    assert client.get("/gone").status_code == 404


# -- FastAPI ingress -----------------------------------------------------------------------------

api = FastAPI()


def token(x_token: str = Header("")) -> str:
    return x_token


@api.middleware("http")
async def add_header(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers["x-middleware"] = "ran"
    return response


class Teapot(Exception):
    pass


@api.exception_handler(Teapot)
async def teapot_handler(request: Request, exc: Teapot) -> JSONResponse:
    return JSONResponse({"detail": "short and stout"}, status_code=418)


@serve.deployment
@serve.ingress(api)
class FastAPIApp:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @api.get("/hello/{name}")
    async def hello(self, name: str, tok: str = Depends(token)) -> dict[str, str]:
        return {"message": f"{self.greeting} {name}", "token": tok}

    @api.post("/items", status_code=201)
    def create(self, item: Item) -> Item:
        return item

    @api.get("/teapot")
    def teapot(self) -> None:
        raise Teapot()

    @api.get("/missing")
    def missing(self) -> None:
        raise HTTPException(status_code=404, detail="no such thing")

    @api.get("/state")
    def state(self, request: Request) -> dict[str, Any]:
        return {"started": request.state.started}

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive()
                if message.get("text") == "close-me":
                    await websocket.close(code=4001, reason="asked")
                    return
                if message.get("text") is not None:
                    await websocket.send_text(f"{self.greeting}:{message['text']}")
                elif message.get("bytes") is not None:
                    await websocket.send_bytes(message["bytes"][::-1])
                else:
                    return
        except WebSocketDisconnect:
            return


@pytest.fixture(scope="module")
def fastapi_app(serve_instance: Any) -> Iterator[None]:
    serve.run(FastAPIApp.bind("Hi"), name="fastapi", route_prefix="/api")
    yield
    serve.delete("fastapi")


def test_fastapi_routes_get_self_and_dependencies(fastapi_app: None, client: httpx.Client) -> None:
    r = client.get("/api/hello/Ada", headers={"x-token": "t0k"})
    assert r.status_code == 200
    assert r.json() == {"message": "Hi Ada", "token": "t0k"}
    assert r.headers["x-middleware"] == "ran"


def test_fastapi_status_codes_validation_and_handlers(fastapi_app: None, client: httpx.Client) -> None:
    r = client.post("/api/items", json={"name": "x", "price": 2})
    assert (r.status_code, r.json()) == (201, {"name": "x", "price": 2.0})
    bad = client.post("/api/items", json={"name": "x"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "price"]
    assert client.get("/api/teapot").status_code == 418
    assert client.get("/api/missing").json() == {"detail": "no such thing"}


def test_fastapi_lifespan_runs_in_the_replica(serve_instance: Any, client: httpx.Client) -> None:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield {"started": "yes"}

    life = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(life)
    class WithLifespan:
        @life.get("/")
        def root(self, request: Request) -> dict[str, str]:
            return {"started": request.state.started}

    serve.run(WithLifespan.bind(), name="lifespan", route_prefix="/life")
    try:
        assert client.get("/life").json() == {"started": "yes"}
    finally:
        serve.delete("lifespan")


def test_builder_function_ingress(serve_instance: Any, client: httpx.Client) -> None:
    def build() -> FastAPI:
        built = FastAPI()

        @built.get("/")
        def root() -> str:
            return "built in the replica"

        return built

    @serve.deployment
    @serve.ingress(build)
    class Built:
        pass

    serve.run(Built.bind(), name="builder", route_prefix="/built")
    try:
        assert client.get("/built").json() == "built in the replica"
    finally:
        serve.delete("builder")


def test_ingress_rejects_call_and_non_classes() -> None:
    with pytest.raises(ValueError, match="may not have __call__"):

        @serve.ingress(FastAPI())
        class WithCall:
            def __call__(self) -> None: ...

    with pytest.raises(ValueError, match="must be used with a class"):
        serve.ingress(FastAPI())(lambda: None)  # type: ignore[arg-type]


def test_websocket_text_binary_and_close_codes(fastapi_app: None, url: str) -> None:
    async def talk() -> tuple[str, bytes, int | None]:
        async with websockets.connect(url.replace("http", "ws") + "/api/ws") as ws:
            await ws.send("ping")
            text = await ws.recv()
            await ws.send(b"\x01\x02\x03")
            data = await ws.recv()
            await ws.send("close-me")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return str(text), bytes(data), closed.value.rcvd.code if closed.value.rcvd else None

    text, data, code = asyncio.run(talk())
    assert (text, data, code) == ("Hi:ping", b"\x03\x02\x01", 4001)


def test_websocket_client_close_reaches_the_app(fastapi_app: None, url: str) -> None:
    async def talk() -> str:
        async with websockets.connect(url.replace("http", "ws") + "/api/ws") as ws:
            await ws.send("one")
            reply = await ws.recv()
            await ws.close(code=1000)
            return str(reply)

    assert asyncio.run(talk()) == "Hi:one"
    # The app saw the disconnect and returned: the replica still serves new connections.
    assert asyncio.run(talk()) == "Hi:one"


# -- streaming -----------------------------------------------------------------------------------


@serve.deployment
class Streamer:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, request: Request) -> StreamingResponse:
        if request.query_params.get("release"):
            self.release.set()
            return StreamingResponse(iter([b"released"]))

        async def events() -> Any:
            yield "data: first\n\n"
            await self.release.wait()  # the test releases this after it saw the first event
            self.release.clear()
            yield "data: second\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def test_streaming_chunks_arrive_as_produced(mounted: Any, url: str) -> None:
    mounted(Streamer.bind(), "stream", "/stream")
    with httpx.Client(base_url=url, timeout=30) as streaming, httpx.Client(base_url=url, timeout=30) as other:
        with streaming.stream("GET", "/stream") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            chunks = r.iter_text()
            first = next(chunks)
            assert first == "data: first\n\n"  # arrived while the generator is still waiting
            assert other.get("/stream", params={"release": "1"}).text == "released"
            rest = "".join(chunks)
    assert rest == "data: second\n\n"


# -- request ids, timeouts, cancellation, backpressure, limits -----------------------------------


def test_request_id_is_echoed_or_generated(mounted: Any, client: httpx.Client) -> None:
    mounted(Echo.bind(), "echo_id", "/rid")
    r = client.get("/rid", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["request_id"] == "abc-123"
    generated = client.get("/rid")
    assert generated.headers["x-request-id"]
    assert generated.json()["request_id"] == generated.headers["x-request-id"]


@serve.deployment(max_ongoing_requests=100)
class Tracker:
    """Counts and gates for ``Slow``, in a replica of its own so that the test can reach it
    while ``Slow``'s only slot is taken."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.running = asyncio.Event()
        self.release = asyncio.Event()

    def start(self) -> None:
        self.started += 1
        self.running.set()

    async def wait_release(self) -> None:
        await self.release.wait()
        self.release.clear()

    def cancel(self) -> None:
        self.cancelled += 1

    async def wait_running(self) -> None:
        await self.running.wait()
        self.running.clear()

    def open(self) -> None:
        self.release.set()

    def stats(self) -> dict[str, int]:
        return {"started": self.started, "cancelled": self.cancelled}


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Slow:
    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    async def __call__(self, request: Request) -> str:
        try:
            # The test sees the request running once start() ran on the tracker, which may be
            # before its reply reaches us: a cancellation can land in either await.
            await self.tracker.start.remote()
            await self.tracker.wait_release.remote()
        except asyncio.CancelledError:
            self.tracker.cancel.remote()
            raise
        return "done"


def _slow_app(**options: Any) -> Any:
    return Slow.options(**options).bind(Tracker.bind())


@pytest.fixture
def tracker(serve_instance: Any) -> Iterator[Any]:
    serve.run(_slow_app(), name="slow", route_prefix="/slow")
    yield serve.get_deployment_handle("Tracker", "slow")
    serve.delete("slow")


def test_request_timeout_header_gives_408_and_cancels(tracker: Any, client: httpx.Client) -> None:
    r = client.get("/slow", headers={"x-request-timeout-seconds": "0.3"})
    assert r.status_code == 408
    assert "timed out after 0.3s" in r.text
    wait_until(lambda: tracker.stats.remote().result()["cancelled"] == 1, 10, "replica saw CancelledError")


def test_client_disconnect_cancels_the_replica(tracker: Any, url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        tracker.wait_running.remote().result(timeout_s=10)  # the request runs on the replica
    wait_until(lambda: tracker.stats.remote().result()["cancelled"] == 1, 10, "replica saw CancelledError")


async def _fill_then_overflow(url: str, path: str, tracker: Any) -> tuple[list[httpx.Response], list[int]]:
    """One request running; then five more at once: one fits the queue (max_queued_requests=1),
    four are dropped. Returns the dropped responses, and the statuses of the running and the
    queued request after the gate opens for each."""
    loop = asyncio.get_running_loop()

    def sync(fn: Any) -> Any:
        return loop.run_in_executor(None, fn)

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        running = asyncio.create_task(c.get(path))
        await sync(lambda: tracker.wait_running.remote().result(timeout_s=10))
        extra = [asyncio.create_task(c.get(path)) for _ in range(5)]
        dropped: list[httpx.Response] = []
        pending = set(extra)
        while len(dropped) < 4:
            done, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert done, "the requests over the queue limit were not dropped at once"
            dropped.extend(t.result() for t in done)
        await sync(lambda: tracker.open.remote().result())
        first = await running
        await sync(lambda: tracker.wait_running.remote().result(timeout_s=10))
        await sync(lambda: tracker.open.remote().result())
        (queued,) = pending
        second = await queued
        return dropped, [first.status_code, second.status_code]


def test_backpressure_gives_503_at_once(tracker: Any, url: str) -> None:
    dropped, others = asyncio.run(_fill_then_overflow(url, "/slow", tracker))
    assert [r.status_code for r in dropped] == [503] * 4
    assert all(r.text.startswith("Request dropped due to backpressure") for r in dropped)
    assert others == [200, 200]


def test_backpressure_config_gives_429_with_retry_after(serve_instance: Any, url: str) -> None:
    app = _slow_app(backpressure_config={"status_code": 429, "retry_after_s": 1.2})
    serve.run(app, name="slow429", route_prefix="/slow429")
    try:
        tracker = serve.get_deployment_handle("Tracker", "slow429")
        dropped, others = asyncio.run(_fill_then_overflow(url, "/slow429", tracker))
        assert [r.status_code for r in dropped] == [429] * 4
        assert all(r.headers["retry-after"] == "2" for r in dropped)
        assert others == [200, 200]
    finally:
        serve.delete("slow429")


def test_body_over_the_cap_gets_413_before_it_is_read(mounted: Any, url: str) -> None:
    mounted(Echo.bind(), "echo_cap", "/cap")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /cap HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")


@serve.deployment
class Mortal:
    async def __call__(self, request: Request) -> str:
        if request.query_params.get("die"):
            os._exit(1)
        return str(os.getpid())


def test_replica_dying_mid_request_gives_a_500_that_says_so(mounted: Any, client: httpx.Client) -> None:
    mounted(Mortal.bind(), "mortal", "/mortal")
    pid = client.get("/mortal").text
    r = client.get("/mortal", params={"die": "1"})
    assert r.status_code == 500
    assert "replica handling this request died" in r.text, r.text
    assert "Traceback" not in r.text and "/" not in r.text.split(":", 1)[1], r.text
    # Replaced: a new replica (new pid) answers.
    assert wait_until(lambda: (resp := client.get("/mortal")).status_code == 200 and resp.text != pid, 20)


def test_health_and_routes_do_not_touch_replicas(tracker: Any, url: str) -> None:
    """With the only replica busy and its queue full, the system endpoints still answer."""

    async def scenario() -> tuple[str, dict[str, str]]:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            running = asyncio.create_task(c.get("/slow"))
            await loop.run_in_executor(None, lambda: tracker.wait_running.remote().result(timeout_s=10))
            health = (await c.get("/-/healthz")).text
            routes = (await c.get("/-/routes")).json()
            await loop.run_in_executor(None, lambda: tracker.open.remote().result())
            await running
            return health, routes

    health, routes = asyncio.run(scenario())
    assert health == "success"
    assert routes["/slow"] == "slow"


# -- clients that leave, bad headers, streamed bodies --------------------------------------------


@serve.deployment(max_ongoing_requests=1)
class Quick:
    async def __call__(self, request: Request) -> str:
        return "quick"


def _connect_send_close(port: int, path: str, clients: int) -> None:
    """``clients`` connections one after another, each sending a whole GET and closing at once."""
    for _ in range(clients):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.mark.parametrize(("replicas", "limit"), [(1, 1), (2, 2)])
def test_clients_that_close_at_once_never_wedge_a_deployment(
    mounted: Any, url: str, replicas: int, limit: int
) -> None:
    """A request cancelled before its task first ran on the replica must still be answered, or
    the caller counts its slot as taken for ever."""
    prefix = f"/quick{replicas}"
    mounted(Quick.options(num_replicas=replicas, max_ongoing_requests=limit).bind(), f"quick{replicas}", prefix)
    port = int(url.rsplit(":", 1)[1])
    with httpx.Client(base_url=url, timeout=10) as fresh:  # a hang shows as ReadTimeout
        for _ in range(3):
            _connect_send_close(port, prefix, 300)
            statuses = [fresh.get(prefix).status_code for _ in range(2 * replicas * limit + 1)]
            assert statuses == [200] * len(statuses)


def test_an_invalid_request_timeout_header_gets_400_naming_it(mounted: Any, client: httpx.Client) -> None:
    mounted(Echo.bind(), "echo_timeout", "/tmo")
    for value in ["0", "-1", "nan", "inf", "soon", ""]:
        r = client.get("/tmo", headers={"x-request-timeout-seconds": value})
        assert (r.status_code, "x-request-timeout-seconds" in r.text) == (400, True), (value, r.text)
    assert client.get("/tmo", headers={"x-request-timeout-seconds": "5"}).status_code == 200


@serve.deployment
class Counter:
    async def __call__(self, request: Request) -> dict[str, int]:
        size = chunks = 0
        async for chunk in request.stream():
            size += len(chunk)
            chunks += 1
        return {"size": size, "chunks": chunks}


def test_a_large_body_streams_to_the_replica_in_chunks(mounted: Any, client: httpx.Client) -> None:
    mounted(Counter.bind(), "counter", "/count")
    size = 8 * 1024 * 1024

    def chunked() -> Iterator[bytes]:
        for _ in range(size // 65536):
            yield b"x" * 65536

    r = client.post("/count", content=chunked())
    assert r.status_code == 200 and r.json()["size"] == size
    assert r.json()["chunks"] > 8  # not read whole by the proxy first
    r = client.post("/count", content=b"y" * size)
    assert r.status_code == 200 and r.json()["size"] == size


def test_a_chunked_body_over_the_cap_gets_413_once_it_passes_it(serve_instance: Any, url: str) -> None:
    serve.run(Counter.bind(), name="counter_cap", route_prefix="/countcap")
    try:
        def chunked() -> Iterator[bytes]:  # 160 MiB without a Content-Length; the cap is 100 MiB
            for _ in range(160):
                yield b"z" * (1024 * 1024)

        with httpx.Client(base_url=url, timeout=30) as c:
            try:
                r = c.post("/countcap", content=chunked())
            except httpx.TransportError:
                pass  # the proxy answered and closed while the client was still sending
            else:
                assert r.status_code == 413
            assert c.post("/countcap", content=b"ok").json()["size"] == 2
    finally:
        serve.delete("counter_cap")

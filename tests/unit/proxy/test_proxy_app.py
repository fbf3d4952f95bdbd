"""ProxyApp: ASGI calls driven directly, routed over real ``inproc://`` sockets to a replica
running in this process (``ReplicaWorker``) or to a raw fake one that answers what it is told."""

from __future__ import annotations

import asyncio
import itertools
from http import HTTPStatus
from typing import Any

import pytest
import zmq
from inproc import run
from starlette.requests import Request
from starlette.responses import Response

from shoal.proxy.app import ProxyApp, ProxyOptions
from shoal.proxy.exchange import clamp_timeout
from shoal.runtime import transport, wire
from shoal.runtime.inbox import LoopInbox
from shoal.runtime.replica import ReplicaWorker
from shoal.runtime.router import Router
from shoal.runtime.user_code import UserCallable

pytestmark = pytest.mark.timeout(60)

_names = itertools.count(1)


class FakeRuntime:
    """The part of ``client.Runtime`` the proxy uses (``api.RoutingRuntime``), with a fixed snapshot."""

    def __init__(self, snapshot: wire.Snapshot) -> None:
        self.loop = asyncio.get_running_loop()
        self.inbox = LoopInbox(self.loop)
        self.snapshot = snapshot
        self.routers: dict[tuple[str, str], Router] = {}

    def in_loop_thread(self) -> bool:
        return True

    def router(self, app_name: str, deployment_name: str) -> Router:
        key = (app_name, deployment_name)
        if key not in self.routers:
            self.routers[key] = Router(app_name, deployment_name, self.loop)
            self.routers[key].update(self.snapshot.deployment(app_name, deployment_name))
        return self.routers[key]

    def close(self) -> None:
        for router in self.routers.values():
            router.close()


def greet(request: Request) -> str:
    return f"hello from {request.url.path}"


def _snapshot(endpoint: str, limit: int = 5, max_queued: int = -1) -> wire.Snapshot:
    entry = wire.DeploymentEntry(
        replicas=(wire.ReplicaAddress("app#Ingress#r1", 1, endpoint),), max_ongoing_requests=limit,
        max_queued_requests=max_queued, backpressure_status_code=429, backpressure_retry_after_s=3.0,
    )
    return wire.Snapshot(1, {wire.deployment_key("app", "Ingress"): entry}, {"/app": wire.RouteEntry("app", "Ingress")})


def created(request: Request) -> Response:
    return Response("made", status_code=HTTPStatus.CREATED)


async def _serve_greet(fn: Any = greet) -> tuple[ReplicaWorker, str]:
    user = UserCallable(deployment_name="Ingress", func_or_class=fn, init_args=(), init_kwargs={},
                        max_ongoing_requests=5)
    await user.construct()
    worker = ReplicaWorker(user=user, incarnation=1, max_ongoing_requests=5, app_name="app")
    endpoint = f"inproc://proxy-replica-{next(_names)}"
    sock = transport.make_socket(zmq.ROUTER)
    sock.bind(endpoint)
    worker.attach(transport.Channel(sock, worker.on_message))
    return worker, endpoint


async def _request(app: ProxyApp, path: str, headers: list[tuple[bytes, bytes]] | None = None,
                   body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP request through ``app``; returns status, headers and body."""
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers or [], "http_version": "1.1", "scheme": "http",
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "asgi": {"version": "3.0"}}
    sent: list[dict[str, Any]] = []
    parts = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await never.wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    body_out = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {bytes(k).lower(): bytes(v) for k, v in start["headers"]}, body_out


def test_a_request_reaches_the_replica_and_the_answer_comes_back_with_the_request_id() -> None:
    async def main() -> None:
        worker, endpoint = await _serve_greet()
        runtime = FakeRuntime(_snapshot(endpoint))
        app = ProxyApp(runtime, ProxyOptions())
        status, headers, body = await _request(app, "/app/x", [(b"x-request-id", b"abc")])
        assert (status, body, headers[b"x-request-id"]) == (200, b"hello from /app/x", b"abc")
        status, headers, _ = await _request(app, "/app")
        assert status == 200 and len(headers[b"x-request-id"]) > 0  # generated
        status, _, body = await _request(app, "/other")
        assert status == 404 and b"not found" in body
        status, _, _ = await _request(app, "/app", [(b"content-length", b"999")], b"x" * 999)
        assert status == 200
        small = ProxyApp(runtime, ProxyOptions(max_request_body_bytes=10))
        status, headers, _ = await _request(small, "/app", [(b"content-length", b"11")], b"x" * 11)
        assert (status, headers[b"connection"]) == (413, b"close")
        runtime.close()
        assert worker.channel is not None
        worker.channel.close()

    run(main)


def test_an_http_status_enum_travels_as_msgpack() -> None:
    async def main() -> None:
        worker, endpoint = await _serve_greet(created)
        runtime = FakeRuntime(_snapshot(endpoint))
        status, _, body = await _request(ProxyApp(runtime, ProxyOptions()), "/app")
        assert (status, body) == (201, b"made")
        runtime.close()
        assert worker.channel is not None
        worker.channel.close()

    run(main)


def test_system_routes_answer_without_a_replica() -> None:
    async def main() -> None:
        runtime = FakeRuntime(wire.Snapshot())
        app = ProxyApp(runtime, ProxyOptions())
        assert (await _request(app, "/-/healthz"))[0] == 503  # no snapshot yet
        runtime.snapshot = _snapshot("inproc://nowhere")
        assert (await _request(app, "/-/healthz"))[2] == b"success"
        assert (await _request(app, "/-/routes"))[2] == b'{"/app": "app"}'

    run(main)


class RawReplica:
    """A ROUTER that hands requests to the test, which answers with raw frames."""

    def __init__(self) -> None:
        self.endpoint = f"inproc://raw-replica-{next(_names)}"
        sock = transport.make_socket(zmq.ROUTER)
        sock.bind(self.endpoint)
        self.requests: asyncio.Queue[tuple[bytes, wire.Message]] = asyncio.Queue()
        self.channel = transport.Channel(sock, lambda f: self.requests.put_nowait((f[0], wire.decode(f[1:]))))


def test_a_pickled_reply_to_an_http_call_is_refused_not_unpickled() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint))
        app = ProxyApp(runtime, ProxyOptions())
        answer = asyncio.get_running_loop().create_task(_request(app, "/app"))
        identity, msg = await replica.requests.get()
        assert wire.RequestHeader.from_meta(msg.meta).http
        batch = ({"type": "http.response.start", "status": 200, "headers": []},)  # a tuple: pickle
        replica.channel.send_message(wire.reply(wire.Kind.STREAM_END, 1, msg.call_id, *wire.dumps(batch)), identity)
        assert (await answer)[0] == 500
        runtime.close()
        replica.channel.close()

    run(main)


def test_a_full_queue_answers_with_the_backpressure_status() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint, limit=1, max_queued=0))
        app = ProxyApp(runtime, ProxyOptions())
        held = asyncio.get_running_loop().create_task(_request(app, "/app"))
        identity, msg = await replica.requests.get()
        status, headers, _ = await _request(app, "/app")
        assert (status, headers[b"retry-after"]) == (429, b"3")
        ok = [{"type": "http.response.start", "status": 201, "headers": []},
              {"type": "http.response.body", "body": b"done"}]
        replica.channel.send_message(wire.reply(wire.Kind.STREAM_END, 1, msg.call_id, *wire.dumps_plain(ok)), identity)
        assert (await held)[0::2] == (201, b"done")
        runtime.close()
        replica.channel.close()

    run(main)


# -- streamed bodies, answers at shutdown, the timeout header --------------------------------------


async def _request_chunks(app: ProxyApp, chunks: list[bytes], read: list[int]) -> tuple[int, bytes]:
    """A POST whose body comes in ``chunks``; ``read`` counts the chunks the proxy took."""
    scope = {"type": "http", "method": "POST", "path": "/app", "raw_path": b"/app", "query_string": b"",
             "headers": [], "http_version": "1.1", "scheme": "http", "client": None, "server": None}
    sent: list[dict[str, Any]] = []
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        await never.wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_body_streams_chunk_by_chunk_as_the_app_reads_it() -> None:
    async def main() -> None:
        read = [0]
        seen: list[int] = []

        async def count(request: Request) -> str:
            size = 0
            async for chunk in request.stream():
                seen.append(read[0])  # chunks the proxy had taken when this one reached the app
                size += len(chunk)
            return str(size)

        worker, endpoint = await _serve_greet(count)
        runtime = FakeRuntime(_snapshot(endpoint))
        app = ProxyApp(runtime, ProxyOptions())
        status, body = await _request_chunks(app, [b"x" * 1000] * 10, read)
        assert (status, body) == (200, b"10000")
        # The proxy reads at most two chunks ahead of the app (one in flight, one held).
        assert all(taken - index <= 3 for index, taken in enumerate(seen, start=1)), seen
        small = ProxyApp(runtime, ProxyOptions(max_request_body_bytes=2500))
        read[0] = 0
        assert (await _request_chunks(small, [b"x" * 1000] * 10, read))[0] == 413
        assert read[0] <= 4  # refused once the body passed the cap, not read to its end
        runtime.close()
        assert worker.channel is not None
        worker.channel.close()

    run(main)


def test_requests_given_up_at_shutdown_get_503_from_the_replica_and_from_the_drain() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def forever(request: Request) -> str:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        worker, endpoint = await _serve_greet(forever)
        runtime = FakeRuntime(_snapshot(endpoint))
        app = ProxyApp(runtime, ProxyOptions())
        held = asyncio.get_running_loop().create_task(_request(app, "/app"))
        await started.wait()
        await worker.cancel_all()  # the replica's shutdown deadline
        status, _, body = await held
        assert status == 503 and b"shut down before request" in body, body

        started.clear()
        held = asyncio.get_running_loop().create_task(_request(app, "/app"))
        await started.wait()
        await app.drain(min_s=0.0, timeout_s=0.0)  # the proxy's drain deadline
        status, _, body = await held
        assert status == 503 and b"proxy shut down" in body, body
        assert not app.exchanges
        runtime.close()
        await worker.cancel_all()
        assert worker.channel is not None
        worker.channel.close()

    run(main)


@pytest.mark.parametrize(
    ("value", "server_s", "expected"),
    [(b"0.5", None, 0.5), (b"0.5", 2.0, 0.5), (b"3600", 1.0, 1.0), (b"1e3", None, 1000.0)],
)
def test_the_timeout_header_only_shortens(value: bytes, server_s: float | None, expected: float) -> None:
    assert clamp_timeout(value, server_s) == expected


@pytest.mark.parametrize("value", [b"0", b"-1", b"nan", b"inf", b"-inf", b"soon", b""])
def test_an_invalid_timeout_header_is_refused_naming_it(value: bytes) -> None:
    with pytest.raises(ValueError, match="x-request-timeout-seconds"):
        clamp_timeout(value, 1.0)


def test_an_unavailable_deployment_gets_503_in_rays_words_without_details() -> None:
    async def main() -> None:
        entry = wire.DeploymentEntry(failed_reason="Traceback (most recent call last):\n  File \"/secret/app.py\"")
        snapshot = wire.Snapshot(1, {wire.deployment_key("app", "Ingress"): entry}, {"/app": wire.RouteEntry("app", "Ingress")})
        runtime = FakeRuntime(snapshot)
        status, _, body = await _request(ProxyApp(runtime, ProxyOptions()), "/app")
        assert (status, body) == (503, b"Deployment(name='Ingress', app='app') is unavailable because it failed to deploy.")
        runtime.close()

    run(main)

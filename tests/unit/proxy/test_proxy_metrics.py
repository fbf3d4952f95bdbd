"""The proxy's ingress metrics: the status each outcome is counted with (Ray's), and the labels.

``ProxyApp`` is driven with ASGI calls and routes over real ``inproc://`` sockets to a raw fake
replica that answers what the test tells it; the metrics are read in memory, as what a test
added to them (a process may share one series between all metric objects of a name).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import zmq
from inproc import run
from test_proxy_app import FakeRuntime  # the proxy's view of the runtime, with a fixed snapshot

from shoal.proxy.app import ProxyApp, ProxyOptions
from shoal.proxy.metrics import IngressMetrics, is_http_error, is_websocket_error
from shoal.runtime import transport, wire
from shoal.runtime.metrics import Metric

pytestmark = pytest.mark.timeout(60)

_names = itertools.count(1)


class RawReplica:
    """A ROUTER that hands requests to the test, which answers with raw frames."""

    def __init__(self) -> None:
        self.endpoint = f"inproc://metrics-replica-{next(_names)}"
        sock = transport.make_socket(zmq.ROUTER)
        sock.bind(self.endpoint)
        self.requests: asyncio.Queue[tuple[bytes, wire.Message]] = asyncio.Queue()
        self.channel = transport.Channel(sock, lambda f: self.requests.put_nowait((f[0], wire.decode(f[1:]))))

    async def next_request(self) -> tuple[bytes, wire.Message]:
        while True:
            identity, msg = await self.requests.get()
            if msg.kind is wire.Kind.REQUEST:
                return identity, msg

    def reply(self, identity: bytes, msg: wire.Message, kind: wire.Kind, messages: list[dict[str, Any]]) -> None:
        self.channel.send_message(wire.reply(kind, 1, msg.call_id, *wire.dumps_plain(messages)), identity)


def _snapshot(endpoint: str, limit: int = 5, max_queued: int = -1) -> wire.Snapshot:
    entry = wire.DeploymentEntry(
        replicas=(wire.ReplicaAddress("app#Ingress#r1", 1, endpoint),), max_ongoing_requests=limit,
        max_queued_requests=max_queued,
    )
    return wire.Snapshot(1, {wire.deployment_key("app", "Ingress"): entry}, {"/app": wire.RouteEntry("app", "Ingress")})


def values(metric: Metric, suffix: str = "_total") -> dict[tuple[tuple[str, str], ...], float]:
    """``metric``'s samples named with ``suffix``, keyed by their sorted labels."""
    if metric._prom is None and hasattr(metric, "_shared_prom"):
        metric._shared_prom()  # the process's series of this name, which may have samples already
    prom: Any = metric._prom
    if prom is None:
        return {}
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in prom.collect() for s in family.samples if s.name.endswith(suffix)
    }


class Recorded:
    """What ``metrics`` records from now on (flushed when read)."""

    def __init__(self, metrics: IngressMetrics) -> None:
        self.metrics = metrics
        self._before = self._now()

    def _now(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        m = self.metrics
        m.flush()
        return {"requests": values(m.requests), "errors": values(m.error_requests),
                "deployment_errors": values(m.deployment_error_requests), "latency": values(m.latency_ms, "_count")}

    def since(self, which: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of ``which`` (requests, errors, deployment_errors, latency) that grew, by how much."""
        before = self._before[which]
        now = self._now()[which]
        return {key: value - before.get(key, 0) for key, value in now.items() if value != before.get(key, 0)}

    def by_status(self) -> dict[tuple[str, str, str, str], float]:
        """Requests added: (route, method, application, status_code) -> count."""
        return {
            (labels["route"], labels["method"], labels["application"], labels["status_code"]): count
            for key, count in self.since("requests").items()
            for labels in [dict(key)]
        }


OK = [{"type": "http.response.start", "status": 200, "headers": []}, {"type": "http.response.body", "body": b"ok"}]


class Client:
    """One HTTP request through the app; ``disconnect`` makes the client leave after its body."""

    def __init__(self, app: ProxyApp, path: str = "/app/x", method: str = "GET",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                      "headers": headers or [], "http_version": "1.1", "scheme": "http", "client": None,
                      "server": None, "asgi": {"version": "3.0"}}
        self.app = app
        self.sent: list[dict[str, Any]] = []
        self.disconnect = asyncio.Event()
        self.answered = asyncio.Event()  # a response message came
        self._body_sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.answered.set()

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)


def test_answered_unrouted_and_system_requests_are_counted_with_rays_labels() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint))
        metrics = IngressMetrics("node", "127.0.0.1")
        app = ProxyApp(runtime, ProxyOptions(), metrics)
        recorded = Recorded(metrics)
        answered = asyncio.get_running_loop().create_task(Client(app, "/app/x").run())
        identity, msg = await replica.next_request()
        assert metrics.ongoing == 1  # in flight
        replica.reply(identity, msg, wire.Kind.STREAM_END, OK)
        await answered
        await Client(app, "/nowhere/at/all", method="POST").run()
        await Client(app, "/-/healthz").run()
        assert recorded.by_status() == {
            ("/app", "GET", "app", "200"): 1, ("", "POST", "", "404"): 1, ("/-/healthz", "GET", "", "200"): 1,
        }
        assert metrics.ongoing == 0
        assert values(metrics.ongoing_requests, "")[(("node_id", "node"), ("node_ip_address", "127.0.0.1"))] == 0
        latency = recorded.since("latency")
        assert latency[(("application", "app"), ("method", "GET"), ("route", "/app"), ("status_code", "200"))] == 1
        assert recorded.since("errors") == {
            (("application", ""), ("error_code", "404"), ("method", "POST"), ("route", "")): 1,
        }
        assert recorded.since("deployment_errors") == {
            (("application", ""), ("deployment", ""), ("error_code", "404"), ("method", "POST"), ("route", "")): 1,
        }
        runtime.close()
        replica.channel.close()

    run(main)


def test_each_failure_before_the_response_counts_with_its_status() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint, limit=1, max_queued=0))
        metrics = IngressMetrics("node", "127.0.0.1")
        app = ProxyApp(runtime, ProxyOptions(max_request_body_bytes=10), metrics)
        recorded = Recorded(metrics)
        # 499: the client leaves while its request runs (the replica is told to cancel it).
        leaving = Client(app)
        task = asyncio.get_running_loop().create_task(leaving.run())
        await replica.next_request()  # it runs there, holding the one slot
        # 503: the one replica slot is taken and nothing may queue (backpressure).
        await Client(app).run()
        leaving.disconnect.set()
        await task
        assert leaving.sent == []  # nothing is answered to a client that left
        # 413: a body over the cap, refused from its Content-Length.
        await Client(app, headers=[(b"content-length", b"11")]).run()
        # 400: a bad timeout header.
        await Client(app, headers=[(b"x-request-timeout-seconds", b"never")]).run()
        assert recorded.by_status() == {
            ("/app", "GET", "app", "499"): 1, ("/app", "GET", "app", "503"): 1, ("/app", "GET", "app", "413"): 1,
            ("/app", "GET", "app", "400"): 1,
        }
        errors = {dict(k)["error_code"]: v for k, v in recorded.since("deployment_errors").items()}
        assert errors == {"499": 1, "503": 1, "413": 1, "400": 1}
        assert all(dict(k)["deployment"] == "Ingress" for k in recorded.since("deployment_errors"))
        runtime.close()
        replica.channel.close()

    run(main)


def test_a_timeout_counts_408_and_a_started_response_keeps_its_status() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint))
        metrics = IngressMetrics("node", "127.0.0.1")
        recorded = Recorded(metrics)
        slow = Client(ProxyApp(runtime, ProxyOptions(request_timeout_s=0.05), metrics))
        await slow.run()  # the replica never answers
        assert slow.sent[0]["status"] == 408
        await replica.next_request()  # the one that timed out
        # The response starts, then its client leaves: counted with the status it started with (Ray's).
        leaving = Client(ProxyApp(runtime, ProxyOptions(), metrics))
        task = asyncio.get_running_loop().create_task(leaving.run())
        identity, msg = await replica.next_request()
        replica.reply(identity, msg, wire.Kind.STREAM_ITEM, [OK[0]])
        await leaving.answered.wait()
        leaving.disconnect.set()
        await task
        assert recorded.by_status() == {("/app", "GET", "app", "408"): 1, ("/app", "GET", "app", "200"): 1}
        runtime.close()
        replica.channel.close()

    run(main)


def test_a_protocol_refusal_is_counted_without_route_or_latency() -> None:
    metrics = IngressMetrics("node", "127.0.0.1")
    recorded = Recorded(metrics)
    metrics.refused(431, "")
    metrics.refused(431, "GET")
    assert recorded.by_status() == {("", "", "", "431"): 1, ("", "GET", "", "431"): 1}
    assert not [k for k in values(metrics.latency_ms, "_count") if dict(k)["status_code"] == "431"]


def test_error_rules_are_rays() -> None:
    assert [is_http_error(s) for s in (200, 307, 404, 499, 503)] == [False, False, True, True, True]
    assert [is_websocket_error(c) for c in (1000, 1001, 1011, 4001)] == [False, False, True, True]


def test_a_route_served_by_another_app_gets_new_series() -> None:
    metrics = IngressMetrics("node", "127.0.0.1")
    first = metrics.for_route("/a", "one", "Ingress")
    assert metrics.for_route("/a", "one", "Ingress") is first
    second = metrics.for_route("/a", "two", "Ingress")
    assert second is not first and second.application == "two"


class WebSocketClient:
    """A WebSocket through the app that connects and then waits."""

    def __init__(self, app: ProxyApp, path: str = "/app/ws") -> None:
        self.scope = {"type": "websocket", "path": path, "raw_path": path.encode(), "query_string": b"",
                      "headers": [], "http_version": "1.1", "scheme": "ws", "client": None, "server": None,
                      "asgi": {"version": "3.0"}, "subprotocols": []}
        self.app = app
        self.sent: list[dict[str, Any]] = []
        self._connected = False
        self._never = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        await self._never.wait()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)


def test_websockets_refused_or_unrouted_count_with_rays_statuses() -> None:
    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint, limit=1, max_queued=0))
        metrics = IngressMetrics("node", "127.0.0.1")
        app = ProxyApp(runtime, ProxyOptions(), metrics)
        recorded = Recorded(metrics)
        holding = asyncio.get_running_loop().create_task(WebSocketClient(app).run())
        await replica.next_request()  # it holds the one slot
        refused = WebSocketClient(app)
        await refused.run()
        assert refused.sent == [{"type": "websocket.close", "code": 1013}]
        unrouted = WebSocketClient(app, "/elsewhere")
        await unrouted.run()
        assert unrouted.sent == [{"type": "websocket.close", "code": 1008}]
        assert metrics.ongoing == 1
        runtime.close()  # the held one ends as cancelled
        await holding
        assert recorded.by_status() == {("/app", "WS", "app", "503"): 2, ("", "WS", "", "404"): 1}
        replica.channel.close()

    run(main)

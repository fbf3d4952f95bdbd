"""Router and handle metrics: what is counted when, the gauges' samples, the label values.

Real ``inproc://`` sockets and a fake replica; the metrics are read from their in-memory
prometheus-client series (this process does not export). Each test routes to its own deployment
name, so the process-wide series of one test never count another's requests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from inproc import FakeClock, FakeReplica, run

from shoal.runtime import context, router_metrics, wire
from shoal.runtime.context import ReplicaContext, ReplicaID
from shoal.runtime.errors import BackPressureError
from shoal.runtime.metrics import Metric
from shoal.runtime.reply import ReplySink
from shoal.runtime.router import Call, Router
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(60)

_names = itertools.count(1)


def value(metric: Metric, **labels: str) -> float | None:
    """The sum of ``metric``'s samples (``_total`` for counters) whose labels include ``labels``."""
    prom: Any = metric._prom
    if prom is None:
        return None
    found = [
        s.value for family in prom.collect() for s in family.samples
        if not s.name.endswith("_created") and labels.items() <= s.labels.items()
    ]
    return sum(found) if found else None


def _call(route: str) -> tuple[Call, ReplySink]:
    sink = ReplySink()
    header = wire.RequestHeader("__call__", f"req-{next(_names)}", route=route)
    return Call(header, wire.dumps_args((), {})[1], sink), sink


def _router(replica: FakeReplica, deployment: str, *, limit: int = 1, max_queued: int = -1) -> Router:
    router = Router("app", deployment, asyncio.get_running_loop(), clock=FakeClock())
    router.update(wire.DeploymentEntry(
        replicas=(replica.address(f"app#{deployment}#r1"),), max_ongoing_requests=limit,
        max_queued_requests=max_queued,
    ))
    return router


def test_accepted_requests_are_counted_per_route_and_backpressure_is_not() -> None:
    async def main() -> None:
        replica, deployment = FakeReplica(), f"Counted{next(_names)}"
        router = _router(replica, deployment, limit=1, max_queued=1)
        (sent, s1), (queued, _), (refused, s3) = _call("/a"), _call("/a"), _call("/b")
        for call in (sent, queued, refused):
            router.submit(call)
        with pytest.raises(BackPressureError):
            await s3.result()
        tags = {"deployment": deployment, "application": "app", "handle": router.handle_id, "actor_id": "DRIVER"}
        router.metrics.flush()
        assert value(router_metrics.ROUTER_REQUESTS, **tags, route="/a") == 2
        assert value(router_metrics.ROUTER_REQUESTS, **tags, route="/b") is None
        # Sampled gauges: one request at the replica, one waiting here.
        router.metrics.flush()
        assert value(router_metrics.QUEUED_QUERIES, **tags) == 1
        assert value(router_metrics.ONGOING_AT_REPLICAS, **tags) == 1
        identity, msg = await replica.next()
        replica.answer(identity, msg, wire.Kind.RESULT, 1)
        assert await s1.result() == 1
        router.metrics.flush()  # the queued one went out when the slot freed up
        assert (value(router_metrics.QUEUED_QUERIES, **tags), value(router_metrics.ONGOING_AT_REPLICAS, **tags)) == (0, 1)
        router.close()
        assert (value(router_metrics.QUEUED_QUERIES, **tags), value(router_metrics.ONGOING_AT_REPLICAS, **tags)) == (0, 0)
        replica.close()

    run(main)


def test_a_request_to_an_unavailable_deployment_is_counted_as_ray_counts_it() -> None:
    async def main() -> None:
        deployment = f"Gone{next(_names)}"
        router = Router("app", deployment, asyncio.get_running_loop())
        router.update(None)
        call, sink = _call("/x")
        router.submit(call)
        with pytest.raises(Exception, match="does not exist"):
            await sink.result()
        router.metrics.flush()
        assert value(router_metrics.ROUTER_REQUESTS, deployment=deployment, route="/x") == 1
        router.close()

    run(main)


@pytest.fixture
def no_actor_id() -> Iterator[None]:
    saved_id, saved_ctx = router_metrics._actor_id, context._replica_context
    router_metrics._actor_id, context._replica_context = None, None
    yield
    router_metrics._actor_id, context._replica_context = saved_id, saved_ctx


def test_actor_id_is_driver_then_replica_id_unless_set(no_actor_id: None) -> None:
    assert router_metrics.actor_id() == "DRIVER"
    context.set_replica_context(ReplicaContext(ReplicaID("u1", "Dep", "app")))
    assert router_metrics.actor_id() == "app#Dep#u1"
    router_metrics.set_actor_id(router_metrics.PROXY_ACTOR_ID)
    assert router_metrics.actor_id() == "proxy"


def test_handle_tag_is_rays() -> None:
    assert router_metrics.handle_tag("app", "Dep", "abc") == "app#Dep#abc"
    assert router_metrics.handle_tag("", "Dep", "abc") == "Dep#abc"


def test_handle_calls_count_under_the_handles_id_shared_by_its_option_copies() -> None:
    deployment = f"Handled{next(_names)}"
    handle: DeploymentHandle[Any] = DeploymentHandle(deployment, "app")
    copy = handle.options(method_name="other")
    assert copy.handle_id == handle.handle_id
    router_metrics.count_handle_request("app", deployment, handle.handle_id, "/r")
    router_metrics.count_handle_request("app", deployment, copy.handle_id, "/r")
    assert value(router_metrics.HANDLE_REQUESTS, handle=f"app#{deployment}#{handle.handle_id}", deployment=deployment,
                 route="/r", application="app") == 2


def test_handle_calls_on_the_flushing_loops_thread_are_batched_others_counted_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a process that exports metrics, calls made on the thread of the loop that flushes the
    routers' counts add an int until the next flush (run here by hand); calls from another
    thread go to the counter at once."""
    import threading

    from shoal.runtime import metrics, metrics_batch

    monkeypatch.setattr(metrics, "enabled", lambda: True)
    monkeypatch.setattr(router_metrics, "_batch_loop", None)
    monkeypatch.setattr(router_metrics, "_batch_thread", None)
    deployment = f"Batched{next(_names)}"
    labels = {"handle": f"app#{deployment}#h1", "deployment": deployment, "route": "/r", "application": "app"}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        router = Router("app", deployment, loop, clock=FakeClock())
        try:
            metrics_batch.flush_now(loop)  # the first flush names the loop's thread
            for _ in range(3):
                router_metrics.count_handle_request("app", deployment, "h1", "/r")
            assert value(router_metrics.HANDLE_REQUESTS, **labels) == 0
            thread = threading.Thread(target=router_metrics.count_handle_request, args=("app", deployment, "h1", "/r"))
            thread.start()
            thread.join()
            assert value(router_metrics.HANDLE_REQUESTS, **labels) == 1
            metrics_batch.flush_now(loop)
            assert value(router_metrics.HANDLE_REQUESTS, **labels) == 4
            router_metrics.count_handle_request("app", deployment, "h1", "/r")
        finally:
            router.metrics.close()  # flushes what waits
            metrics_batch.unregister(loop, router_metrics.flush_handle_requests)
        assert value(router_metrics.HANDLE_REQUESTS, **labels) == 5

    asyncio.run(main())

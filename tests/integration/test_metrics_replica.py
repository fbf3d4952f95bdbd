"""Replica-side metrics on a real instance's endpoint, under Ray Serve 2.60's names and labels:
per-request counters and latency, ongoing queries, replica starts, batching, multiplexing and
users' own metrics, after real HTTP requests and handle calls.

A replica writes what it counted once per loop iteration, right after its replies, so a test
scrapes until its expectations hold (``settle``); the values expected are exact. Batches wait far
longer than any test (``batch_wait_timeout_s=60``), so each runs because it is full: no timing is
involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from helpers import live_children, sample_value, scrape, shutdown_serve, supervisor_of, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.serve import metrics

pytestmark = pytest.mark.timeout(120)

WAIT_S = 60.0


@pytest.fixture(scope="module")
def instance() -> Iterator[str]:
    """A private instance with its metrics on a free port; yields its HTTP base URL."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "metrics_port": 0})
    supervisor_of(psutil.Process())
    url = serve.get_http_url()
    assert url is not None and serve.get_metrics_url() is not None
    yield url
    shutdown_serve()


def value(name: str, **labels: str) -> float | None:
    return sample_value(scrape(), name, **labels)


def settle(check: Callable[[Any], None], timeout_s: float = 30) -> Any:
    """Scrape until ``check(samples)`` passes and return those samples; after ``timeout_s``,
    ``check``'s last AssertionError."""
    failures: list[AssertionError] = []

    def passes() -> Any:
        samples = scrape()
        try:
            check(samples)
        except AssertionError as exc:
            failures[:] = [exc]
            return None
        return samples

    try:
        return wait_until(passes, timeout_s, "the expected samples")
    except AssertionError:
        raise failures[0] from None


@serve.deployment
class Echo:
    def __call__(self, request: Request) -> str:
        if "fail" in request.query_params:
            raise ValueError("asked to fail")
        return "ok"

    def call(self, x: str) -> str:
        if x == "boom":
            raise KeyError(x)
        return x

    def stream(self, n: int) -> Iterator[int]:
        yield 0
        if n < 0:
            raise RuntimeError("stream failed")
        yield from range(1, n)

    def whoami(self) -> str:
        return serve.get_replica_context().replica_tag


def test_requests_errors_and_latency_by_route_with_the_replica_tags(instance: str) -> None:
    handle = serve.run(Echo.bind(), name="rm_echo", route_prefix="/echo")
    replica = handle.whoami.remote().result(timeout_s=30)
    with httpx.Client(base_url=instance, timeout=30) as client:
        assert [client.get("/echo").status_code for _ in range(3)] == [200] * 3
        assert [client.get("/echo", params={"fail": "1"}).status_code for _ in range(2)] == [500] * 2
    assert handle.call.remote("a").result(timeout_s=30) == "a"
    assert handle.call.remote("b").result(timeout_s=30) == "b"
    with pytest.raises(KeyError):
        handle.call.remote("boom").result(timeout_s=30)
    assert list(handle.options(stream=True).stream.remote(3)) == [0, 1, 2]
    with pytest.raises(RuntimeError):
        list(handle.options(stream=True).stream.remote(-1))

    tags = {"deployment": "Echo", "replica": replica, "application": "rm_echo"}

    def check(samples: Any) -> None:
        def get(name: str, **labels: str) -> float | None:
            return sample_value(samples, name, **tags, **labels)

        requests, errors = "ray_serve_deployment_request_counter_total", "ray_serve_deployment_error_counter_total"
        assert get(requests, route="/echo") == 3
        assert get(errors, route="/echo", exception_type="ValueError") == 2  # answered with a 500
        assert get(requests, route="") == 4  # whoami, two calls, one stream: the driver's handle calls
        assert get(errors, route="", exception_type="KeyError") == 1
        assert get(errors, route="", exception_type="RuntimeError") == 1
        assert get(errors) == 4
        latency = "ray_serve_deployment_processing_latency_ms"
        assert get(f"{latency}_count", route="/echo") == 5
        assert get(f"{latency}_count", route="") == 6
        assert get(f"{latency}_bucket", route="", le="+Inf") == 6
        assert get(f"{latency}_bucket", route="", le="600000.0") == 6  # Ray's buckets
        assert get("ray_serve_replica_processing_queries") == 0
        assert get("ray_serve_deployment_replica_starts_total") == 1
        assert get("ray_serve_replica_utilization_percent") is not None

    settle(check)
    serve.delete("rm_echo")


@serve.deployment(max_ongoing_requests=5)
class Hold:
    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def hold(self) -> None:
        await self.never.wait()


def test_a_cancelled_request_is_an_error_of_type_cancelled_error(instance: str) -> None:
    handle = serve.run(Hold.bind(), name="rm_hold", route_prefix=None)
    held = [handle.hold.remote() for _ in range(2)]
    wait_until(lambda: value("ray_serve_replica_processing_queries", deployment="Hold") == 2, 30, "2 ongoing")
    for response in held:
        response.cancel()

    def check(samples: Any) -> None:
        assert sample_value(samples, "ray_serve_deployment_error_counter_total", deployment="Hold",
                            exception_type="CancelledError") == 2
        assert sample_value(samples, "ray_serve_replica_processing_queries", deployment="Hold") == 0
        assert sample_value(samples, "ray_serve_deployment_request_counter_total", deployment="Hold") == 0

    settle(check)
    serve.delete("rm_hold")


@serve.deployment(max_ongoing_requests=20)
class Batched:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=WAIT_S)
    async def handle_batch(self, items: list[int]) -> list[int]:
        return [item * 2 for item in items]

    async def __call__(self, item: int) -> int:
        return await self.handle_batch(item)


def test_batching_metrics_for_full_batches_and_a_waiting_queue(instance: str) -> None:
    handle = serve.run(Batched.bind(), name="rm_batch", route_prefix=None)
    tags = {"deployment": "Batched", "application": "rm_batch", "function_name": "handle_batch"}
    responses = [handle.remote(i) for i in range(8)]  # two full batches of 4
    assert [r.result(timeout_s=30) for r in responses] == [i * 2 for i in range(8)]
    waiting = [handle.remote(i) for i in range(3)]  # not a full batch: they wait
    wait_until(lambda: value("ray_serve_batch_queue_length", **tags) == 3, 30, "3 callers waiting")

    samples = scrape()  # written as they happened: batching records at once, in the replica's loop

    def get(name: str, **labels: str) -> float | None:
        return sample_value(samples, name, **tags, **labels)

    assert get("ray_serve_batches_processed_total") == 2
    assert get("ray_serve_actual_batch_size_count") == 2
    assert get("ray_serve_actual_batch_size_sum") == 8
    assert get("ray_serve_actual_batch_size_bucket", le="2.0") == 0
    assert get("ray_serve_actual_batch_size_bucket", le="4.0") == 2
    assert get("ray_serve_batch_utilization_percent_bucket", le="99.0") == 0
    assert get("ray_serve_batch_utilization_percent_bucket", le="100.0") == 2
    assert get("ray_serve_batch_utilization_percent_sum") == 200
    assert get("ray_serve_batch_execution_time_ms_count") == 2
    assert get("ray_serve_batch_wait_time_ms_count") == 2
    assert sample_value(samples, "ray_serve_batch_queue_length", **tags, replica=_replica_of(samples, "Batched")) == 3

    waiting.append(handle.remote(3))  # the fourth fills the batch
    assert [r.result(timeout_s=30) for r in waiting] == [0, 2, 4, 6]
    assert value("ray_serve_batches_processed_total", **tags) == 3
    assert value("ray_serve_batch_queue_length", **tags) == 0
    serve.delete("rm_batch")


def _replica_of(samples: Any, deployment: str) -> str:
    """The ``replica`` label of the one replica of ``deployment`` that has started."""
    found = {
        dict(labels)["replica"] for (name, labels), _ in samples.items()
        if name == "ray_serve_deployment_replica_starts_total" and dict(labels).get("deployment") == deployment
    }
    assert len(found) == 1, found
    return found.pop()


@serve.deployment(num_replicas=1)
class Models:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"

    async def __call__(self) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


def test_multiplexing_metrics_as_models_load_and_are_evicted(instance: str) -> None:
    handle = serve.run(Models.bind(), name="rm_models", route_prefix=None)
    for model_id in ["a", "b", "a", "c", "b"]:  # c evicts b (a was used last), b evicts a
        assert handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=30) == f"model-{model_id}"

    samples = scrape()
    tags = {"deployment": "Models", "application": "rm_models"}

    def get(name: str, **labels: str) -> float | None:
        return sample_value(samples, name, **tags, **labels)

    assert get("ray_serve_multiplexed_get_model_requests_counter_total") == 5
    assert get("ray_serve_multiplexed_models_load_counter_total") == 4
    assert get("ray_serve_multiplexed_model_load_latency_ms_count") == 4
    assert get("ray_serve_multiplexed_models_unload_counter_total") == 2
    assert get("ray_serve_multiplexed_model_unload_latency_ms_count") == 2
    assert get("ray_serve_num_multiplexed_models") == 2
    registered = "ray_serve_registered_multiplexed_model_id"
    assert {m: get(registered, model_id=m) for m in "abc"} == {"a": 0, "b": 1, "c": 1}
    serve.delete("rm_models")


@serve.deployment
class WithUserMetrics:
    def __init__(self) -> None:
        self.hits = metrics.Counter("rm_user_hits", description="Hits.", tag_keys=("model", "route"))
        self.hits.set_default_tags({"model": "m1"})
        self.level = metrics.Gauge("rm_user_level", tag_keys=("route",))
        self.sizes = metrics.Histogram("rm_user_sizes", boundaries=[1, 10], tag_keys=("route",))

    def __call__(self, request: Request) -> str:
        size = int(request.query_params["size"])
        self.hits.inc()
        self.level.set(size)
        self.sizes.observe(size)
        return serve.get_replica_context().replica_tag


def test_user_metrics_carry_the_replica_tags_and_the_route(instance: str) -> None:
    serve.run(WithUserMetrics.bind(), name="rm_user", route_prefix="/user")
    with httpx.Client(base_url=instance, timeout=30) as client:
        replicas = {client.get("/user", params={"size": size}).text for size in (5, 50)}
    assert len(replicas) == 1
    samples = scrape()
    tags = {"deployment": "WithUserMetrics", "replica": replicas.pop(), "application": "rm_user", "route": "/user"}
    assert sample_value(samples, "ray_rm_user_hits_total", **tags, model="m1") == 2
    assert sample_value(samples, "ray_rm_user_level", **tags) == 50
    assert sample_value(samples, "ray_rm_user_sizes_bucket", **tags, le="10.0") == 1
    assert sample_value(samples, "ray_rm_user_sizes_count", **tags) == 2
    assert sample_value(samples, "ray_rm_user_sizes_sum", **tags) == 55
    serve.delete("rm_user")

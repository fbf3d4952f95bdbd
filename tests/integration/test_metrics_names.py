"""A real instance exports Ray Serve 2.60's metric names with exactly Ray's label names.

One application exercises what the names measure: HTTP through the proxy (a success and a 500),
handle composition, a ``@serve.batch`` method, a ``@serve.multiplexed`` model (two ids on a replica
that holds one, so one is unloaded), an autoscaling deployment, a user metric; a second one fails
its health check once. Then the instance's endpoint is scraped and compared with the table
extracted from Ray's source (``tests/ray_serve_metrics.py``):

- every name shoal promises (``shoal_metrics_contract.REQUIRED``, issue 9) is exported;
- every exported ``ray_serve_*`` series is one of Ray's, with Ray's label names and no others
  (``le`` on a histogram's buckets aside).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import Samples, live_children, scrape, shutdown_serve, wait_until
from ray_serve_metrics import BY_NAME, RAY_VERSION, family_of
from shoal_metrics_contract import REQUIRED
from starlette.requests import Request

from shoal import serve
from shoal.serve import metrics
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(120)

APP = "names"
ROUTE = "/names"
WAIT_S = 30.0


@serve.deployment(max_ongoing_requests=16)
class Batcher:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def double(self, xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    async def __call__(self, x: int) -> int:
        return await self.double(x)


@serve.deployment
class Models:
    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"

    async def __call__(self) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 5, "look_back_period_s": 1},
)
class Scaled:
    def __call__(self) -> str:
        return "scaled"


@serve.deployment
class Ingress:
    def __init__(self, batcher: DeploymentHandle, models: DeploymentHandle, scaled: DeploymentHandle) -> None:
        self.batcher, self.models, self.scaled = batcher, models, scaled
        self.hits = metrics.Counter("names_hits", description="Requests the ingress saw.", tag_keys=("route",))

    async def __call__(self, request: Request) -> dict[str, Any]:
        self.hits.inc()
        if request.url.path.endswith("/fail"):
            raise RuntimeError("failing on purpose")
        model_id = request.query_params.get("model", "a")
        return {
            "doubled": await self.batcher.remote(int(request.query_params.get("x", "1"))),
            "model": await self.models.options(multiplexed_model_id=model_id).remote(),
            "scaled": await self.scaled.remote(),
        }


@serve.deployment(health_check_period_s=0.2, health_check_timeout_s=2)
class Flaky:
    """Fails its health checks from ``fail_health`` on; its replacement is healthy."""

    def __init__(self) -> None:
        self.failing = False

    def fail_health(self) -> None:
        self.failing = True

    def check_health(self) -> None:
        if self.failing:
            raise RuntimeError("health check failing on demand")


def _present(samples: Samples, name: str) -> bool:
    series = {sample for sample, _ in samples}
    return (name + "_bucket" if BY_NAME[name].kind == "histogram" else name) in series


def _missing(samples: Samples) -> list[str]:
    return [name for name in REQUIRED if not _present(samples, name)]


@pytest.fixture(scope="module")
def samples() -> Iterator[Samples]:
    """The scrape after the apps ran (once every promised name is there, or after ``WAIT_S``)."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "metrics_port": 0})
    try:
        serve.run(Ingress.bind(Batcher.bind(), Models.bind(), Scaled.bind()), name=APP, route_prefix=ROUTE)
        flaky = serve.run(Flaky.bind(), name="flaky", route_prefix=None)
        url = serve.get_http_url()
        with httpx.Client(base_url=f"{url}{ROUTE}", timeout=30) as client:
            for x, model in ((1, "a"), (2, "b"), (3, "a")):
                reply = client.get("/", params={"x": x, "model": model})
                assert reply.status_code == 200, reply.text
                assert reply.json() == {"doubled": 2 * x, "model": f"model-{model}", "scaled": "scaled"}
            assert client.get("/fail").status_code == 500
        flaky.fail_health.remote().result(timeout_s=10)
        last: list[Samples] = [{}]

        def complete() -> bool:
            last[0] = scrape()
            return not _missing(last[0])

        try:
            wait_until(complete, WAIT_S, "every promised name is exported", interval_s=0.5)
        except AssertionError:
            pass  # the tests say what is missing
        yield last[0]
    finally:
        shutdown_serve()


def test_every_promised_name_is_exported(samples: Samples) -> None:
    missing = _missing(samples)
    assert not missing, f"not exported: {missing}"


def _label_mismatches(samples: Samples, names: tuple[str, ...] | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Series of Ray's metrics (of ``names`` if given) whose label names are not Ray's: (have, Ray's)."""
    wrong = {}
    for series, labels in samples:
        metric = family_of(series)
        if metric is None or metric.labels is None or (names is not None and metric.name not in names):
            continue
        have = {key for key, _ in labels} - ({"le"} if series.endswith("_bucket") else set())
        if have != set(metric.labels):
            wrong[series] = (sorted(have), sorted(metric.labels))
    return wrong


def test_promised_names_carry_exactly_rays_labels(samples: Samples) -> None:
    assert any(_present(samples, name) for name in REQUIRED), "nothing to compare: no promised name is exported"
    wrong = _label_mismatches(samples, REQUIRED)
    assert not wrong, f"series with other labels than Ray's (have, Ray's): {wrong}"


def test_no_invented_serve_names(samples: Samples) -> None:
    """Every ``ray_serve_*`` series is one of Ray's, with Ray's label names (promised or not)."""
    invented = sorted({series for series, _ in samples if series.startswith("ray_serve_") and family_of(series) is None})
    assert not invented, f"ray_serve_* names Ray Serve {RAY_VERSION} does not have: {invented}"
    wrong = _label_mismatches(samples)
    assert not wrong, f"series with other labels than Ray's (have, Ray's): {wrong}"


def test_user_metric_carries_the_replicas_tags_and_the_route(samples: Samples) -> None:
    found = [dict(labels) for (series, labels), _ in samples.items() if series == "ray_names_hits_total"]
    assert found, "the user counter is not exported"
    assert {frozenset(labels) for labels in found} == {frozenset({"deployment", "replica", "application", "route"})}
    assert {(labels["application"], labels["deployment"], labels["route"]) for labels in found} == {(APP, "Ingress", ROUTE)}
    assert sum(value for (series, _), value in samples.items() if series == "ray_names_hits_total") == 4

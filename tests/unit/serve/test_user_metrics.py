"""shoal.serve.metrics (Ray's ``ray.serve.metrics``): in a replica, the replica's tags are added
and reserved, and ``route`` comes from the request; outside one, plain metrics."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from shoal.runtime import context
from shoal.runtime.context import ReplicaContext, ReplicaID, RequestContext
from shoal.serve import metrics

_ids = itertools.count()


def unique(prefix: str) -> str:
    return f"user_{prefix}_{next(_ids)}"


def samples(metric: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in metric._prom.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


REPLICA_TAGS = {("deployment", "Model"), ("replica", "abc123"), ("application", "app")}


@pytest.fixture
def in_replica(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(context, "_replica_context", ReplicaContext(ReplicaID("abc123", "Model", "app")))
    yield


@pytest.fixture
def request_to(in_replica: None) -> Iterator[Any]:
    tokens = []

    def enter(route: str) -> None:
        tokens.append(context.set_request(RequestContext(request_id="r", route=route)))

    yield enter
    for token in reversed(tokens):
        context.reset_request(token)


def test_outside_a_replica_they_are_plain_metrics() -> None:
    name = unique("plain")
    counter = metrics.Counter(name, tag_keys=("model",))
    assert counter.info["tag_keys"] == ("model",)
    counter.set_default_tags({"model": "m"})
    counter.inc()
    assert samples(counter) == {(f"ray_{name}_total", frozenset({("model", "m")})): 1}


def test_in_a_replica_every_sample_carries_the_replica_tags(in_replica: None) -> None:
    name = unique("tagged")
    counter = metrics.Counter(name, description="d", tag_keys=("model",))
    assert counter.info["tag_keys"] == ("deployment", "replica", "application", "model")
    assert counter.set_default_tags({"model": "m"}) is counter
    counter.inc()
    counter.inc(3, tags={"model": "n"})
    assert samples(counter) == {
        (f"ray_{name}_total", frozenset(REPLICA_TAGS | {("model", "m")})): 1,
        (f"ray_{name}_total", frozenset(REPLICA_TAGS | {("model", "n")})): 3,
    }
    gauge_name = unique("g")
    gauge = metrics.Gauge(gauge_name)
    gauge.set(7)
    assert samples(gauge) == {(f"ray_{gauge_name}", frozenset(REPLICA_TAGS)): 7}


@pytest.mark.parametrize("reserved", ["deployment", "replica", "application"])
def test_the_replica_tags_are_reserved(in_replica: None, reserved: str) -> None:
    with pytest.raises(ValueError, match=f"'{reserved}' tag is reserved"):
        metrics.Counter(unique("r"), tag_keys=(reserved,))
    counter = metrics.Counter(unique("r"), tag_keys=("model",))
    with pytest.raises(ValueError, match=f"'{reserved}' tag is reserved"):
        counter.set_default_tags({reserved: "x"})


def test_route_comes_from_the_request_unless_a_sample_gives_it(request_to: Any) -> None:
    name = unique("routed")
    hist = metrics.Histogram(name, boundaries=[10], tag_keys=("route",))
    request_to("/api")
    hist.observe(1)
    hist.observe(2, tags={"route": "/other"})
    counts = {labels: v for (n, labels), v in samples(hist).items() if n.endswith("_count")}
    assert counts == {
        frozenset(REPLICA_TAGS | {("route", "/api")}): 1,
        frozenset(REPLICA_TAGS | {("route", "/other")}): 1,
    }


def test_ray_argument_errors_hold_for_user_metrics(in_replica: None) -> None:
    with pytest.raises(TypeError, match="tag_keys should be a tuple type"):
        metrics.Counter(unique("e"), tag_keys=["model"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Empty name"):
        metrics.Gauge("")
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        metrics.Histogram(unique("e"))
    with pytest.raises(ValueError, match="Use positive values"):
        metrics.Histogram(unique("e"), boundaries=[-1])
    counter = metrics.Counter(unique("e"), tag_keys=("model",))
    with pytest.raises(ValueError, match="Missing value for tag key"):
        counter.inc()
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        counter.inc(tags={"model": "m", "other": "x"})
    with pytest.raises(ValueError, match="value must be >0"):
        counter.inc(0, tags={"model": "m"})


def test_a_pickled_user_metric_takes_the_tags_of_the_replica_it_is_unpickled_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Made in the driver (no replica), unpickled in a replica: it gets that replica's tags (not
    a reserved-tag error, as the user's own arguments travel) and keeps the user's defaults."""
    name = unique("pickled")
    counter = metrics.Counter(name, tag_keys=("model",)).set_default_tags({"model": "m"})
    data = cloudpickle.dumps(counter)
    monkeypatch.setattr(context, "_replica_context", ReplicaContext(ReplicaID("abc123", "Model", "app")))
    copy = cloudpickle.loads(data)
    assert type(copy) is metrics.Counter
    assert copy.info["tag_keys"] == ("deployment", "replica", "application", "model")
    copy.inc()
    assert samples(copy) == {(f"ray_{name}_total", frozenset(REPLICA_TAGS | {("model", "m")})): 1}

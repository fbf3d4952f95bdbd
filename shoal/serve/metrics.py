"""User metrics from deployment code, as Ray's ``ray.serve.metrics``.

Inside a replica, every metric gets the tag keys ``deployment``, ``replica`` and ``application``
with this replica's values (they are reserved: passing them is a ValueError), and a metric with a
``route`` tag key takes the current request's route when a sample does not give one. Outside a
replica these are plain metrics. They are exported by the instance's metrics endpoint as Ray
exports them: ``Counter("my_counter")`` is ``ray_my_counter_total``.

    from shoal.serve import metrics

    @serve.deployment
    class Model:
        def __init__(self):
            self.hits = metrics.Counter("model_hits", description="Cache hits.", tag_keys=("model",))
            self.hits.set_default_tags({"model": "resnet"})

        def __call__(self, request):
            self.hits.inc()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.runtime import context
from shoal.runtime import metrics as _metrics

__all__ = ["Counter", "Gauge", "Histogram"]

DEPLOYMENT_TAG = "deployment"
REPLICA_TAG = "replica"
APPLICATION_TAG = "application"
ROUTE_TAG = "route"
_RESERVED = (DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG)


def _serve_tag_keys(tag_keys: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if not context.in_replica() or not isinstance(tag_keys, (tuple, type(None))):
        return tag_keys  # (not a tuple: the base class raises Ray's TypeError)
    for key in tag_keys or ():
        if key in _RESERVED:
            raise ValueError(f"'{key}' tag is reserved for Ray Serve metrics")
    replica = context.get_replica_context()
    serve_keys: tuple[str, ...] = (DEPLOYMENT_TAG, REPLICA_TAG) + ((APPLICATION_TAG,) if replica.app_name else ())
    return serve_keys + tuple(tag_keys or ())


def _serve_default_tags(default_tags: dict[str, str]) -> dict[str, str]:
    if not context.in_replica():
        return default_tags
    for key in default_tags:
        if key in _RESERVED:
            raise ValueError(f"'{key}' tag is reserved for Ray Serve metrics")
    replica = context.get_replica_context()
    tags = {**default_tags, DEPLOYMENT_TAG: replica.deployment, REPLICA_TAG: replica.replica_tag}
    if replica.app_name:
        tags[APPLICATION_TAG] = replica.app_name
    return tags


class _ServeTags:
    """Mixed into each kind: the replica's tags as defaults, the request's route when asked."""

    _tag_keys: tuple[str, ...]

    def _init_serve_tags(self, args: tuple[Any, ...]) -> None:
        self._args = args  # the user's arguments: a metric unpickled elsewhere adds that replica's tags
        self._user_default_tags: dict[str, str] = {}
        _metrics.Metric.set_default_tags(self, _serve_default_tags({}))  # type: ignore[arg-type]

    def set_default_tags(self, default_tags: dict[str, str]) -> Any:
        """The user's defaults plus this replica's tags; returns the metric (as Ray's)."""
        self._user_default_tags = dict(default_tags)
        _metrics.Metric.set_default_tags(self, _serve_default_tags(dict(default_tags)))  # type: ignore[arg-type]
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return _metrics._rebuild, (type(self), self._args, self._user_default_tags)

    def _with_route(self, tags: dict[str, str] | None) -> dict[str, str] | None:
        if ROUTE_TAG in self._tag_keys and not (tags and ROUTE_TAG in tags):
            return {**(tags or {}), ROUTE_TAG: context.current_request().route}
        return tags


class Counter(_ServeTags, _metrics.Counter):
    """A cumulative metric that only goes up (Ray's ``ray.serve.metrics.Counter``)."""

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> None:
        _metrics.Counter.__init__(self, name, description, _serve_tag_keys(tag_keys))
        self._init_serve_tags((name, description, tag_keys))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        _metrics.Counter.inc(self, value, self._with_route(tags))


class Gauge(_ServeTags, _metrics.Gauge):
    """A metric that goes up and down (Ray's ``ray.serve.metrics.Gauge``)."""

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> None:
        _metrics.Gauge.__init__(self, name, description, _serve_tag_keys(tag_keys))
        self._init_serve_tags((name, description, tag_keys))

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        _metrics.Gauge.set(self, value, self._with_route(tags))


class Histogram(_ServeTags, _metrics.Histogram):
    """Observations in buckets (Ray's ``ray.serve.metrics.Histogram``)."""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        _metrics.Histogram.__init__(self, name, description, boundaries, _serve_tag_keys(tag_keys))
        self._init_serve_tags((name, description, boundaries, tag_keys))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        _metrics.Histogram.observe(self, value, self._with_route(tags))

"""Router and handle metrics, under Ray Serve 2.60's names, labels and meaning.

Recorded in whichever process holds the router or handle: the proxy and replicas that compose
deployments export them; a driver exports nothing (its handle counts stay in its memory, its
routers' counts are never flushed):

- ``ray_serve_num_router_requests_total`` {deployment, route, application, handle, actor_id}:
  requests a router accepted (counted when submitted; a request refused by backpressure
  (``max_queued_requests``) is not counted, one sent to an unavailable deployment is, as in Ray).
- ``ray_serve_deployment_queued_queries`` {deployment, application, handle, actor_id}: requests
  waiting in the router for a replica.
- ``ray_serve_num_ongoing_requests_at_replicas`` {deployment, application, handle, actor_id}:
  requests the router sent to replicas that have not finished.
- ``ray_serve_handle_request_counter_total`` {handle, deployment, route, application}: calls
  made through a handle (``handle.remote()``, and each HTTP request the proxy sends).

Label values:

- ``handle`` of the router series: the router's id (8 hex characters). Ray gives each
  ``DeploymentHandle`` its own router and labels it with the handle's random id; in shoal every
  handle of a process to one deployment shares that process's router, so the id is the router's.
- ``handle`` of ``handle_request_counter``: Ray's ``"<app>#<deployment>#<handle id>"``, with the
  id of the ``DeploymentHandle`` (copies made by ``options()`` keep it). The proxy's handle for
  an application's ingress is its router, so there the id is the router's id.
- ``actor_id``: the calling process. Ray puts the actor's id, or ``"DRIVER"`` in a driver. shoal
  has no actors: a replica puts its full replica id (``"<app>#<deployment>#<unique id>"``), the
  proxy ``"proxy"``, any other process ``"DRIVER"``.
- ``route``: the route of the request the call is made for: the proxy's matched route prefix, or
  in a replica the route of the request it is handling ("" outside an HTTP request).

Ray's routers also export ``serve_reserved_slots_active`` (two-phase routing, which shoal
refuses) and ``serve_router_args_resolution_latency_ms``; shoal records neither.

Costs: a router's counts are Python ints flushed into their counters, and its two gauges
sampled from its state, every ``metrics_batch.FLUSH_INTERVAL_S`` (100 ms; Ray caches them the
same way for ``RAY_SERVE_METRICS_EXPORT_INTERVAL_MS``), only in processes that export metrics;
so the request path adds an int. A handle's calls are counted the same way when made on the
thread of the loop that flushes the routers' counts (a replica's or the proxy's loop: async
user code); calls from other threads (sync methods, a driver) go straight into the counter
child bound once per (handle, route).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from shoal.runtime import context, metrics, metrics_batch

if TYPE_CHECKING:
    import asyncio

    from shoal.runtime.router import Router

DRIVER_ACTOR_ID = "DRIVER"  # Ray's get_current_actor_id() in a driver
PROXY_ACTOR_ID = "proxy"

_ROUTER_TAGS = ("deployment", "application", "handle", "actor_id")

ROUTER_REQUESTS = metrics.Counter(
    "serve_num_router_requests",
    description="The number of requests processed by the router.",
    tag_keys=("deployment", "route", "application", "handle", "actor_id"),
)
QUEUED_QUERIES = metrics.Gauge(
    "serve_deployment_queued_queries",
    description="The current number of queries to this deployment waiting to be assigned to a replica.",
    tag_keys=_ROUTER_TAGS,
)
ONGOING_AT_REPLICAS = metrics.Gauge(
    "serve_num_ongoing_requests_at_replicas",
    description="The current number of requests to this deployment that have been submitted to a replica.",
    tag_keys=_ROUTER_TAGS,
)
HANDLE_REQUESTS = metrics.Counter(
    "serve_handle_request_counter",
    description="The number of handle.remote() calls that have been made on this handle.",
    tag_keys=("handle", "deployment", "route", "application"),
)

_actor_id: str | None = None


def set_actor_id(actor_id: str) -> None:
    """Name this process in the ``actor_id`` label (the proxy calls it with ``PROXY_ACTOR_ID``)."""
    global _actor_id
    _actor_id = actor_id


def actor_id() -> str:
    """This process's ``actor_id``: set by ``set_actor_id``, else the replica's full id inside a
    replica, else ``"DRIVER"``."""
    if _actor_id is not None:
        return _actor_id
    if context.in_replica():
        return context.get_replica_context().replica_id.to_full_id_str()
    return DRIVER_ACTOR_ID


def new_handle_id() -> str:
    return os.urandom(4).hex()


def handle_tag(app_name: str, deployment_name: str, handle_id: str) -> str:
    """Ray's ``handle`` label of ``handle_request_counter``."""
    return f"{app_name}#{deployment_name}#{handle_id}" if app_name else f"{deployment_name}#{handle_id}"


_HandleKey = tuple[str, str, str, str]  # (application, deployment, handle id, route)
_handle_children: dict[_HandleKey, Any] = {}
_handle_pending: dict[_HandleKey, metrics_batch.PendingCount] = {}
_batch_loop: asyncio.AbstractEventLoop | None = None  # the loop that flushes _handle_pending
_batch_thread: int | None = None  # its thread, once it flushed: calls from it are batched


def _handle_child(key: _HandleKey) -> Any:
    child = _handle_children.get(key)
    if child is None:
        app_name, deployment_name, handle_id, route = key
        child = _handle_children[key] = HANDLE_REQUESTS.bind({
            "handle": handle_tag(app_name, deployment_name, handle_id), "deployment": deployment_name,
            "route": route, "application": app_name,
        })
    return child


def count_handle_request(app_name: str, deployment_name: str, handle_id: str, route: str) -> None:
    """One call through the handle ``handle_id`` (any thread): on the thread of the loop that
    flushes the routers' counts, an int added; elsewhere one increment of the child."""
    key = (app_name, deployment_name, handle_id, route)
    if threading.get_ident() == _batch_thread:
        pending = _handle_pending.get(key)
        if pending is None:
            pending = _handle_pending[key] = metrics_batch.PendingCount(_handle_child(key))
        pending.n += 1
    else:
        _handle_child(key).inc()


def flush_handle_requests() -> None:
    """Add the batched handle calls to their counters (the batching loop's thread only)."""
    global _batch_thread
    _batch_thread = threading.get_ident()
    for pending in _handle_pending.values():
        pending.flush()


def _batch_handle_requests(loop: asyncio.AbstractEventLoop) -> None:
    """Batch the handle calls made on ``loop``'s thread from its first flush on (the first loop
    of this process whose routers flush periodically)."""
    global _batch_loop
    if _batch_loop is None or _batch_loop.is_closed():
        if _batch_loop is not None:
            metrics_batch.unregister(_batch_loop, flush_handle_requests)
        _batch_loop = loop
        metrics_batch.register(loop, flush_handle_requests)


class RouterMetrics:
    """The series of one router (loop thread only): ``count(route)`` per accepted request,
    ``count_handle_request(route)`` per call through the router as a handle (the proxy's);
    ``flush()`` adds them to the counters and sets the two gauges from the router's state."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.handle_id = new_handle_id()
        self._tags = {
            "deployment": router.deployment_name, "application": router.app_name,
            "handle": self.handle_id, "actor_id": actor_id(),
        }
        self._routes: dict[str, metrics_batch.PendingCount] = {}
        self._handle_routes: dict[str, metrics_batch.PendingCount] = {}
        self._queued = QUEUED_QUERIES.bind(self._tags)
        self._at_replicas = ONGOING_AT_REPLICAS.bind(self._tags)
        self._last = (0, 0)
        self._queued.set(0)
        self._at_replicas.set(0)
        if metrics_batch.register(router.loop, self.flush):
            _batch_handle_requests(router.loop)

    def count(self, route: str) -> None:
        pending = self._routes.get(route)
        if pending is None:
            pending = self._routes[route] = metrics_batch.PendingCount(
                ROUTER_REQUESTS.bind({**self._tags, "route": route}))
        pending.n += 1

    def count_handle_request(self, route: str) -> None:
        """A call through the handle this router is (the proxy's handle of an ingress)."""
        pending = self._handle_routes.get(route)
        if pending is None:
            router = self._router
            pending = self._handle_routes[route] = metrics_batch.PendingCount(HANDLE_REQUESTS.bind({
                "handle": handle_tag(router.app_name, router.deployment_name, self.handle_id),
                "deployment": router.deployment_name, "route": route, "application": router.app_name,
            }))
        pending.n += 1

    def flush(self) -> None:
        for pending in self._routes.values():
            pending.flush()
        for pending in self._handle_routes.values():
            pending.flush()
        router = self._router
        values = (len(router.queue), router.at_replicas())
        if values != self._last:
            self._last = values
            self._queued.set(values[0])
            self._at_replicas.set(values[1])

    def close(self) -> None:
        """The router stopped: what it counted is flushed (and the handle calls batched on its
        loop's thread, if any), its gauges read 0."""
        self.flush()
        if threading.get_ident() == _batch_thread:
            flush_handle_requests()
        metrics_batch.unregister(self._router.loop, self.flush)
        self._last = (0, 0)
        self._queued.set(0)
        self._at_replicas.set(0)

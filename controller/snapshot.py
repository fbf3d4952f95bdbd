"""Routing snapshots: what routers know of the replica sets, limits and routes, versioned.

``build_snapshot`` is the one place the snapshot is made from the controller's records (and
what replicas report for request routers: their multiplexed model ids and routing stats, kept
in ``Snapshots.replica_info``);
``unavailable_reason`` decides when routers fail a deployment's requests at once.
``Snapshots.publish`` bumps the version only when the content changed; routers long-poll with
``wait_newer``. ``Snapshots.listener_at`` records which version each router process applied,
so a replica about to stop can wait until nobody routes to it any more (``wait_routers_at``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.runtime import wire
from shoal.serve.schema import DeploymentStatus, ReplicaState

logger = logging.getLogger("shoal.controller")


@dataclass(frozen=True)
class ReplicaRoutingInfo:
    """What one replica reported for request routers."""

    model_ids: wire.ModelIds | None = None
    routing_stats: tuple[int, bytes] | None = None  # encoded (wire.dumps): never decoded here


def build_snapshot(
    apps: Iterable[AppState], version: int, replica_info: Mapping[str, ReplicaRoutingInfo] | None = None
) -> wire.Snapshot:
    """The snapshot of ``apps``: running and draining replicas, the limits and request router
    of each deployment (by ``app#deployment`` key) with what its running replicas reported
    (``replica_info``, by replica id), and the route prefix of each application."""
    deployments: dict[str, wire.DeploymentEntry] = {}
    routes: dict[str, wire.RouteEntry] = {}
    info = replica_info or {}
    for app in apps:
        for state in app.deployments.values():
            if state.deleting:
                continue
            backpressure = state.config.get("backpressure_config") or {}
            running = state.running()
            model_ids: dict[str, wire.ModelIds] = {}
            stats: dict[str, tuple[int, bytes]] = {}
            for r in running:
                reported = info.get(r.replica_id)
                if reported is not None:
                    if reported.model_ids is not None:
                        model_ids[r.replica_id] = reported.model_ids
                    if reported.routing_stats is not None:
                        stats[r.replica_id] = reported.routing_stats
            deployments[state.key] = wire.DeploymentEntry(
                replicas=tuple(_address(r) for r in running),
                draining=tuple(_address(r) for r in state.replicas.values() if r.state == ReplicaState.STOPPING),
                max_ongoing_requests=state.config["max_ongoing_requests"],
                max_queued_requests=state.config.get("max_queued_requests", -1),
                backpressure_status_code=backpressure.get("status_code", 503),
                backpressure_retry_after_s=backpressure.get("retry_after_s"),
                autoscaling=state.autoscaler is not None,
                failed_reason=unavailable_reason(state),
                router=router_spec(state.config.get("request_router_config")),
                model_ids=model_ids,
                routing_stats=stats,
            )
        if app.route_prefix is not None and not app.deleting:
            routes[app.route_prefix] = wire.RouteEntry(app.name, app.ingress)
    return wire.Snapshot(version, deployments, routes)


def router_spec(config: Mapping[str, Any] | None) -> wire.RouterSpec:
    """The ``RouterSpec`` of a deployment's ``request_router_config`` (wire form: its class is
    the built-in router's path or a class cloudpickled at deploy, passed on as bytes)."""
    if not config:
        return wire.RouterSpec(wire.DEFAULT_ROUTER)
    cls = config.get("request_router_class") or wire.DEFAULT_ROUTER
    return wire.RouterSpec(
        cls if isinstance(cls, (str, bytes)) else wire.DEFAULT_ROUTER,
        dict(config.get("request_router_kwargs") or {}),
        float(config.get("initial_backoff_s", 0.025)),
        float(config.get("backoff_multiplier", 2.0)),
        float(config.get("max_backoff_s", 0.5)),
    )


def unavailable_reason(state: DeploymentState) -> str | None:
    """Why routers should fail ``state``'s requests at once rather than queue them, or None.

    Only while no replica runs: the deployment failed to deploy (DEPLOY_FAILED), or its replicas
    keep crashing (``crash_looping``), so a request queued for the next replica would most
    likely wait for one that dies too. Once a replica runs again, requests route to it.
    """
    if state.running():
        return None
    if state.status == DeploymentStatus.DEPLOY_FAILED:
        return state.message
    if state.crash_looping:
        return f"its replicas keep crashing ({state.crashes_in_a_row} in a row; last: {state.last_error})"
    return None


def _address(replica: Replica) -> wire.ReplicaAddress:
    return wire.ReplicaAddress(replica.replica_id, replica.incarnation, replica.endpoint)


class Snapshots:
    def __init__(self) -> None:
        self.current = build_snapshot((), 1)
        self.replica_info: dict[str, ReplicaRoutingInfo] = {}  # by replica id, while it runs
        self._changed = asyncio.Event()
        self._listeners: dict[bytes, int] = {}  # each router process: the version it applied
        self._listeners_changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self.current.version

    def publish(self, apps: Iterable[AppState]) -> None:
        """Make the snapshot of ``apps`` current, under a new version if it changed."""
        apps = list(apps)
        live = {rid for app in apps for state in app.deployments.values() for rid in state.replicas}
        for rid in [rid for rid in self.replica_info if rid not in live]:
            del self.replica_info[rid]
        fresh = build_snapshot(apps, self.version + 1, self.replica_info)
        if (fresh.deployments, fresh.routes) == (self.current.deployments, self.current.routes):
            return
        self.current = fresh
        self._changed.set()
        self._changed = asyncio.Event()

    def record_model_ids(self, replica_id: str, model_ids: wire.ModelIds) -> bool:
        """A replica reported the multiplexed models it holds; False if not newer than known."""
        known = self.replica_info.get(replica_id, ReplicaRoutingInfo())
        if known.model_ids is not None and known.model_ids.version >= model_ids.version:
            return False
        self.replica_info[replica_id] = ReplicaRoutingInfo(model_ids, known.routing_stats)
        return True

    def record_routing_stats(self, replica_id: str, stats: tuple[int, bytes]) -> None:
        """A replica's ``record_routing_stats()`` returned ``stats`` (encoded)."""
        known = self.replica_info.get(replica_id, ReplicaRoutingInfo())
        self.replica_info[replica_id] = ReplicaRoutingInfo(known.model_ids, stats)

    async def wait_newer(self, version: int) -> wire.Snapshot:
        """The current snapshot, once its version is above ``version``."""
        while self.version <= version:
            await self._changed.wait()
        return self.current

    def listener_at(self, identity: bytes, version: int) -> None:
        """A process long-polls for snapshots newer than ``version``: it routes with it."""
        self._listeners[identity] = version
        self._wake_listeners()

    def listener_gone(self, identity: bytes) -> None:
        self._listeners.pop(identity, None)
        self._wake_listeners()

    def _wake_listeners(self) -> None:
        self._listeners_changed.set()
        self._listeners_changed = asyncio.Event()

    async def wait_routers_at(self, version: int, timeout_s: float) -> None:
        """Wait (bounded) until every router process has applied snapshot ``version``."""
        try:
            async with asyncio.timeout(timeout_s):
                while any(v < version for v in self._listeners.values()):
                    await self._listeners_changed.wait()
        except TimeoutError:
            lagging = sum(v < version for v in self._listeners.values())
            logger.debug("%d router(s) did not apply snapshot %d within %.1fs", lagging, version, timeout_s)

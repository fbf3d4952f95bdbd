"""Routing snapshots: what routers know of the replica sets, limits and routes, versioned.

``build_snapshot`` is the one place the snapshot is made from the controller's records;
``unavailable_reason`` decides when routers fail a deployment's requests at once.
``Snapshots.publish`` bumps the version only when the content changed; routers long-poll with
``wait_newer``. ``Snapshots.listener_at`` records which version each router process applied,
so a replica about to stop can wait until nobody routes to it any more (``wait_routers_at``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.runtime import wire
from shoal.serve.schema import DeploymentStatus, ReplicaState

logger = logging.getLogger("shoal.controller")


def build_snapshot(apps: Iterable[AppState], version: int) -> wire.Snapshot:
    """The snapshot of ``apps``: running and draining replicas and the limits of each deployment
    (by ``app#deployment`` key), and the route prefix of each application."""
    deployments: dict[str, wire.DeploymentEntry] = {}
    routes: dict[str, wire.RouteEntry] = {}
    for app in apps:
        for state in app.deployments.values():
            if state.deleting:
                continue
            backpressure = state.config.get("backpressure_config") or {}
            deployments[state.key] = wire.DeploymentEntry(
                replicas=tuple(_address(r) for r in state.running()),
                draining=tuple(_address(r) for r in state.replicas.values() if r.state == ReplicaState.STOPPING),
                max_ongoing_requests=state.config["max_ongoing_requests"],
                max_queued_requests=state.config.get("max_queued_requests", -1),
                backpressure_status_code=backpressure.get("status_code", 503),
                backpressure_retry_after_s=backpressure.get("retry_after_s"),
                autoscaling=state.autoscaler is not None,
                failed_reason=unavailable_reason(state),
            )
        if app.route_prefix is not None and not app.deleting:
            routes[app.route_prefix] = wire.RouteEntry(app.name, app.ingress)
    return wire.Snapshot(version, deployments, routes)


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
        self._changed = asyncio.Event()
        self._listeners: dict[bytes, int] = {}  # each router process: the version it applied
        self._listeners_changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self.current.version

    def publish(self, apps: Iterable[AppState]) -> None:
        """Make the snapshot of ``apps`` current, under a new version if it changed."""
        fresh = build_snapshot(apps, self.version + 1)
        if (fresh.deployments, fresh.routes) == (self.current.deployments, self.current.routes):
            return
        self.current = fresh
        self._changed.set()
        self._changed = asyncio.Event()

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

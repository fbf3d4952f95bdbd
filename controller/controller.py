"""Controller: applications, deployments and replicas, reconciled toward their targets.

The controller is never on the request path. It keeps the records (``state``), takes deploys
and deletes (``deploy``), records what the executor reports (``observe``), and after every
event (deploy, READY, exit, health failure, autoscaling decision, timer) plans each deployment
(``reconcile.plan``, pure) and hands the actions to the executor, which owns the processes.
Then it publishes the routing snapshot (``snapshot``) that routers long-poll for.

Statuses follow Ray Serve: a deployment is UPDATING until its target number of replicas of the
current version run, then HEALTHY; a constructor that keeps failing makes it DEPLOY_FAILED after
``min(max_constructor_retry_count, 3 * target)`` failed starts, carrying the last traceback. A
replica that crashes after it was running is replaced (with backoff).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.controller import actor_options, applied, observe, reconcile, scaling
from shoal.controller import metrics as controller_metrics
from shoal.controller.deploy import (
    ControllerError,
    apply_spec,
    capacity_direction,
    check_route_prefixes,
    delete_deployment,
)
from shoal.controller.executor import Executor
from shoal.controller.reconcile import Action, KillReplica, SetStatus, StartReplica, StopReplica, UpdateReplica, WakeAt
from shoal.controller.snapshot import Snapshots
from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.controller.status import render_status
from shoal.controller.tasks import TaskSet, supervise
from shoal.runtime import wire
from shoal.runtime.rotation import RotationLimits
from shoal.serve.schema import ApplicationStatus

if TYPE_CHECKING:
    from shoal.controller.proxies import ProxyPool

__all__ = ["Controller", "ControllerError"]

logger = logging.getLogger("shoal.controller")


class Controller:
    def __init__(
        self, run_dir: Path, *, echo: Callable[[str], None], gpus: tuple[str, ...] = (),
        log_rotation: RotationLimits | None = None,
    ) -> None:
        """Must be made on the running loop: it starts the autoscaling task. ``gpus``: the
        machine's GPU device ids; ``log_rotation``: the replica log files' size limits (None:
        from ``RAY_ROTATION_*``, see ``runtime/rotation.py``)."""
        self.apps: dict[str, AppState] = {}
        self._run_dir = run_dir
        self._specs: dict[str, dict[str, Any]] = {}  # what was deployed, saved (``applied``)
        self.proxies: ProxyPool | None = None  # when HTTP is enabled
        # The last config file's applications and target_capacity, and the direction it moves.
        self._declared: tuple[frozenset[str], float | None] | None = None
        self.target_capacity: float | None = None
        self._capacity_direction: str | None = None
        self.snapshots = Snapshots()
        self.gauges = controller_metrics.ControllerGauges()  # served by the metrics endpoint, if on
        self.process_exited: Callable[[int], None] = lambda pid: None  # a reaped child's pid (the metrics files)
        self._stopping = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks = TaskSet()
        self._executor = Executor(
            run_dir, events=self, tasks=self._tasks, unroute=self._unroute, echo=echo, gpus=gpus,
            log_rotation=log_rotation,
        )
        poller = scaling.AutoscalePoller(
            self._deployments, self._executor.control, self.reconcile, time.monotonic,
            after_tick=lambda: self.gauges.publish(self.apps.values()),
        )
        self._autoscale_task = supervise("autoscaling", poller.run)

    @property
    def version(self) -> int:
        """The version of the current routing snapshot."""
        return self.snapshots.version

    def _deployments(self) -> Iterator[DeploymentState]:
        for app in list(self.apps.values()):
            yield from list(app.deployments.values())

    # -- deploys and deletes --------------------------------------------------------------------

    def deploy_apps(self, specs: list[dict[str, Any]], *, declarative: bool) -> None:
        """Deploy several applications at once (a config file): all are checked before any
        changes; ``declarative`` also deletes the applications ``specs`` does not name.

        A declarative deploy sets the instance's ``target_capacity`` (the specs carry the
        file's): every application in it is scaled by it (``deploy.capacity_direction``)."""
        self._check_running()
        check_route_prefixes(self.apps, specs, declarative=declarative)
        self._check_actor_options(specs)
        if declarative:
            specs = self._with_capacity(specs)
            names = {spec["name"] for spec in specs}
            for name in [n for n in self.apps if n not in names]:
                self.delete_app(name)
        for spec in specs:
            self._apply(spec)
        self._save()

    def _with_capacity(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        capacities = {spec.get("target_capacity") for spec in specs}
        capacity = capacities.pop() if len(capacities) == 1 else None
        new = (frozenset(spec["name"] for spec in specs), capacity)
        directions = {spec.get("target_capacity_direction", "") for spec in specs}
        if self._declared is None and len(directions) == 1 and "" not in directions:
            self._capacity_direction = directions.pop()  # specs saved by a supervisor before a crash
        else:
            self._capacity_direction = capacity_direction(self._declared, new, self._capacity_direction)
        if capacity != self.target_capacity:
            logger.info("target_capacity changes from %s to %s", self.target_capacity, capacity)
        self._declared, self.target_capacity = new, capacity
        return [
            {**spec, "target_capacity": capacity, "target_capacity_direction": self._capacity_direction}
            for spec in specs
        ]

    def _check_actor_options(self, specs: list[dict[str, Any]]) -> None:
        """ControllerError for ``ray_actor_options`` shoal cannot honour; warnings logged once."""
        for spec in specs:
            for d in spec["deployments"]:
                try:
                    options = d["config"].get("ray_actor_options") or {}
                    warnings = actor_options.check(d["name"], options, len(self._executor.gpus.devices))
                except actor_options.ActorOptionsError as exc:
                    raise ControllerError(f"Application '{spec['name']}': {exc}") from None
                for warning in warnings:
                    logger.warning("Application '%s': %s", spec["name"], warning)

    def _check_running(self) -> None:
        if self._stopping:
            raise ControllerError("the instance is shutting down")

    def _apply(self, spec: dict[str, Any]) -> None:
        instance_logging = spec.get("instance_logging_config")
        if instance_logging:  # serve.start's or a config file's top level: the supervisor's and proxy's too
            logging.getLogger().setLevel(instance_logging.get("log_level", "INFO"))
            if self.proxies is not None:
                self.proxies.set_logging_config(instance_logging)
        app, updates = apply_spec(self.apps.get(spec["name"]), spec)
        for update in updates:
            self._executor.reconfigure(update.state, update.update, update.previous)
        self.apps[app.name] = app
        self._specs[app.name] = spec
        self.reconcile()

    def delete_app(self, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for state in app.deployments.values():
            delete_deployment(state)
        if self._specs.pop(name, None) is not None:
            self._save()
        self.reconcile()

    def _save(self) -> None:
        """Save what is deployed, for a supervisor started again on this run directory."""
        try:
            applied.save(self._run_dir, list(self._specs.values()))
        except OSError:
            logger.exception("could not save the deployed applications in %s", self._run_dir)

    def record_queued(self, source: str, queued: dict[str, int]) -> None:
        """A router's queue lengths by deployment (see ``scaling.record_queued``)."""
        if scaling.record_queued(self._deployments(), source, queued, time.monotonic()):
            self.reconcile()

    # -- waiting --------------------------------------------------------------------------------

    async def wait_app(self, name: str, timeout_s: float | None) -> AppState | None:
        """Wait until app ``name`` is RUNNING, DEPLOY_FAILED or gone; None if gone."""
        async with asyncio.timeout(timeout_s):
            while True:
                app = self.apps.get(name)
                if app is None:
                    return None
                if app.status in (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED):
                    if self.proxies is not None and app.status == ApplicationStatus.RUNNING:
                        await self.proxies.wait_applied(self.version, timeout_s=10.0)
                    return app
                app.changed.clear()
                await app.changed.wait()

    async def wait_snapshot(self, newer_than: int) -> wire.Snapshot:
        return await self.snapshots.wait_newer(newer_than)

    def listener_at(self, identity: bytes, version: int) -> None:
        self.snapshots.listener_at(identity, version)

    def listener_gone(self, identity: bytes) -> None:
        self.snapshots.listener_gone(identity)

    async def _unroute(self, timeout_s: float) -> None:
        """Publish, and wait (bounded) until every router applied it: a replica about to stop
        then gets no new requests from anyone."""
        self.snapshots.publish(self.apps.values())
        await self.snapshots.wait_routers_at(self.version, timeout_s)

    def status(self) -> dict[str, Any]:
        if self.proxies is None:
            rendered = render_status(self.apps.values(), None, self.target_capacity)
        else:
            rendered = render_status(
                self.apps.values(), self.proxies.status.value, self.target_capacity, proxies=self.proxies.details(),
            )
        rendered["templates"] = self._executor.templates.describe_all()  # warm template processes
        return rendered

    async def set_num_proxies(self, num_proxies: int) -> None:
        """Run ``num_proxies`` HTTP proxies from now on (``ProxyPool.resize``); ControllerError
        if the instance serves no HTTP or the number is not a whole number of at least 1."""
        self._check_running()
        if self.proxies is None:
            raise ControllerError("num_proxies: this instance serves no HTTP (http_options.host is None)")
        try:
            await self.proxies.resize(num_proxies)
        except ValueError as exc:
            raise ControllerError(str(exc)) from None

    # -- what the replicas report ---------------------------------------------------------------

    def find_replica(self, replica_id: str, incarnation: int) -> tuple[DeploymentState, Replica] | None:
        for state in self._deployments():
            replica = state.replicas.get(replica_id)
            if replica is not None and replica.incarnation == incarnation:
                return state, replica
        return None

    def on_ready(self, replica_id: str, incarnation: int, meta: dict[str, Any]) -> None:
        found = self.find_replica(replica_id, incarnation)
        if found is None:
            return
        state, replica = found
        if self._executor.connect(state, replica, meta) and observe.replica_ready(replica, meta.get("pid")):
            replica.ready_at = time.monotonic()
            tags = controller_metrics.deployment_tags(state)
            startup_ms = (replica.ready_at - replica.started_at) * 1000
            controller_metrics.REPLICA_STARTUP_LATENCY_MS.observe(startup_ms, tags=tags)
            initialization_s = meta.get("initialization_s")
            if isinstance(initialization_s, (int, float)):
                controller_metrics.REPLICA_INITIALIZATION_LATENCY_MS.observe(initialization_s * 1000, tags=tags)
            self.reconcile()

    def replica_exited(self, state: DeploymentState, replica: Replica, code: int) -> None:
        if replica.pid is not None:
            self.process_exited(replica.pid)
        observe.replica_exited(state, replica, code, time.monotonic(), stopping=self._stopping)
        self.reconcile()

    def routing_stats(self, replica: Replica, stats: tuple[int, bytes]) -> None:
        """A replica's ``record_routing_stats()`` (encoded): into the next snapshot."""
        self.snapshots.record_routing_stats(replica.replica_id, stats)
        self.snapshots.publish(self.apps.values())

    def replica_unhealthy(self, state: DeploymentState, replica: Replica, error: str) -> None:
        if observe.replica_unhealthy(state, replica, error):
            self.reconcile()

    def metrics_changed(self) -> None:
        """A counted fact of the records changed outside a control-loop pass (a failed check)."""
        self.gauges.publish(self.apps.values())

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Plan every deployment and carry the actions out; update statuses; publish. One pass
        is one control loop (``controller/metrics.py``)."""
        started = time.perf_counter()
        self._executor.warm(self._deployments())  # templates for the versions it may start
        now = time.monotonic()
        wake_at: float | None = None
        for app in list(self.apps.values()):
            for key, state in list(app.deployments.items()):
                target, observed = reconcile.target_of(state, stopping=self._stopping), reconcile.observed_of(state)
                for action in reconcile.plan(target, observed, now):
                    wake = self._carry_out(state, action, now)
                    if wake is not None:
                        wake_at = wake if wake_at is None else min(wake_at, wake)
                if state.deleting and not state.replicas:
                    del app.deployments[key]
            status = reconcile.app_status(app)
            if status != (app.status, app.message):
                app.status, app.message = status
                app.changed.set()
            if app.deleting and not app.deployments:
                del self.apps[app.name]
                app.changed.set()
        self.snapshots.publish(self.apps.values())
        if wake_at is not None:
            self._wake_at(wake_at - now)
        self.gauges.control_loop(time.perf_counter() - started, self.apps.values())

    def _carry_out(self, state: DeploymentState, action: Action, now: float) -> float | None:
        """Do ``action`` for ``state``; returns when to plan again, if it says."""
        match action:
            case StartReplica(rank=rank):
                self._executor.start(state, now, rank)
            case UpdateReplica(replica_id=replica_id, world_size=world_size, rank=rank):
                self._executor.update_replica(state, state.replicas[replica_id], world_size, rank)
            case StopReplica(replica_id=replica_id, drain=drain):
                unroute = drain and not self._stopping  # at shutdown nobody routes any more
                self._executor.stop(state, state.replicas[replica_id], drain=drain, unroute=unroute)
            case KillReplica(replica_id=replica_id):
                self._executor.kill(state.replicas[replica_id])
            case WakeAt(at_s=at_s):
                return at_s
            case SetStatus(status=status, trigger=trigger, message=message):
                state.status, state.trigger = status, trigger
                if message is not None:
                    state.message = message
        return None

    def _wake_at(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.reconcile()

    # -- shutdown -------------------------------------------------------------------------------

    async def shutdown(self, announce: bool = True) -> None:
        """Drain the proxies, then stop every replica gracefully (each bounded by its timeout).
        ``announce``: the proxies' /-/healthz fails for a moment before they stop."""
        self._stopping = True
        self._autoscale_task.cancel()
        await asyncio.gather(self._autoscale_task, return_exceptions=True)
        if self.proxies is not None:
            await self.proxies.stop(announce)
        for app in self.apps.values():
            app.deleting = True
            for state in app.deployments.values():
                delete_deployment(state)
        self.reconcile()
        await self._executor.wait_exited()
        await self._tasks.join()
        if self._timer is not None:
            self._timer.cancel()
        self.apps.clear()
        self.snapshots.publish(())
        self.gauges.publish(())

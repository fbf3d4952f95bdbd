"""Controller: applications, deployments and replicas, reconciled toward their targets.

The controller is never on the request path. It starts and stops replica processes, tracks
their states, and publishes versioned snapshots (replica sets, limits, routes) that routers
long-poll for. ``reconcile`` runs after every event (deploy, READY, exit, timer) and is the only
place that decides to start or stop replicas.

Statuses follow Ray Serve: a deployment is UPDATING until its target number of replicas of the
current version run, then HEALTHY; a constructor that keeps failing makes it DEPLOY_FAILED after
``min(max_constructor_retry_count, 3 * target)`` failed starts, carrying the last traceback. A
replica that crashes after it was running is replaced (with backoff) and routers fail the
requests it held at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from shoal.controller import rundir
from shoal.controller.autoscale import Autoscaler
from shoal.controller.health import HealthMonitor
from shoal.controller.process import WorkerProcess
from shoal.controller.replica_control import METRICS_METHOD, RECONFIGURE_METHOD, ReplicaControl
from shoal.controller.state import (
    RESTART_BACKOFF_INITIAL_S,
    AppState,
    DeploymentState,
    Replica,
    definition_version,
    initial_target,
)
from shoal.runtime import wire
from shoal.runtime.logs import replica_prefix
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import DeploymentID
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, DeploymentStatusTrigger, ReplicaState

logger = logging.getLogger("shoal.controller")

_AUTOSCALE_TICK_S = 0.25
_INIT_FAILED_GRACE_S = 0.2
_RESTART_BACKOFF_MAX_S = 10.0
_BACKOFF_RESET_AFTER_S = 30.0  # a replica that ran this long before crashing starts its backoff over


class ControllerError(Exception):
    """A request the controller refuses; the message says what to change."""


# Options a running replica takes without a restart (Ray: NeedsActorReconfigure).
_IN_PLACE_OPTIONS = ("user_config", "max_ongoing_requests")


class Controller:
    def __init__(self, run_dir: Path, *, echo: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self.apps: dict[str, AppState] = {}
        self.version = 1
        self._snapshot: dict[str, Any] = {"version": 1, "deployments": {}, "routes": {}}
        self._snapshot_changed = asyncio.Event()
        self._incarnations = itertools.count(1)
        self._echo = echo
        self._logs = rundir.ensure_private_dir(run_dir / rundir.LOGS)
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.proxy: Any = None  # the ProxySupervisor, when HTTP is enabled
        self.read_control: Callable[[], None] = lambda: None  # handle messages already received
        self._listeners: dict[bytes, int] = {}  # each router process: the snapshot it applied
        self._autoscale_task: asyncio.Task[None] | None = None
        self._listeners_changed = asyncio.Event()

    # -- API used by the control server ---------------------------------------------------------

    def deploy_apps(self, specs: list[dict[str, Any]], *, declarative: bool) -> None:
        """Deploy several applications at once (a config file): all are checked before any
        changes; ``declarative`` also deletes the applications ``specs`` does not name."""
        names = [spec["name"] for spec in specs]
        keep = set(names) if declarative else set(names) | set(self.apps)
        taken: dict[str, str] = {}
        for app in self.apps.values():
            if app.name in keep and app.name not in names and app.route_prefix is not None and not app.deleting:
                taken[app.route_prefix] = app.name
        for spec in specs:
            prefix = spec.get("route_prefix")
            if prefix is not None and prefix in taken:
                raise ControllerError(
                    f'Prefix {prefix} is being used by application "{taken[prefix]}". '
                    f'Failed to deploy application "{spec["name"]}".'
                )
            if prefix is not None:
                taken[prefix] = spec["name"]
        for spec in specs:
            self.deploy_app(spec)
        if declarative:
            for name in list(self.apps):
                if name not in keep:
                    self.delete_app(name)

    def deploy_app(self, spec: dict[str, Any]) -> None:
        """Create or replace an application (``spec`` as built by ``shoal.serve._build``)."""
        name = spec["name"]
        prefix = spec.get("route_prefix")
        if self._stopping:
            raise ControllerError("the instance is shutting down")
        for other in self.apps.values():
            if other.name != name and prefix is not None and other.route_prefix == prefix and not other.deleting:
                raise ControllerError(
                    f'Prefix {prefix} is being used by application "{other.name}". '
                    f'Failed to deploy application "{name}".'
                )
        old = self.apps.get(name)
        deployments: dict[str, DeploymentState] = {}
        for d in spec["deployments"]:
            version = definition_version(d["definition"], d["config"], d.get("code_hash", ""))
            state = old.deployments.get(d["name"]) if old is not None else None
            if state is None or state.deleting:
                state = DeploymentState(name, d["name"], d["definition"], d["config"], version, spec.get("sys_path", []))
            else:
                if state.version != version:
                    state.failed_starts = 0
                    state.last_error = ""
                    if state.status == DeploymentStatus.DEPLOY_FAILED:
                        state.status = DeploymentStatus.UPDATING
                else:
                    update = {k: d["config"].get(k) for k in _IN_PLACE_OPTIONS if d["config"].get(k) != state.config.get(k)}
                    if update:
                        state.reconfiguring += 1  # counted now, so the status cannot turn HEALTHY first
                        self._spawn(self._reconfigure(state, update, {k: state.config.get(k) for k in update}))
                state.definition, state.config, state.version = d["definition"], d["config"], version
                state.sys_path = spec.get("sys_path", [])
            self._set_scaling(state, d["config"])
            state.status = DeploymentStatus.UPDATING
            state.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
            state.message = ""
            deployments[d["name"]] = state
        if old is not None:
            # Deployments dropped from the graph drain and stop under the app until gone.
            for dep_name, state in old.deployments.items():
                if dep_name not in deployments:
                    self._delete_deployment(state)
                    deployments[dep_name] = state
            app = AppState(name, prefix, spec["ingress"], deployments, changed=old.changed)
        else:
            app = AppState(name, prefix, spec["ingress"], deployments)
        app.config_source = spec.get("config_source")
        self.apps[name] = app
        self.reconcile()

    def _set_scaling(self, state: DeploymentState, config: dict[str, Any]) -> None:
        """A fixed ``num_replicas``, or an autoscaler that keeps the current target (within the
        new bounds) across redeploys and starts at ``initial_replicas`` or ``min_replicas``."""
        autoscaling = DeploymentConfig.from_wire(config).autoscaling_config if config.get("autoscaling_config") else None
        if autoscaling is None:
            state.autoscaler = None
            state.target = initial_target(config)
            return
        for entry in state.sys_path:  # a custom policy is imported from the app's own path
            if entry not in sys.path:
                sys.path.append(entry)
        if state.autoscaler is None or not state.replicas:
            state.autoscaler = Autoscaler(DeploymentID(state.name, state.app), autoscaling)
            state.target = initial_target(config)
        else:
            state.autoscaler.reconfigure(autoscaling)
            state.target = min(max(state.target, autoscaling.min_replicas), autoscaling.max_replicas)
        if self._autoscale_task is None:
            self._autoscale_task = asyncio.get_running_loop().create_task(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        """Every tick: read each autoscaling replica's running requests, then decide."""
        while True:
            await asyncio.sleep(_AUTOSCALE_TICK_S)
            states = [s for app in self.apps.values() for s in app.deployments.values()
                      if s.autoscaler is not None and not s.deleting]
            for state in states:
                replicas = [r for r in state.running(state.version) if r.control is not None]
                counts = await asyncio.gather(
                    *(r.control.call(METRICS_METHOD, timeout_s=1.0) for r in replicas if r.control),
                    return_exceptions=True,
                )
                now = time.monotonic()
                for replica, count in zip(replicas, counts):
                    if isinstance(count, (int, float)):
                        state.autoscaler.observe(replica.replica_id, float(count), now)  # type: ignore[union-attr]
            if any(self._autoscale(state) for state in states):
                self.reconcile()

    def _autoscale(self, state: DeploymentState) -> bool:
        """One autoscaling decision for ``state``; True if its target changed."""
        if state.autoscaler is None or state.status == DeploymentStatus.DEPLOY_FAILED:
            return False
        running = len(state.running(state.version))
        target = state.autoscaler.target(time.monotonic(), running, state.target)
        if target == state.target:
            return False
        logger.info("autoscaling deployment '%s' from %d to %d replicas", state.name, state.target, target)
        state.status = DeploymentStatus.UPSCALING if target > state.target else DeploymentStatus.DOWNSCALING
        state.trigger = DeploymentStatusTrigger.AUTOSCALING
        state.target = target
        return True

    def record_queued(self, source: str, queued: dict[str, int]) -> None:
        """A router's queue lengths by deployment. A deployment with no running replica and
        requests waiting is decided at once (scale from zero does not wait for a tick)."""
        now = time.monotonic()
        changed = False
        for app in self.apps.values():
            for state in app.deployments.values():
                if state.autoscaler is None or state.key not in queued:
                    continue
                state.autoscaler.observe(f"{source}/{state.key}", float(queued[state.key]), now, queued=True)
                if queued[state.key] and not state.running(state.version):
                    changed = self._autoscale(state) or changed
        if changed:
            self.reconcile()

    def delete_app(self, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        app.deleting = True
        app.status = ApplicationStatus.DELETING
        for state in app.deployments.values():
            self._delete_deployment(state)
        self.reconcile()

    def _delete_deployment(self, state: DeploymentState) -> None:
        state.deleting = True
        state.target = 0

    async def wait_app(self, name: str, timeout_s: float | None) -> AppState | None:
        """Wait until app ``name`` is RUNNING, DEPLOY_FAILED or gone; None if gone."""
        async with asyncio.timeout(timeout_s):
            while True:
                app = self.apps.get(name)
                if app is None:
                    return None
                if app.status in (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED):
                    if self.proxy is not None and app.status == ApplicationStatus.RUNNING:
                        await self.proxy.wait_applied(self.version, timeout_s=10.0)
                    return app
                app.changed.clear()
                await app.changed.wait()

    async def wait_snapshot(self, newer_than: int) -> dict[str, Any]:
        while self._snapshot["version"] <= newer_than:
            await self._snapshot_changed.wait()
        return self._snapshot

    # -- who has applied which snapshot ---------------------------------------------------------

    def listener_at(self, identity: bytes, version: int) -> None:
        """A process long-polls for snapshots newer than ``version``: it routes with it."""
        self._listeners[identity] = version
        self._listeners_changed.set()
        self._listeners_changed = asyncio.Event()

    def listener_gone(self, identity: bytes) -> None:
        self._listeners.pop(identity, None)
        self._listeners_changed.set()
        self._listeners_changed = asyncio.Event()

    async def wait_routers_at(self, version: int, timeout_s: float) -> None:
        """Wait (bounded) until every router process has applied snapshot ``version``, so that
        a replica about to stop gets no new requests from anyone once it stops listening."""
        try:
            async with asyncio.timeout(timeout_s):
                while any(v < version for v in self._listeners.values()):
                    await self._listeners_changed.wait()
        except TimeoutError:
            lagging = sum(v < version for v in self._listeners.values())
            logger.debug("%d router(s) did not apply snapshot %d within %.1fs", lagging, version, timeout_s)

    def status(self) -> dict[str, Any]:
        apps: dict[str, Any] = {}
        for app in self.apps.values():
            deployments = {}
            for state in app.deployments.values():
                if state.deleting and not app.deleting:
                    continue
                counts: dict[str, int] = {}
                for r in state.replicas.values():
                    counts[r.state.value] = counts.get(r.state.value, 0) + 1
                deployments[state.name] = {
                    "status": state.status.value,
                    "status_trigger": state.trigger.value,
                    "replica_states": counts,
                    "message": state.message,
                    "replicas": [
                        {"replica_id": r.replica_id, "state": r.state.value, "pid": r.pid, "version": r.version}
                        for r in state.replicas.values()
                    ],
                    "restarts": state.restarts,
                    "last_error": state.last_error,
                }
            apps[app.name] = {
                "status": app.status.value,
                "message": app.message,
                "last_deployed_time_s": app.deployed_at,
                "deployments": deployments,
                "route_prefix": app.route_prefix,
                "ingress": app.ingress,
            }
        proxies = {"local": self.proxy.status.value} if self.proxy is not None else {}
        return {"proxies": proxies, "applications": apps, "target_capacity": None}

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Start and stop replicas toward each deployment's target; update statuses; publish."""
        now = time.monotonic()
        wake_at: float | None = None
        for app in list(self.apps.values()):
            for key, state in list(app.deployments.items()):
                wake = self._reconcile_deployment(state, now)
                if wake is not None:
                    wake_at = wake if wake_at is None else min(wake_at, wake)
                if state.deleting and not state.replicas:
                    del app.deployments[key]
            self._update_app_status(app)
            if app.deleting and not app.deployments:
                del self.apps[app.name]
                app.changed.set()
        self._publish()
        if wake_at is not None:
            self._schedule(wake_at - now)

    def _reconcile_deployment(self, state: DeploymentState, now: float) -> float | None:
        """Start and stop this deployment's replicas; returns when to look again, if timed.

        A new version rolls out ``rolling_update_percentage`` of the target at a time: that many
        new replicas start, and an old one stops only once a new one runs, so the number of
        running replicas never drops below the target during an update. If the new version
        fails to start, the old replicas keep serving.
        """
        failed = state.status == DeploymentStatus.DEPLOY_FAILED
        old = [r for r in state.live() if r.version != state.version]
        if state.deleting:
            for replica in state.live():
                self._stop_replica(state, replica)
            return None
        wake: float | None = None
        current = state.live(state.version)
        missing = state.target - len(current)
        if old:  # rolling update: a batch of new replicas starting at a time
            batch = max(1, int(float(state.config.get("rolling_update_percentage", 0.2)) * state.target))
            starting = len(current) - len(state.running(state.version))
            missing = min(missing, batch - starting)
        if missing > 0 and not failed and not self._stopping:
            if now >= state.next_start_at:
                for _ in range(missing):
                    self._start_replica(state)
            else:
                wake = state.next_start_at
        # Extra replicas of the current version: stop the newest, STARTING ones first.
        extra = len(state.live(state.version)) - state.target
        if extra > 0:
            ordered = sorted(state.live(state.version), key=lambda r: (r.state == ReplicaState.RUNNING, -r.started_at))
            for replica in ordered[:extra]:
                self._stop_replica(state, replica)
        # Old replicas: starting ones stop at once; running ones as new ones take their place.
        if old and not failed:
            spare = len(state.running(state.version)) + sum(r.state == ReplicaState.RUNNING for r in old) - state.target
            for replica in sorted(old, key=lambda r: r.state == ReplicaState.RUNNING):
                if replica.state == ReplicaState.STARTING:
                    self._stop_replica(state, replica)
                elif spare > 0:
                    self._stop_replica(state, replica)
                    spare -= 1
        self._update_deployment_status(state)
        return wake

    def _update_deployment_status(self, state: DeploymentState) -> None:
        if state.status == DeploymentStatus.DEPLOY_FAILED:
            return
        running = len(state.running(state.version))
        if state.reconfiguring:
            return
        if running >= state.target and not [r for r in state.live() if r.version != state.version]:
            if state.status != DeploymentStatus.HEALTHY:
                state.trigger = {
                    DeploymentStatus.UPSCALING: DeploymentStatusTrigger.UPSCALE_COMPLETED,
                    DeploymentStatus.DOWNSCALING: DeploymentStatusTrigger.DOWNSCALE_COMPLETED,
                }.get(state.status, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED)
            state.status = DeploymentStatus.HEALTHY
            state.message = ""
        elif state.status == DeploymentStatus.HEALTHY:
            state.status = DeploymentStatus.UPSCALING if running < state.target else DeploymentStatus.DOWNSCALING

    def _update_app_status(self, app: AppState) -> None:
        before = (app.status, app.message)
        if app.deleting:
            app.status = ApplicationStatus.DELETING
        else:
            states = [s for s in app.deployments.values() if not s.deleting]
            failed = [s for s in states if s.status == DeploymentStatus.DEPLOY_FAILED]
            if failed:
                app.status = ApplicationStatus.DEPLOY_FAILED
                app.message = "\n".join(f"Deployment '{s.name}': {s.message}" for s in failed)
            elif all(s.status == DeploymentStatus.HEALTHY for s in states):
                app.status = ApplicationStatus.RUNNING
                app.message = ""
            elif app.status == ApplicationStatus.RUNNING and any(
                s.status == DeploymentStatus.UNHEALTHY for s in states
            ):
                app.status = ApplicationStatus.UNHEALTHY
            elif app.status != ApplicationStatus.RUNNING:
                app.status = ApplicationStatus.DEPLOYING
        if (app.status, app.message) != before:
            app.changed.set()

    def _schedule(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.reconcile()

    # -- replicas -------------------------------------------------------------------------------

    def _start_replica(self, state: DeploymentState) -> None:
        incarnation = next(self._incarnations)
        replica_id = f"{state.key}#{os.urandom(4).hex()}"
        endpoint = rundir.replica_endpoint(self.run_dir, incarnation)
        spec = wire.pack(
            {
                "replica_id": replica_id,
                "incarnation": incarnation,
                "app": state.app,
                "deployment": state.name,
                "endpoint": endpoint,
                "control_endpoint": rundir.control_endpoint(self.run_dir),
                "definition": state.definition,
                "config": state.config,
                "version": state.version,
                "sys_path": state.sys_path,
                "parent_pid": os.getpid(),
                "process_name": "shoal-replica",
                "world_size": state.target,
                "log_level": (state.config.get("logging_config") or {}).get("log_level", "INFO"),
            }
        )
        log_path = self._logs / f"replica_{state.app}_{state.name}_{replica_id.rsplit('#', 1)[-1]}.log"
        log_file = open(log_path, "a", buffering=1, encoding="utf-8")
        prefix_holder = {"prefix": replica_prefix(state.app, state.name, replica_id, 0)}

        def on_output(line: str) -> None:
            log_file.write(line + "\n")
            self._echo(f"{prefix_holder['prefix']} {line}")

        replica: Replica

        def on_exit(code: int) -> None:
            log_file.close()
            self._on_replica_exit(state, replica, code)

        process = WorkerProcess(spec, on_output=on_output, on_exit=on_exit, name=f"shoal:{state.app}:{state.name}")
        replica = Replica(replica_id, incarnation, state.version, endpoint, process)
        state.replicas[replica_id] = replica
        process.start()
        replica.pid = process.pid
        prefix_holder["prefix"] = replica_prefix(state.app, state.name, replica_id, process.pid or 0)

    def _stop_replica(self, state: DeploymentState, replica: Replica) -> None:
        if replica.state == ReplicaState.STOPPING:
            return
        was_running = replica.state == ReplicaState.RUNNING
        replica.state = ReplicaState.STOPPING
        replica.detach()
        grace_s = float(state.config.get("graceful_shutdown_timeout_s", 20.0)) + 2.0 if was_running else 2.0
        self._spawn(self._drain_and_stop(replica, grace_s, was_running))

    async def _drain_and_stop(self, replica: Replica, grace_s: float, was_running: bool) -> None:
        """Stop routing to the replica (everyone applies the snapshot without it), then stop it:
        it finishes what it holds within its grace period."""
        if was_running and not self._stopping:
            self._publish()
            await self.wait_routers_at(self.version, timeout_s=2.0)
        await replica.process.stop(grace_s)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def find_replica(self, replica_id: str, incarnation: int) -> tuple[DeploymentState, Replica] | None:
        for app in self.apps.values():
            for state in app.deployments.values():
                replica = state.replicas.get(replica_id)
                if replica is not None and replica.incarnation == incarnation:
                    return state, replica
        return None

    def on_ready(self, replica_id: str, incarnation: int, meta: dict[str, Any]) -> None:
        found = self.find_replica(replica_id, incarnation)
        if found is None:
            return
        state, replica = found
        if meta.get("protocol") != wire.PROTOCOL_VERSION:
            replica.error = (
                f"replica speaks protocol {meta.get('protocol')}, the supervisor speaks "
                f"{wire.PROTOCOL_VERSION}; reinstall shoal so both are the same version"
            )
            replica.process.kill()
            return
        if replica.state != ReplicaState.STARTING:
            return
        replica.state = ReplicaState.RUNNING
        replica.pid = meta.get("pid", replica.pid)
        replica.control = ReplicaControl(replica.replica_id, replica.incarnation, replica.endpoint)
        replica.health = HealthMonitor(
            replica.control,
            period_s=float(state.config.get("health_check_period_s", 10.0)),
            timeout_s=float(state.config.get("health_check_timeout_s", 30.0)),
            on_unhealthy=lambda error: self._on_unhealthy(state, replica, error),
            name=f"replica {replica.replica_id} (pid {replica.pid})",
        )
        self.reconcile()

    async def _reconfigure(self, state: DeploymentState, update: dict[str, Any], previous: dict[str, Any]) -> None:
        """Apply ``update`` to the running replicas in place (same pids). If a replica's
        ``reconfigure`` raises, every replica goes back to ``previous`` and the deployment
        reports DEPLOY_FAILED with the error, still serving with the old config. The caller
        has counted this update in ``state.reconfiguring``."""
        try:
            replicas = [r for r in state.running(state.version) if r.control is not None]
            timeout_s = float(state.config.get("health_check_timeout_s", 30.0))
            results = await asyncio.gather(
                *(r.control.call(RECONFIGURE_METHOD, update, timeout_s=timeout_s) for r in replicas if r.control),
                return_exceptions=True,
            )
            errors = [e for e in results if isinstance(e, BaseException)]
            if errors:
                state.config = {**state.config, **previous}
                await asyncio.gather(
                    *(r.control.call(RECONFIGURE_METHOD, previous, timeout_s=timeout_s) for r in replicas if r.control),
                    return_exceptions=True,
                )
                state.status = DeploymentStatus.DEPLOY_FAILED
                state.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
                state.message = f"reconfigure failed; the previous config stays in effect: {errors[0]}"
                state.last_error = state.message
        finally:
            state.reconfiguring -= 1
            self.reconcile()

    def _on_unhealthy(self, state: DeploymentState, replica: Replica, error: str) -> None:
        """Three failed health checks: replace the replica."""
        if replica.state != ReplicaState.RUNNING:
            return
        state.last_error = f"replica {replica.replica_id} (pid {replica.pid}) is unhealthy: {error}"
        state.status = DeploymentStatus.UNHEALTHY
        state.trigger = DeploymentStatusTrigger.HEALTH_CHECK_FAILED
        state.message = state.last_error
        state.restarts += 1
        logger.warning("%s; replacing it", state.last_error)
        self._stop_replica(state, replica)
        self.reconcile()

    def on_init_failed(self, replica_id: str, incarnation: int, error: str) -> None:
        found = self.find_replica(replica_id, incarnation)
        if found is not None:
            found[1].error = error

    def _on_replica_exit(self, state: DeploymentState, replica: Replica, code: int, retried: bool = False) -> None:
        if replica.state == ReplicaState.STARTING and not replica.error:
            # Its INIT_FAILED (with the constructor's traceback) travels on another socket than
            # the exit: read what arrived, and if it is not there yet, look once more shortly.
            self.read_control()
            if not replica.error and not retried:
                asyncio.get_running_loop().call_later(
                    _INIT_FAILED_GRACE_S, self._on_replica_exit, state, replica, code, True
                )
                return
        state.replicas.pop(replica.replica_id, None)
        replica.detach()
        if state.autoscaler is not None:
            state.autoscaler.forget(replica.replica_id)
        previous = replica.state
        replica.state = ReplicaState.STOPPED
        if previous == ReplicaState.STARTING and not state.deleting and not self._stopping:
            state.failed_starts += 1
            state.last_error = replica.error or f"the replica process exited with code {code} before it was ready"
            logger.warning(
                "replica %s of deployment '%s' failed to start (%d/%d): %s",
                replica.replica_id, state.name, state.failed_starts, state.failure_budget,
                state.last_error.strip().splitlines()[-1] if state.last_error.strip() else "",
            )
            if state.failed_starts >= state.failure_budget and not state.running(state.version):
                state.status = DeploymentStatus.DEPLOY_FAILED
                state.trigger = DeploymentStatusTrigger.REPLICA_STARTUP_FAILED
                state.message = (
                    f"The deployment failed to start {state.failed_starts} times in a row. "
                    f"This may be due to a problem with its constructor or initial health check "
                    f"failing. See controller logs for details. Error:\n{state.last_error}"
                )
            else:
                self._back_off(state)
        elif previous == ReplicaState.RUNNING and not self._stopping:
            if time.monotonic() - replica.started_at > _BACKOFF_RESET_AFTER_S:
                state.backoff_s = RESTART_BACKOFF_INITIAL_S  # it ran fine for a while: start over
            state.restarts += 1
            state.last_error = f"replica {replica.replica_id} (pid {replica.pid}) died unexpectedly (exit code {code})"
            logger.warning("%s; replacing it", state.last_error)
            self._back_off(state)
        self.reconcile()

    def _back_off(self, state: DeploymentState) -> None:
        state.next_start_at = time.monotonic() + state.backoff_s
        state.backoff_s = min(state.backoff_s * 2, _RESTART_BACKOFF_MAX_S)

    # -- snapshots ------------------------------------------------------------------------------

    def _publish(self) -> None:
        deployments: dict[str, Any] = {}
        routes: dict[str, Any] = {}
        for app in self.apps.values():
            for state in app.deployments.values():
                if state.deleting:
                    continue
                deployments[state.key] = {
                    "replicas": [[r.replica_id, r.incarnation, r.endpoint] for r in state.running()],
                    "draining": [
                        [r.replica_id, r.incarnation, r.endpoint]
                        for r in state.replicas.values() if r.state == ReplicaState.STOPPING
                    ],
                    "max_ongoing_requests": state.config["max_ongoing_requests"],
                    "max_queued_requests": state.config.get("max_queued_requests", -1),
                    "backpressure": state.config.get("backpressure_config") or {},
                    "autoscaling": state.autoscaler is not None,
                    "failed_reason": state.message if state.status == DeploymentStatus.DEPLOY_FAILED and not state.running() else None,
                }
            if app.route_prefix is not None and not app.deleting:
                routes[app.route_prefix] = {"app": app.name, "ingress": app.ingress}
        body = {"deployments": deployments, "routes": routes}
        if body == {k: self._snapshot[k] for k in ("deployments", "routes")}:
            return
        self.version += 1
        self._snapshot = {"version": self.version, **body}
        self._snapshot_changed.set()
        self._snapshot_changed = asyncio.Event()

    # -- shutdown -------------------------------------------------------------------------------

    async def shutdown(self, announce: bool = True) -> None:
        """Drain the proxy, then stop every replica gracefully (each bounded by its timeout).
        ``announce``: the proxy's /-/healthz fails for a moment before it stops."""
        self._stopping = True
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
        if self.proxy is not None:
            await self.proxy.stop(announce)
        for app in list(self.apps.values()):
            app.deleting = True
            for state in app.deployments.values():
                self._delete_deployment(state)
        waits = []
        for app in self.apps.values():
            for state in app.deployments.values():
                for replica in list(state.replicas.values()):
                    self._stop_replica(state, replica)
                    waits.append(replica.process.exited.wait())
        self._publish()
        if waits:
            await asyncio.gather(*waits)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.apps.clear()
        self._publish()

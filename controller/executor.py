"""The executor: carries out the plan's actions on replica processes, and reports back.

It owns every replica's process (``WorkerProcess``), its control connection and its health
checks, and nothing else decides anything here: ``start`` spawns a replica of a deployment's
current version with its rank and its GPUs (``GpuPool``; without enough free GPUs it does not
start, and the deployment's ``resources_wanted`` says why); ``stop`` stops one (a running one leaves the routers first, then drains within
``graceful_shutdown_timeout_s``); ``kill`` SIGKILLs one at once (it failed its health checks);
``reconfigure`` applies an in-place config update; ``update_replica`` tells a running replica
its new rank or world size (through the same reconfigure call). What happens next comes back through
``ReplicaEvents``: a replica exited (after its last words were read), or failed its health
checks.

A replica is forked from its deployment version's warm template when it may be (``templates``,
see ``controller/template.py``: ``SHOAL_WORKER_START``, no GPUs, a template that could be made),
else spawned; ``warm(deployments)`` keeps the templates in step with the deployments.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shoal.controller import actor_options, observe, rundir
from shoal.controller import metrics as controller_metrics
from shoal.controller.gpus import GpuPool
from shoal.controller.health import monitor_health, monitor_routing_stats
from shoal.controller.process import ForkFrom, WorkerProcess
from shoal.controller.replica_control import RECONFIGURE_METHOD, ReplicaControl
from shoal.controller.state import DeploymentState, Replica
from shoal.controller.tasks import TaskSet
from shoal.controller.template import START_ENV, Templates, start_method_from
from shoal.runtime import wire
from shoal.runtime.logs import replica_prefix
from shoal.runtime.rotation import RotatingLineFile, RotationLimits, limits_from_env
from shoal.serve.schema import ReplicaState

logger = logging.getLogger("shoal.controller")

_STARTING_STOP_GRACE_S = 2.0  # a replica that never ran has nothing to drain
_DRAIN_EXTRA_S = 2.0  # on top of graceful_shutdown_timeout_s, for the process to exit
_UNROUTE_TIMEOUT_S = 2.0


class ReplicaEvents(Protocol):
    """What the executor reports (the controller records it and plans again)."""

    def replica_exited(self, state: DeploymentState, replica: Replica, code: int) -> None: ...

    def replica_unhealthy(self, state: DeploymentState, replica: Replica, error: str) -> None: ...

    def metrics_changed(self) -> None: ...

    def routing_stats(self, replica: Replica, stats: tuple[int, bytes]) -> None: ...

    def reconcile(self) -> None: ...


@dataclass(eq=False)
class _Handles:
    """A replica's process and, once it runs, its control connection and health checks."""

    process: WorkerProcess
    control: ReplicaControl | None = None
    health: asyncio.Task[None] | None = None
    stats: asyncio.Task[None] | None = None

    def detach(self) -> None:
        if self.health is not None:
            self.health.cancel()  # the TaskSet holds it until it has ended
            self.health = None
        if self.stats is not None:
            self.stats.cancel()
            self.stats = None
        if self.control is not None:
            self.control.close()
            self.control = None


def _router_config(state: DeploymentState) -> dict[str, Any]:
    return state.config.get("request_router_config") or {}


class Executor:
    def __init__(
        self,
        run_dir: Path,
        *,
        events: ReplicaEvents,
        tasks: TaskSet,
        unroute: Callable[[float], Awaitable[None]],
        echo: Callable[[str], None],
        gpus: tuple[str, ...] = (),
        log_rotation: RotationLimits | None = None,
        start_method: str | None = None,
    ) -> None:
        """``unroute(timeout_s)`` publishes the replica sets and waits (bounded) until every
        router applied them; ``gpus``: the machine's GPU device ids; ``log_rotation``: the size
        limits of every replica log file (None: Ray's ``RAY_ROTATION_*`` variables, read once
        here, see ``runtime/rotation.py``), passed to each replica in its spec; ``start_method``:
        ``fork`` or ``spawn`` (None: ``SHOAL_WORKER_START``, read once here; default fork)."""
        self.gpus = GpuPool(gpus)
        self._run_dir = run_dir
        self._events = events
        self._tasks = tasks
        self._unroute = unroute
        self._echo = echo
        self._logs = rundir.ensure_private_dir(run_dir / rundir.LOGS)
        self._log_rotation = limits_from_env() if log_rotation is None else log_rotation
        self._incarnations = itertools.count(1)
        self._handles: dict[str, _Handles] = {}
        method = start_method_from(dict(os.environ)) if start_method is None else start_method_from({START_ENV: start_method})
        self.templates = Templates(self._template_spec, echo=echo, start_method=method)

    def _base_spec(self, state: DeploymentState) -> dict[str, Any]:
        """What every replica of ``state``'s current version is given, and its template too."""
        options = state.config.get("ray_actor_options") or {}
        return {
            "app": state.app,
            "deployment": state.name,
            "control_endpoint": rundir.control_endpoint(self._run_dir),
            "definition": state.definition,
            "config": state.config,
            "version": state.version,
            "sys_path": state.sys_path,
            "parent_pid": os.getpid(),
            "process_name": "shoal-replica",
            "memory_limit_bytes": actor_options.memory_limit_bytes(options),
            "logging_config": state.config.get("logging_config"),  # merged in deploy.apply_spec
            "logs_dir": str(self._logs),  # the replica writes its access lines there
            "log_rotation": self._log_rotation.to_spec(),  # for every log file it writes
        }

    def _template_spec(self, states: list[DeploymentState]) -> bytes:
        """The spec of a template for ``states`` (one application, one import environment)."""
        options = states[0].config.get("ray_actor_options") or {}
        spec = self._base_spec(states[0])
        del spec["definition"]
        spec.update(
            process_name="shoal-template", env=actor_options.environment(options, ()),
            definitions={state.name: state.definition for state in states},
        )
        return wire.pack(spec)

    def warm(self, states: Any) -> None:
        """Keep a warm template for every deployment that may fork its replicas (one per
        current version), and retire the others."""
        self.templates.sync(states)

    def start(self, state: DeploymentState, now: float, rank: int = 0) -> Replica | None:
        """Spawn a replica of ``state``'s current version with ``rank``, recorded STARTING in
        ``state``; None (and ``state.resources_wanted`` says why) if the GPUs it asks for are
        not free."""
        replica_id = f"{state.key}#{os.urandom(4).hex()}"
        devices = self.gpus.allocate(replica_id, state.num_gpus)
        if devices is None:
            waiting = max(1, state.target - len(state.live(state.version)))
            state.resources_wanted = self.gpus.shortage(state.name, waiting, state.num_gpus)
            return None
        state.resources_wanted = ""
        options = state.config.get("ray_actor_options") or {}
        incarnation = next(self._incarnations)
        endpoint = rundir.replica_endpoint(self._run_dir, incarnation)
        own = {
            "replica_id": replica_id,
            "incarnation": incarnation,
            "endpoint": endpoint,
            "world_size": state.target,
            "rank": rank,
            "env": actor_options.environment(options, devices),
        }
        base = self._base_spec(state)
        spec = wire.pack({**base, **own})
        template = self.templates.for_replica(state)
        fork_from = None
        if template is not None:  # the template holds the definitions
            del base["definition"]
            fork_from = ForkFrom(template, wire.pack({**base, **own}))
        replica = Replica(
            replica_id, incarnation, state.version, endpoint, started_at=now,
            rank=rank, world_size=state.target, gpus=devices,
        )
        log_path = self._logs / f"replica_{state.app}_{state.name}_{replica_id.rsplit('#', 1)[-1]}.log"
        log_file = RotatingLineFile(log_path, self._log_rotation)  # closed at exit; shared with the replica
        prefix = replica_prefix(state.app, state.name, replica_id, 0)
        tags = controller_metrics.deployment_tags(state)

        def on_output(line: str) -> None:
            log_file.write(line)
            self._echo(f"{prefix} {line}")

        def on_last_words(data: bytes) -> None:
            try:
                replica.error = str(wire.unpack(data).get("error", ""))
            except Exception:
                replica.error = data.decode("utf-8", "replace")

        def on_started(pid: int) -> None:
            nonlocal prefix
            replica.pid = pid
            replica.start_method = process.start_method  # "spawn" if the template could not fork it
            prefix = replica_prefix(state.app, state.name, replica_id, pid)

        def on_exit(code: int) -> None:
            self.templates.child_exited()
            if replica.stop_requested_at is not None:
                shutdown_ms = (time.monotonic() - replica.stop_requested_at) * 1000
                controller_metrics.REPLICA_SHUTDOWN_DURATION_MS.observe(shutdown_ms, tags=tags)
            log_file.close()
            self.gpus.release(replica_id)
            handles = self._handles.pop(replica_id, None)
            if handles is not None:
                handles.detach()
            self._events.replica_exited(state, replica, code)

        process = WorkerProcess(
            spec, on_output=on_output, on_exit=on_exit, on_last_words=on_last_words,
            name=f"shoal:{state.app}:{state.name}", fork_from=fork_from, on_started=on_started,
        )
        self._handles[replica_id] = _Handles(process)
        state.replicas[replica_id] = replica
        try:
            process.start()
        except BaseException:
            self._handles.pop(replica_id, None)
            state.replicas.pop(replica_id, None)
            self.gpus.release(replica_id)
            log_file.close()
            raise
        return replica

    def connect(self, state: DeploymentState, replica: Replica, meta: dict[str, Any]) -> bool:
        """The replica said READY with ``meta``: connect to it and start its health checks.
        False (and the replica is killed) if it speaks another protocol version."""
        handles = self._handles.get(replica.replica_id)
        if handles is None:
            return False
        if meta.get("protocol") != wire.PROTOCOL_VERSION:
            replica.error = (
                f"replica speaks protocol {meta.get('protocol')}, the supervisor speaks "
                f"{wire.PROTOCOL_VERSION}; reinstall shoal so both are the same version"
            )
            handles.process.kill()
            return False
        if replica.state != ReplicaState.STARTING:
            return False
        handles.control = ReplicaControl(replica.replica_id, replica.incarnation, replica.endpoint)
        tags = controller_metrics.deployment_tags(state)
        latency_ms = controller_metrics.HEALTH_CHECK_LATENCY_MS.bind(tags)

        def on_checked(duration_ms: float, failed: bool) -> None:
            latency_ms.observe(duration_ms)
            if failed:
                replica.health_check_failures += 1
                self._events.metrics_changed()

        handles.health = self._tasks.spawn(
            monitor_health(
                handles.control,
                period_s=float(state.config.get("health_check_period_s", 10.0)),
                timeout_s=float(state.config.get("health_check_timeout_s", 30.0)),
                on_unhealthy=lambda error: self._events.replica_unhealthy(state, replica, error),
                name=f"replica {replica.replica_id} (pid {meta.get('pid', replica.pid)})",
                on_checked=on_checked,
            ),
            name=f"health {replica.replica_id}",
        )
        handles.stats = self._tasks.spawn(
            monitor_routing_stats(
                handles.control,
                period_s=lambda: float(_router_config(state).get("request_routing_stats_period_s", 10.0)),
                timeout_s=lambda: float(_router_config(state).get("request_routing_stats_timeout_s", 30.0)),
                on_stats=lambda enc, data: self._events.routing_stats(replica, (enc, data)),
                name=replica.replica_id,
            ),
            name=f"routing stats {replica.replica_id}",
        )
        return True

    def control(self, replica: Replica) -> ReplicaControl | None:
        handles = self._handles.get(replica.replica_id)
        return handles.control if handles is not None else None

    def stop(self, state: DeploymentState, replica: Replica, *, drain: bool, unroute: bool) -> None:
        """Stop ``replica`` (recorded STOPPING at once). ``drain``: it gets
        ``graceful_shutdown_timeout_s`` to finish what it holds; ``unroute``: first every router
        applies the replica sets without it."""
        handles = self._mark_stopping(replica)
        if handles is not None:
            grace_s = float(state.config.get("graceful_shutdown_timeout_s", 20.0)) + _DRAIN_EXTRA_S if drain else _STARTING_STOP_GRACE_S
            self._tasks.spawn(self._stop(handles.process, grace_s, unroute), name=f"stop {replica.replica_id}")

    def kill(self, replica: Replica) -> None:
        """SIGKILL ``replica`` at once (recorded STOPPING): it failed its health checks, so it
        cannot be trusted to drain; the calls it holds fail as its connections drop."""
        handles = self._mark_stopping(replica)
        if handles is not None:
            handles.process.kill()

    def _mark_stopping(self, replica: Replica) -> _Handles | None:
        """Record ``replica`` STOPPING and detach its health check and control connection; its
        handles, or None if it was already stopping or has no process."""
        if replica.state == ReplicaState.STOPPING:
            return None
        replica.state = ReplicaState.STOPPING
        replica.stop_requested_at = time.monotonic()
        handles = self._handles.get(replica.replica_id)
        if handles is not None:
            handles.detach()
        return handles

    async def _stop(self, process: WorkerProcess, grace_s: float, unroute: bool) -> None:
        if unroute:
            await self._unroute(_UNROUTE_TIMEOUT_S)
        await process.stop(grace_s)

    async def wait_exited(self) -> None:
        """Wait until every replica process has exited (each is being stopped)."""
        await asyncio.gather(*(h.process.exited.wait() for h in list(self._handles.values())))
        await self.templates.close()

    def update_replica(self, state: DeploymentState, replica: Replica, world_size: int, rank: int | None) -> None:
        """Tell running ``replica`` the deployment's ``world_size`` and, unless None, its new
        ``rank`` (recorded at once: the plan does not ask again). A new rank reaches the user's
        ``reconfigure`` if it takes a ``rank`` argument, as in Ray."""
        replica.world_size = world_size
        update: dict[str, Any] = {"world_size": world_size}
        if rank is not None:
            replica.rank = rank
            update.update(rank=rank, user_config=state.config.get("user_config"))
        control = self.control(replica)
        if control is not None:
            timeout_s = float(state.config.get("health_check_timeout_s", 30.0))
            self._tasks.spawn(self._update(control, replica, update, timeout_s), name=f"update {replica.replica_id}")

    async def _update(self, control: ReplicaControl, replica: Replica, update: dict[str, Any], timeout_s: float) -> None:
        try:
            await control.call(RECONFIGURE_METHOD, update, timeout_s=timeout_s)
        except Exception as exc:  # the replica keeps serving; a dead one is replaced anyway
            logger.warning("telling replica %s its rank/world size %s failed: %s", replica.replica_id, update, exc)

    def reconfigure(self, state: DeploymentState, update: dict[str, Any], previous: dict[str, Any]) -> None:
        """Apply ``update`` to the running replicas in place (same pids). If a replica's
        ``reconfigure`` raises, every replica goes back to ``previous`` and the deployment
        reports DEPLOY_FAILED with the error, still serving with the old config. Counted in
        ``state.reconfiguring`` from now until done, so the status cannot turn HEALTHY first."""
        state.reconfiguring += 1
        self._tasks.spawn(self._reconfigure(state, update, previous), name=f"reconfigure {state.key}")

    async def _reconfigure(self, state: DeploymentState, update: dict[str, Any], previous: dict[str, Any]) -> None:
        try:
            controls = [c for c in map(self.control, state.running(state.version)) if c is not None]
            timeout_s = float(state.config.get("health_check_timeout_s", 30.0))
            latency_ms = controller_metrics.REPLICA_RECONFIGURE_LATENCY_MS.bind(controller_metrics.deployment_tags(state))

            async def timed(control: ReplicaControl) -> Any:
                started = time.monotonic()
                result = await control.call(RECONFIGURE_METHOD, update, timeout_s=timeout_s)
                latency_ms.observe((time.monotonic() - started) * 1000)  # completed reconfigures only, as Ray's
                return result

            results = await asyncio.gather(*(timed(c) for c in controls), return_exceptions=True)
            errors = [e for e in results if isinstance(e, BaseException)]
            if errors:
                state.config = {**state.config, **previous}
                await asyncio.gather(
                    *(c.call(RECONFIGURE_METHOD, previous, timeout_s=timeout_s) for c in controls),
                    return_exceptions=True,
                )
                observe.reconfigure_failed(state, errors[0])
        finally:
            state.reconfiguring -= 1
            self._events.reconcile()

"""The controller's records: replicas, deployments and applications, and the version that says
when a deployment's replicas must be replaced.

Plain data with small derived views, and no processes: what was asked of a deployment (its
definition, config, version, target count, whether it is being deleted) beside what has been
observed of it (its replicas, failed starts, restarts, backoff, status). ``reconcile.plan``
decides from them; ``observe`` records events into them; the executor owns the processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.controller.autoscale import Autoscaler
from shoal.runtime import wire
from shoal.serve.schema import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaState,
)

RESTART_BACKOFF_INITIAL_S = 0.1
CRASH_LOOP_THRESHOLD = 3  # running replicas that crashed in a row (each soon after it started)


@dataclass(eq=False)
class Replica:
    """One replica as observed: its process and connections live in the executor."""

    replica_id: str
    incarnation: int
    version: str
    endpoint: str
    started_at: float  # monotonic seconds
    state: ReplicaState = ReplicaState.STARTING
    pid: int | None = None
    error: str = ""  # the constructor's traceback (its last words), or why it was refused
    unhealthy: bool = False  # failed its health checks: to be replaced
    rank: int | None = None  # held from its start until its process exited (``ranks``)
    world_size: int = 0  # the deployment's target count, as this replica was last told it
    gpus: tuple[str, ...] = ()  # the devices it holds (its CUDA_VISIBLE_DEVICES)
    stop_requested_at: float | None = None  # monotonic seconds: asked to stop, or killed
    health_check_failures: int = 0  # checks that raised or timed out (a metric)
    start_method: str = ""  # "fork" (from the deployment's warm template) or "spawn"
    ready_at: float | None = None  # monotonic seconds: said READY


@dataclass(eq=False)
class DeploymentState:
    # what was asked
    app: str
    name: str
    definition: bytes
    config: dict[str, Any]
    version: str
    sys_path: list[str]
    target: int = 1
    deleting: bool = False
    autoscaler: Autoscaler | None = None
    # what was observed
    replicas: dict[str, Replica] = field(default_factory=dict)
    failed_starts: int = 0
    restarts: int = 0
    crashes_in_a_row: int = 0  # running replicas that crashed, none having run long in between
    last_crash_at: float = 0.0  # monotonic seconds
    last_error: str = ""
    status: DeploymentStatus = DeploymentStatus.UPDATING
    trigger: DeploymentStatusTrigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
    message: str = ""
    reconfiguring: int = 0  # in-place config updates in flight
    next_start_at: float = 0.0  # monotonic seconds: no replica starts before (backoff)
    backoff_s: float = RESTART_BACKOFF_INITIAL_S
    resources_wanted: str = ""  # why the last start could not get its GPUs ("" once one could)

    @property
    def key(self) -> str:
        return wire.deployment_key(self.app, self.name)

    def live(self, version: str | None = None) -> list[Replica]:
        return [
            r for r in self.replicas.values()
            if r.state in (ReplicaState.STARTING, ReplicaState.RUNNING)
            and (version is None or r.version == version)
        ]

    def running(self, version: str | None = None) -> list[Replica]:
        return [r for r in self.live(version) if r.state == ReplicaState.RUNNING]

    @property
    def num_gpus(self) -> float:
        return float((self.config.get("ray_actor_options") or {}).get("num_gpus") or 0)

    @property
    def crash_looping(self) -> bool:
        return self.crashes_in_a_row >= CRASH_LOOP_THRESHOLD

    @property
    def failure_budget(self) -> int:
        return min(int(self.config.get("max_constructor_retry_count", 20)), 3 * max(1, self.target))


@dataclass(eq=False)
class AppState:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, DeploymentState]
    status: ApplicationStatus = ApplicationStatus.DEPLOYING
    message: str = ""
    deployed_at: float = field(default_factory=time.time)
    deleting: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    config_source: dict[str, Any] | None = None  # the config-file entry it was deployed from


def definition_version(definition: bytes, config: dict[str, Any], code_hash: str) -> str:
    """Replicas are replaced when this changes: the code and the options that need a restart."""
    h = hashlib.sha256(definition)
    h.update(code_hash.encode())
    h.update(repr(sorted((config.get("ray_actor_options") or {}).items())).encode())
    return h.hexdigest()[:16]


def initial_target(config: dict[str, Any]) -> int:
    autoscaling = config.get("autoscaling_config")
    if config.get("num_replicas") is not None:
        return int(config["num_replicas"])
    if autoscaling:
        initial = autoscaling.get("initial_replicas")
        return int(initial if initial is not None else autoscaling.get("min_replicas", 1))
    return 1

"""Reconciliation, as a pure function: what to do next for one deployment.

``plan(target, observed, now)`` returns the actions that move a deployment's replicas toward
what was asked, and its status transition. It starts no process, awaits nothing and reads no
clock: ``now`` (monotonic seconds) is an argument, so tests drive it with a fake clock. The
executor carries the actions out; what happens to the replicas afterwards (READY, exits,
health failures) comes back as observations (``controller.observe``) before the next plan.

The rules (Ray Serve's):

- A deployment being deleted stops every live replica.
- A replica that failed its health checks is killed at once (``KillReplica``: it cannot be
  trusted to drain, and what it holds fails now instead of after the graceful timeout), and a
  replacement starts.
- Missing replicas of the current version start at once, unless a start is backed off
  (``observed.next_start_at``: then ``WakeAt``) or the deployment is DEPLOY_FAILED.
- Extra replicas of the current version stop, the newest STARTING ones first.
- A new version rolls out ``rolling_update_percentage`` of the target at a time: that many new
  replicas start, and an old one stops only once a new one runs, so the number of running
  replicas never drops below the target. If the new version fails to start (DEPLOY_FAILED),
  the old replicas keep serving.
- Status: UPDATING (or UPSCALING/DOWNSCALING) until the target number of replicas of the
  current version run and no old one is left, then HEALTHY with the trigger that completed.
  DEPLOY_FAILED stays until the next deploy; nothing changes while a reconfigure is in flight.
  UNHEALTHY (a replica crashed or failed its health checks) turns HEALTHY once the target
  runs again, except that a crash-looping deployment stays UNHEALTHY until
  ``observed.crash_loop_until`` (then ``WakeAt``).
- Ranks (``controller.ranks``): a starting replica takes the smallest rank no replica holds
  (a stopping one holds its rank until it exited); once the deployment is HEALTHY with every
  replica running, gaps are closed with the fewest changes. A running replica whose rank
  changes, or that was told another ``world_size`` than the target count, gets
  ``UpdateReplica``.
- A rolling update whose new replicas wait for GPUs the old ones hold stops one old running
  replica at a time (when none is stopping), so the update cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal.controller import ranks
from shoal.controller.observe import BACKOFF_RESET_AFTER_S
from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, DeploymentStatusTrigger, ReplicaState

_LIVE = (ReplicaState.STARTING, ReplicaState.RUNNING)


@dataclass(frozen=True, slots=True)
class Target:
    """What was asked of one deployment."""

    version: str
    replicas: int
    rolling_update_percentage: float = 0.2
    deleting: bool = False
    stopping: bool = False  # the instance shuts down: nothing new starts


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What was observed of one replica."""

    replica_id: str
    version: str
    state: ReplicaState
    started_at: float
    unhealthy: bool = False
    rank: int | None = None
    world_size: int = 0


@dataclass(frozen=True, slots=True)
class Observed:
    """What was observed of one deployment (its replicas in start order)."""

    replicas: tuple[ReplicaView, ...]
    status: DeploymentStatus = DeploymentStatus.UPDATING
    trigger: DeploymentStatusTrigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
    message: str = ""
    next_start_at: float = 0.0
    reconfiguring: bool = False
    crash_loop_until: float = 0.0  # monotonic seconds: UNHEALTHY at least until then
    waiting_for_resources: bool = False  # the last start could not get its GPUs


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Start one replica of the current version, with rank ``rank``."""

    rank: int


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Stop a replica; ``drain``: it was running, so routers stop using it and it finishes what
    it holds within ``graceful_shutdown_timeout_s``; else it is only starting and stops at once."""

    replica_id: str
    drain: bool


@dataclass(frozen=True, slots=True)
class KillReplica:
    """Kill a replica at once (SIGKILL): it failed its health checks."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class UpdateReplica:
    """Tell a running replica the deployment's ``world_size`` and, unless None, its new
    ``rank`` (through its reconfigure path)."""

    replica_id: str
    world_size: int
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Plan again at ``at_s`` (monotonic seconds): a start is backed off until then."""

    at_s: float


@dataclass(frozen=True, slots=True)
class SetStatus:
    """The deployment's status changes; ``message`` None keeps the current message."""

    status: DeploymentStatus
    trigger: DeploymentStatusTrigger
    message: str | None


Action = StartReplica | StopReplica | KillReplica | UpdateReplica | WakeAt | SetStatus


def plan(target: Target, observed: Observed, now: float) -> list[Action]:
    """The actions for one deployment at time ``now`` (see the module docstring)."""
    live = [r for r in observed.replicas if r.state in _LIVE]
    if target.deleting:
        return [_stop(r) for r in live]
    actions: list[Action] = []
    stopped: set[str] = set()

    def stop(replica: ReplicaView) -> None:
        stopped.add(replica.replica_id)
        actions.append(_stop(replica))

    for replica in live:
        if replica.unhealthy:
            stopped.add(replica.replica_id)
            actions.append(KillReplica(replica.replica_id))
    current = [r for r in live if r.version == target.version and r.replica_id not in stopped]
    old = [r for r in live if r.version != target.version and r.replica_id not in stopped]
    failed = observed.status == DeploymentStatus.DEPLOY_FAILED

    missing = target.replicas - len(current)
    if old:  # rolling update: a batch of new replicas starting at a time
        batch = max(1, int(target.rolling_update_percentage * target.replicas))
        missing = min(missing, batch - sum(r.state == ReplicaState.STARTING for r in current))
    if missing > 0 and not failed and not target.stopping:
        if now >= observed.next_start_at:
            held = (r.rank for r in observed.replicas if r.rank is not None)
            actions.extend(StartReplica(rank) for rank in ranks.next_ranks(held, missing))
        else:
            actions.append(WakeAt(observed.next_start_at))

    extra = len(current) - target.replicas
    if extra > 0:
        newest_starting_first = sorted(current, key=lambda r: (r.state == ReplicaState.RUNNING, -r.started_at))
        for replica in newest_starting_first[:extra]:
            stop(replica)

    if old and not failed:  # starting old ones stop at once; running ones as new ones run
        running_current = sum(r.state == ReplicaState.RUNNING and r.replica_id not in stopped for r in current)
        spare = running_current + sum(r.state == ReplicaState.RUNNING for r in old) - target.replicas
        if (
            spare <= 0 and observed.waiting_for_resources
            and not any(r.state == ReplicaState.STOPPING for r in observed.replicas)
        ):
            spare = 1  # the new replicas wait for what old ones hold: make room, one at a time
        for replica in sorted(old, key=lambda r: r.state == ReplicaState.RUNNING):
            if replica.state == ReplicaState.STARTING:
                stop(replica)
            elif spare > 0:
                stop(replica)
                spare -= 1

    remaining = [r for r in live if r.replica_id not in stopped]
    transition = deployment_status(target, observed, remaining, now)
    if transition is not None:
        actions.append(transition)
    if not target.stopping:
        status = transition.status if transition is not None else observed.status
        actions.extend(_rank_updates(target, observed, remaining, settled=status == DeploymentStatus.HEALTHY and not stopped))
    if observed.status == DeploymentStatus.UNHEALTHY and now < observed.crash_loop_until:
        waking = [a for a in actions if isinstance(a, WakeAt)]  # one WakeAt: the earliest
        if not waking:
            actions.append(WakeAt(observed.crash_loop_until))
    return actions


def _rank_updates(
    target: Target, observed: Observed, remaining: Sequence[ReplicaView], *, settled: bool
) -> list[UpdateReplica]:
    """``UpdateReplica`` for the running replicas whose rank or world size changes; ranks are
    compacted only once ``settled`` (HEALTHY, nothing stopped now) and every replica runs."""
    changes: dict[str, int] = {}
    everyone_runs = all(r.state == ReplicaState.RUNNING for r in observed.replicas)
    if settled and everyone_runs and all(r.rank is not None for r in observed.replicas):
        changes = ranks.compact({r.replica_id: r.rank for r in observed.replicas if r.rank is not None})
    updates = []
    for replica in remaining:
        if replica.state != ReplicaState.RUNNING:
            continue
        rank = changes.get(replica.replica_id)
        if rank is not None or replica.world_size != target.replicas:
            updates.append(UpdateReplica(replica.replica_id, target.replicas, rank))
    return updates


def _stop(replica: ReplicaView) -> StopReplica:
    return StopReplica(replica.replica_id, drain=replica.state == ReplicaState.RUNNING)


_COMPLETED = {
    DeploymentStatus.UPSCALING: DeploymentStatusTrigger.UPSCALE_COMPLETED,
    DeploymentStatus.DOWNSCALING: DeploymentStatusTrigger.DOWNSCALE_COMPLETED,
}


def deployment_status(
    target: Target, observed: Observed, live: Sequence[ReplicaView], now: float
) -> SetStatus | None:
    """The status transition once ``live`` are the live replicas, or None if none."""
    if observed.status == DeploymentStatus.DEPLOY_FAILED or observed.reconfiguring:
        return None
    if observed.status == DeploymentStatus.UNHEALTHY and now < observed.crash_loop_until:
        return None
    running = sum(r.state == ReplicaState.RUNNING and r.version == target.version for r in live)
    has_old = any(r.version != target.version for r in live)
    if running >= target.replicas and not has_old:
        if observed.status == DeploymentStatus.HEALTHY:
            trigger = observed.trigger
        else:
            trigger = _COMPLETED.get(observed.status, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED)
        transition = SetStatus(DeploymentStatus.HEALTHY, trigger, "")
    elif observed.status == DeploymentStatus.HEALTHY:
        scaling = DeploymentStatus.UPSCALING if running < target.replicas else DeploymentStatus.DOWNSCALING
        transition = SetStatus(scaling, observed.trigger, None)
    else:
        return None
    if (transition.status, transition.trigger, transition.message) == (observed.status, observed.trigger, observed.message):
        return None
    return transition


def app_status(app: AppState) -> tuple[ApplicationStatus, str]:
    """The application's status and message, from its deployments' (Ray's rules)."""
    if app.deleting:
        return ApplicationStatus.DELETING, app.message
    states = [s for s in app.deployments.values() if not s.deleting]
    failed = [s for s in states if s.status == DeploymentStatus.DEPLOY_FAILED]
    if failed:
        return ApplicationStatus.DEPLOY_FAILED, "\n".join(f"Deployment '{s.name}': {s.message}" for s in failed)
    if all(s.status == DeploymentStatus.HEALTHY for s in states):
        return ApplicationStatus.RUNNING, ""
    if app.status == ApplicationStatus.RUNNING and any(s.status == DeploymentStatus.UNHEALTHY for s in states):
        return ApplicationStatus.UNHEALTHY, app.message
    if app.status != ApplicationStatus.RUNNING:
        return ApplicationStatus.DEPLOYING, app.message
    return app.status, app.message


def target_of(state: DeploymentState, *, stopping: bool) -> Target:
    return Target(
        version=state.version,
        replicas=state.target,
        rolling_update_percentage=float(state.config.get("rolling_update_percentage", 0.2)),
        deleting=state.deleting,
        stopping=stopping,
    )


def observed_of(state: DeploymentState) -> Observed:
    return Observed(
        replicas=tuple(_view(r) for r in state.replicas.values()),
        status=state.status,
        trigger=state.trigger,
        message=state.message,
        next_start_at=state.next_start_at,
        reconfiguring=state.reconfiguring > 0,
        crash_loop_until=state.last_crash_at + BACKOFF_RESET_AFTER_S if state.crash_looping else 0.0,
        waiting_for_resources=bool(state.resources_wanted),
    )


def _view(replica: Replica) -> ReplicaView:
    return ReplicaView(
        replica.replica_id, replica.version, replica.state, replica.started_at, replica.unhealthy,
        replica.rank, replica.world_size,
    )

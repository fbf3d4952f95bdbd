"""shoal.controller.reconcile.plan and shoal.controller.observe, on fake records and a fake
clock: no process is started. ``Deployment`` below plays the executor: it carries the actions
out on the records, and the tests report what the replicas do (READY, exit, health failure)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.controller import observe
from shoal.controller.reconcile import (
    Action,
    KillReplica,
    SetStatus,
    StartReplica,
    StopReplica,
    UpdateReplica,
    WakeAt,
    app_status,
    observed_of,
    plan,
    target_of,
)
from shoal.controller.snapshot import unavailable_reason
from shoal.controller.state import CRASH_LOOP_THRESHOLD, AppState, DeploymentState, Replica
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, DeploymentStatusTrigger, ReplicaState


class Deployment:
    """One deployment's records, a fake clock, and an executor that only edits the records."""

    def __init__(self, target: int = 1, version: str = "v1", **config: Any) -> None:
        self.state = DeploymentState("app", "d", b"", {"max_ongoing_requests": 5, **config}, version, [], target=target)
        self.now = 0.0
        self.wake_at: float | None = None
        self.stopping = False
        self._ids = 0

    def plan(self) -> list[Action]:
        actions = plan(target_of(self.state, stopping=self.stopping), observed_of(self.state), self.now)
        self.wake_at = None
        for action in actions:
            if isinstance(action, StartReplica):
                self._ids += 1
                rid = f"r{self._ids}"
                self.state.replicas[rid] = Replica(
                    rid, self._ids, self.state.version, "", started_at=self.now,
                    rank=action.rank, world_size=self.state.target,
                )
            elif isinstance(action, (StopReplica, KillReplica)):
                self.state.replicas[action.replica_id].state = ReplicaState.STOPPING
            elif isinstance(action, UpdateReplica):
                replica = self.state.replicas[action.replica_id]
                replica.world_size = action.world_size
                if action.rank is not None:
                    replica.rank = action.rank
            elif isinstance(action, WakeAt):
                self.wake_at = action.at_s
            elif isinstance(action, SetStatus):
                self.state.status, self.state.trigger = action.status, action.trigger
                if action.message is not None:
                    self.state.message = action.message
        return actions

    def by_state(self, state: ReplicaState, version: str | None = None) -> list[str]:
        return [r.replica_id for r in self.state.replicas.values()
                if r.state == state and (version is None or r.version == version)]

    def ready(self, *replica_ids: str) -> list[Action]:
        for rid in replica_ids:
            assert observe.replica_ready(self.state.replicas[rid], pid=1000)
        return self.plan()

    def exit(self, replica_id: str, code: int = 1, error: str = "") -> list[Action]:
        replica = self.state.replicas[replica_id]
        replica.error = error
        observe.replica_exited(self.state, replica, code, self.now, stopping=self.stopping)
        return self.plan()

    def advance_to_wake(self) -> list[Action]:
        assert self.wake_at is not None
        self.now = self.wake_at
        return self.plan()


def starts(actions: list[Action]) -> int:
    return sum(isinstance(a, StartReplica) for a in actions)


def stops(actions: list[Action]) -> list[StopReplica]:
    return [a for a in actions if isinstance(a, StopReplica)]


def running_deployment(target: int, **config: Any) -> Deployment:
    d = Deployment(target, **config)
    assert starts(d.plan()) == target
    d.ready(*d.by_state(ReplicaState.STARTING))
    assert d.state.status == DeploymentStatus.HEALTHY
    return d


def test_first_deploy_starts_the_target_then_turns_healthy() -> None:
    d = Deployment(target=2)
    assert starts(d.plan()) == 2
    assert d.state.status == DeploymentStatus.UPDATING
    d.ready("r1")
    assert d.state.status == DeploymentStatus.UPDATING
    d.ready("r2")
    assert (d.state.status, d.state.trigger) == (DeploymentStatus.HEALTHY, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED)
    assert d.plan() == []  # nothing left to do, and planning again changes nothing


def test_crash_loop_backs_off_exponentially_up_to_the_maximum() -> None:
    d = running_deployment(1)
    delays = []
    for _ in range(9):
        rid = d.by_state(ReplicaState.RUNNING)[0]
        actions = d.exit(rid, code=-9)
        assert starts(actions) == 0 and d.wake_at is not None  # not at once: backed off
        delays.append(round(d.wake_at - d.now, 3))
        assert starts(d.advance_to_wake()) == 1
        d.ready(d.by_state(ReplicaState.STARTING)[0])
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert d.state.restarts == 9
    assert "died unexpectedly (killed by SIGKILL)" in d.state.last_error


def test_a_crash_turns_the_deployment_unhealthy_until_the_replacement_runs() -> None:
    d = running_deployment(2)
    d.exit("r1", code=3)
    assert (d.state.status, d.state.trigger) == (DeploymentStatus.UNHEALTHY, DeploymentStatusTrigger.HEALTH_CHECK_FAILED)
    assert "died unexpectedly (exit code 3)" in d.state.message
    assert unavailable_reason(d.state) is None  # r2 still runs
    assert starts(d.advance_to_wake()) == 1
    d.ready("r3")
    assert d.state.status == DeploymentStatus.HEALTHY
    assert d.state.crashes_in_a_row == 1


def test_a_crash_loop_stays_unhealthy_and_fails_requests_while_no_replica_runs() -> None:
    d = running_deployment(1)
    for _ in range(CRASH_LOOP_THRESHOLD):
        d.now += 1.0
        d.exit(d.by_state(ReplicaState.RUNNING)[0], code=3)
        assert d.state.status == DeploymentStatus.UNHEALTHY
        reason = unavailable_reason(d.state)
        d.advance_to_wake()
        d.ready(d.by_state(ReplicaState.STARTING)[0])
    assert d.state.crash_looping
    assert reason is not None and "keep crashing (3 in a row" in reason and "exit code 3" in reason
    assert "3 replicas crashed in a row" in d.state.message
    # A replica runs: requests route to it, but the status stays UNHEALTHY until the crash loop
    # has been over for a while; then the deployment turns HEALTHY on its own (a timer).
    assert unavailable_reason(d.state) is None
    assert d.state.status == DeploymentStatus.UNHEALTHY
    assert d.wake_at == pytest.approx(d.state.last_crash_at + observe.BACKOFF_RESET_AFTER_S)
    d.advance_to_wake()
    assert d.state.status == DeploymentStatus.HEALTHY

def test_backoff_starts_over_after_a_replica_ran_for_a_while() -> None:
    d = running_deployment(1)
    for _ in range(4):
        d.exit(d.by_state(ReplicaState.RUNNING)[0])
        d.advance_to_wake()
        d.ready(d.by_state(ReplicaState.STARTING)[0])
    d.now += observe.BACKOFF_RESET_AFTER_S + 1
    d.exit(d.by_state(ReplicaState.RUNNING)[0])
    assert d.wake_at == pytest.approx(d.now + 0.1)


def test_constructor_retry_limit_turns_the_deployment_deploy_failed() -> None:
    d = Deployment(target=1, max_constructor_retry_count=3)
    d.plan()
    for attempt in range(1, 4):
        starting = d.by_state(ReplicaState.STARTING)
        assert len(starting) == 1
        d.exit(starting[0], error=f"Traceback ...\nValueError: bad constructor {attempt}\n")
        assert d.state.failed_starts == attempt
        if attempt < 3:
            assert d.state.status == DeploymentStatus.UPDATING
            assert starts(d.advance_to_wake()) == 1
    assert (d.state.status, d.state.trigger) == (DeploymentStatus.DEPLOY_FAILED, DeploymentStatusTrigger.REPLICA_STARTUP_FAILED)
    assert "failed to start 3 times in a row" in d.state.message
    assert "bad constructor 3" in d.state.message  # the constructor's own error
    assert d.plan() == [] and d.wake_at is None  # no more starts
    app = AppState("app", "/", "d", {"d": d.state})
    assert app_status(app) == (ApplicationStatus.DEPLOY_FAILED, f"Deployment 'd': {d.state.message}")


def test_a_start_without_last_words_names_the_exit_code() -> None:
    d = Deployment(target=1)
    d.plan()
    d.exit("r1", code=3)
    assert d.state.last_error == "the replica process exited with code 3 before it was ready"


def test_rolling_update_replaces_a_percentage_at_a_time_and_never_drops_below_target() -> None:
    d = running_deployment(10, rolling_update_percentage=0.2)
    d.state.version = "v2"
    d.state.status = DeploymentStatus.UPDATING
    actions = d.plan()
    assert starts(actions) == 2 and stops(actions) == []
    most_starting = 0
    while d.by_state(ReplicaState.STARTING):
        most_starting = max(most_starting, len(d.by_state(ReplicaState.STARTING)))
        d.ready(d.by_state(ReplicaState.STARTING)[0])
        assert len(d.by_state(ReplicaState.RUNNING)) >= 10
    assert most_starting == 2
    assert len(d.by_state(ReplicaState.RUNNING, "v2")) == 10
    assert d.by_state(ReplicaState.RUNNING, "v1") == []
    assert len(d.by_state(ReplicaState.STOPPING, "v1")) == 10
    assert d.state.status == DeploymentStatus.HEALTHY


def test_a_failing_new_version_leaves_the_old_replicas_serving() -> None:
    d = running_deployment(2, max_constructor_retry_count=2)
    old = d.by_state(ReplicaState.RUNNING)
    d.state.version = "v2"
    d.state.status = DeploymentStatus.UPDATING
    d.plan()
    for _ in range(2):
        d.exit(d.by_state(ReplicaState.STARTING, "v2")[0], error="ValueError: v2 is broken")
        if d.state.status != DeploymentStatus.DEPLOY_FAILED:
            d.advance_to_wake()
    assert d.state.status == DeploymentStatus.DEPLOY_FAILED
    assert d.by_state(ReplicaState.RUNNING) == old  # never stopped
    assert d.plan() == []


def test_scale_up_then_down_then_to_zero() -> None:
    d = running_deployment(1)
    d.now = 1.0
    d.state.target, d.state.status = 3, DeploymentStatus.UPSCALING
    assert starts(d.plan()) == 2
    d.ready("r2", "r3")
    assert (d.state.status, d.state.trigger) == (DeploymentStatus.HEALTHY, DeploymentStatusTrigger.UPSCALE_COMPLETED)

    d.state.target, d.state.status = 4, DeploymentStatus.UPSCALING
    d.plan()  # r4 starts
    d.state.target, d.state.status = 2, DeploymentStatus.DOWNSCALING
    stopped = stops(d.plan())
    # The newest starting replica goes first, then a newest running one (not r1, the oldest).
    assert [(s.replica_id, s.drain) for s in stopped] in ([("r4", False), ("r2", True)], [("r4", False), ("r3", True)])
    assert (d.state.status, d.state.trigger) == (DeploymentStatus.HEALTHY, DeploymentStatusTrigger.DOWNSCALE_COMPLETED)

    d.state.target, d.state.status = 0, DeploymentStatus.DOWNSCALING
    survivors = set(d.by_state(ReplicaState.RUNNING))
    assert {s.replica_id for s in stops(d.plan())} == survivors
    assert d.state.status == DeploymentStatus.HEALTHY
    assert d.by_state(ReplicaState.RUNNING) == []


def test_a_healthy_deployment_below_target_reports_upscaling() -> None:
    d = running_deployment(1)
    d.state.target = 2
    d.plan()
    assert d.state.status == DeploymentStatus.UPSCALING


def test_an_unhealthy_replica_is_killed_at_once_and_replaced() -> None:
    d = running_deployment(2)
    assert observe.replica_unhealthy(d.state, d.state.replicas["r1"], "check_health raised: down")
    assert d.state.status == DeploymentStatus.UNHEALTHY
    actions = d.plan()
    assert [a for a in actions if isinstance(a, KillReplica)] == [KillReplica("r1")]
    assert stops(actions) == []
    assert starts(actions) == 1
    assert d.state.status == DeploymentStatus.UNHEALTHY  # until the replacement runs
    d.ready("r3")
    assert d.state.status == DeploymentStatus.HEALTHY
    assert d.state.restarts == 1
    assert not observe.replica_unhealthy(d.state, d.state.replicas["r1"], "again")  # stopping already


def test_shutdown_drains_running_replicas_and_starts_nothing() -> None:
    d = running_deployment(2)
    d.state.target = 3
    d.plan()  # r3 starting
    d.stopping = True
    d.state.deleting, d.state.target = True, 0
    assert sorted(stops(d.plan()), key=lambda s: s.replica_id) == [
        StopReplica("r1", drain=True), StopReplica("r2", drain=True), StopReplica("r3", drain=False),
    ]
    before = d.state.restarts
    d.exit("r1", code=0)
    assert d.state.restarts == before and d.wake_at is None  # an exit while stopping is no crash


def test_nothing_starts_while_the_instance_stops() -> None:
    d = running_deployment(1)
    d.stopping = True
    actions = d.exit("r1", code=-9)
    assert starts(actions) == 0 and d.wake_at is None


def test_app_status_follows_its_deployments() -> None:
    d = Deployment(target=1)
    app = AppState("app", "/", "d", {"d": d.state})
    assert app_status(app)[0] == ApplicationStatus.DEPLOYING
    d.plan()
    d.ready("r1")
    assert app_status(app) == (ApplicationStatus.RUNNING, "")
    app.status = ApplicationStatus.RUNNING
    observe.replica_unhealthy(d.state, d.state.replicas["r1"], "down")
    assert app_status(app)[0] == ApplicationStatus.UNHEALTHY
    app.deleting = True
    assert app_status(app)[0] == ApplicationStatus.DELETING


# -- ranks and world size ----------------------------------------------------------------------


def ranks_of(d: Deployment) -> dict[str, int | None]:
    return {rid: r.rank for rid, r in d.state.replicas.items()}


def updates(actions: list[Action]) -> list[UpdateReplica]:
    return [a for a in actions if isinstance(a, UpdateReplica)]


def test_replicas_start_with_contiguous_ranks() -> None:
    d = Deployment(target=3)
    assert [a.rank for a in d.plan() if isinstance(a, StartReplica)] == [0, 1, 2]
    d.ready("r1", "r2", "r3")
    assert ranks_of(d) == {"r1": 0, "r2": 1, "r3": 2}
    assert d.plan() == []  # each was told the world size (3) in its spec


def test_a_replacement_takes_the_rank_of_the_replica_that_died_and_the_others_keep_theirs() -> None:
    d = running_deployment(4)
    d.now = 100.0
    d.exit("r2")
    d.advance_to_wake()
    assert ranks_of(d) == {"r1": 0, "r3": 2, "r4": 3, "r5": 1}


def test_a_stopping_replica_keeps_its_rank_until_it_exited_then_ranks_are_compacted() -> None:
    d = running_deployment(3)  # r1:0 r2:1 r3:2
    d.state.target, d.state.status = 2, DeploymentStatus.DOWNSCALING
    [stopped] = stops(d.plan())
    held = ranks_of(d)[stopped.replica_id]
    survivors = sorted(set(ranks_of(d)) - {stopped.replica_id})
    # Scale back up while it drains: the new replica cannot take the rank it still holds.
    d.state.target, d.state.status = 3, DeploymentStatus.UPSCALING
    [start] = [a for a in d.plan() if isinstance(a, StartReplica)]
    assert start.rank == 3 and held in (0, 1, 2)
    d.ready("r4")
    d.state.target, d.state.status = 2, DeploymentStatus.DOWNSCALING
    d.plan()
    for rid in d.by_state(ReplicaState.STOPPING):
        d.exit(rid, code=0)
    running = d.by_state(ReplicaState.RUNNING)
    assert d.state.status == DeploymentStatus.HEALTHY and len(running) == 2
    assert sorted(ranks_of(d).values()) == [0, 1]  # contiguous again
    kept = [rid for rid in survivors if rid in running and ranks_of(d)[rid] in (0, 1)]
    assert kept, "a survivor whose rank was already in range keeps it"


def test_compaction_moves_only_the_replicas_outside_the_range_and_tells_them() -> None:
    d = running_deployment(3)  # r1:0 r2:1 r3:2
    d.state.target, d.state.status = 2, DeploymentStatus.DOWNSCALING
    d.state.replicas["r2"].state = ReplicaState.STOPPING  # r2 (rank 1) goes, not the newest
    d.exit("r2", code=0)
    actions = d.plan()
    assert updates(actions) == []  # already told: one UpdateReplica each, once
    assert ranks_of(d) == {"r1": 0, "r3": 1}


def test_no_compaction_while_a_replica_is_starting() -> None:
    d = running_deployment(3)
    d.state.replicas["r1"].state = ReplicaState.STOPPING
    d.exit("r1", code=0)  # rank 0 free; the replacement is starting
    assert ranks_of(d) == {"r2": 1, "r3": 2, "r4": 0}
    assert not [u for u in updates(d.plan()) if u.rank is not None]


def test_world_size_follows_the_target_count() -> None:
    d = running_deployment(2)
    d.state.target, d.state.status = 3, DeploymentStatus.UPSCALING
    actions = d.plan()
    assert sorted((u.replica_id, u.world_size, u.rank) for u in updates(actions)) == [("r1", 3, None), ("r2", 3, None)]
    assert starts(actions) == 1
    assert d.state.replicas["r3"].world_size == 3
    d.ready("r3")
    assert updates(d.plan()) == []


def test_a_rolling_update_waiting_for_gpus_stops_one_old_replica_at_a_time() -> None:
    d = running_deployment(2)
    d.state.version = "v2"
    d.state.resources_wanted = "Deployment d has 1 replica waiting for resources"
    # The plan still starts the first new replica; here it could not get its GPU.
    actions = d.plan()
    for rid in d.by_state(ReplicaState.STARTING):
        del d.state.replicas[rid]
    assert len(stops(actions)) == 1
    assert len(stops(d.plan())) == 0  # one is stopping: wait for it to exit

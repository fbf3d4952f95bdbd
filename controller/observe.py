"""Observations: what happened to a replica, recorded into the deployment's records.

Pure bookkeeping with the clock as an argument (no processes, no asyncio): the executor reports
an event, one of these functions records it, and ``reconcile.plan`` decides what follows.

- A replica that exits while STARTING counts as a failed start, with its last words (the
  constructor's traceback) as the error. After ``failure_budget`` failed starts in a row, with
  no replica of the version running, the deployment is DEPLOY_FAILED; before that, the next
  start backs off.
- A replica that exits while RUNNING is a restart: the next start backs off, starting over from
  the initial backoff if it had run for ``BACKOFF_RESET_AFTER_S``. The deployment turns
  UNHEALTHY with the exit code as its message (as Ray's does when a replica dies), unless it is
  being updated or failed; it is HEALTHY again once its replicas run (``reconcile``). Crashes of
  replicas that each ran less than ``BACKOFF_RESET_AFTER_S`` count in a row; from
  ``CRASH_LOOP_THRESHOLD`` on the deployment is crash-looping: it stays UNHEALTHY until
  ``BACKOFF_RESET_AFTER_S`` after the last crash, and while no replica runs, routers fail its
  requests at once (``snapshot``).
- An in-place reconfigure that raises leaves the previous config in effect, DEPLOY_FAILED.
- The backoff doubles from ``RESTART_BACKOFF_INITIAL_S`` up to ``RESTART_BACKOFF_MAX_S``.
"""

from __future__ import annotations

import logging
import signal

from shoal.controller.state import RESTART_BACKOFF_INITIAL_S, DeploymentState, Replica
from shoal.serve.schema import DeploymentStatus, DeploymentStatusTrigger, ReplicaState

logger = logging.getLogger("shoal.controller")

RESTART_BACKOFF_MAX_S = 10.0
BACKOFF_RESET_AFTER_S = 30.0  # a replica that ran this long before crashing starts its backoff over


def replica_ready(replica: Replica, pid: int | None) -> bool:
    """A STARTING replica said READY: it runs. False if it was not starting (stopping already)."""
    if replica.state != ReplicaState.STARTING:
        return False
    replica.state = ReplicaState.RUNNING
    replica.pid = pid if pid is not None else replica.pid
    return True


def replica_unhealthy(state: DeploymentState, replica: Replica, error: str) -> bool:
    """A running replica failed its health checks: it is to be replaced. False if not running."""
    if replica.state != ReplicaState.RUNNING:
        return False
    replica.unhealthy = True
    state.last_error = f"replica {replica.replica_id} (pid {replica.pid}) is unhealthy: {error}"
    state.status = DeploymentStatus.UNHEALTHY
    state.trigger = DeploymentStatusTrigger.HEALTH_CHECK_FAILED
    state.message = state.last_error
    state.restarts += 1
    logger.warning("%s; replacing it", state.last_error)
    return True


def replica_exited(state: DeploymentState, replica: Replica, code: int, now: float, *, stopping: bool) -> None:
    """The replica's process exited with ``code`` (its last words already in ``replica.error``).
    ``stopping``: the instance shuts down, so nothing counts as a failure."""
    state.replicas.pop(replica.replica_id, None)
    if state.autoscaler is not None:
        state.autoscaler.forget(replica.replica_id)
    previous = replica.state
    replica.state = ReplicaState.STOPPED
    if stopping:
        return
    if previous == ReplicaState.STARTING and not state.deleting:
        state.failed_starts += 1
        state.last_error = replica.error or f"the replica process exited with code {code} before it was ready"
        last_line = state.last_error.strip().splitlines()[-1] if state.last_error.strip() else ""
        logger.warning(
            "replica %s of deployment '%s' failed to start (%d/%d): %s",
            replica.replica_id, state.name, state.failed_starts, state.failure_budget, last_line,
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
            back_off(state, now)
    elif previous == ReplicaState.RUNNING:
        if now - replica.started_at > BACKOFF_RESET_AFTER_S:
            state.backoff_s = RESTART_BACKOFF_INITIAL_S  # it ran fine for a while: start over
            state.crashes_in_a_row = 0
        state.restarts += 1
        state.crashes_in_a_row += 1
        state.last_crash_at = now
        state.last_error = f"replica {replica.replica_id} (pid {replica.pid}) died unexpectedly ({_exit_reason(code)})"
        logger.warning("%s; replacing it", state.last_error)
        if state.status not in (DeploymentStatus.UPDATING, DeploymentStatus.DEPLOY_FAILED):
            state.status = DeploymentStatus.UNHEALTHY
            state.trigger = DeploymentStatusTrigger.HEALTH_CHECK_FAILED
            state.message = state.last_error + (
                f"; {state.crashes_in_a_row} replicas crashed in a row" if state.crash_looping else ""
            )
        back_off(state, now)


def _exit_reason(code: int) -> str:
    """``exit code 3``, or ``killed by SIGKILL`` for a negative code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def reconfigure_failed(state: DeploymentState, error: BaseException) -> None:
    """An in-place config update raised in a replica (the replicas were set back to the previous
    config): the deployment is DEPLOY_FAILED with the error."""
    state.status = DeploymentStatus.DEPLOY_FAILED
    state.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
    state.message = f"reconfigure failed; the previous config stays in effect: {error}"
    state.last_error = state.message


def back_off(state: DeploymentState, now: float) -> None:
    """No start before ``now`` plus the current backoff, which then doubles (bounded)."""
    state.next_start_at = now + state.backoff_s
    state.backoff_s = min(state.backoff_s * 2, RESTART_BACKOFF_MAX_S)

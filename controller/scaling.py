"""Autoscaling glue: feeding each autoscaler its metrics, and applying its decisions.

Every ``TICK_S`` the poller asks each running replica of every autoscaling deployment how many
requests it holds (``METRICS_METHOD``), records the answers, then lets each autoscaler decide
(``decide``); the deployments of an application with an application-level policy are decided
together, by that policy (``decide_app``). Routers report their queue lengths as they change (``record_queued``); a
deployment with no running replica and requests waiting is decided at once, so scaling up from
zero does not wait for a tick.

A redeploy may replace or clear a deployment's autoscaler while a tick awaits its replicas'
answers: the autoscaler is read again after every await, never held across one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from shoal.controller.autoscale import AppPolicy, Autoscaler
from shoal.controller.replica_control import METRICS_METHOD
from shoal.controller.state import DeploymentState, Replica
from shoal.serve.config import DeploymentID
from shoal.serve.schema import DeploymentStatus, DeploymentStatusTrigger

logger = logging.getLogger("shoal.controller")

TICK_S = 0.25
_METRICS_TIMEOUT_S = 1.0


class ReplicaCalls(Protocol):
    """What the poller needs of a replica's control connection."""

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any: ...


def decide(state: DeploymentState, now: float) -> bool:
    """One autoscaling decision for ``state`` at ``now``; True if its target changed."""
    autoscaler = state.autoscaler
    if autoscaler is None or state.status == DeploymentStatus.DEPLOY_FAILED:
        return False
    started = time.perf_counter()
    target = autoscaler.target(now, len(state.running(state.version)), state.target)
    autoscaler.last_policy_execution_ms = (time.perf_counter() - started) * 1000
    autoscaler.last_policy_scope = "deployment"
    return _set_target(state, target)


def decide_app(policy: AppPolicy, states: Iterable[DeploymentState], now: float) -> bool:
    """One decision of an application-level ``policy`` for its autoscaling deployments
    ``states``; True if a target changed."""
    members: dict[DeploymentID, tuple[Autoscaler, int, int]] = {}
    by_id: dict[DeploymentID, DeploymentState] = {}
    for state in states:
        if state.autoscaler is None or state.status == DeploymentStatus.DEPLOY_FAILED:
            continue
        dep = DeploymentID(state.name, state.app)
        members[dep] = (state.autoscaler, len(state.running(state.version)), state.target)
        by_id[dep] = state
    if not members:
        return False
    started = time.perf_counter()
    targets = policy.targets(members, now)
    elapsed_ms = (time.perf_counter() - started) * 1000  # the application's policy, as Ray's times it
    for autoscaler, _, _ in members.values():
        autoscaler.last_policy_execution_ms, autoscaler.last_policy_scope = elapsed_ms, "application"
    return any([_set_target(by_id[dep], target) for dep, target in targets.items()])


def decide_all(states: Iterable[DeploymentState], now: float) -> bool:
    """Decide for every autoscaling deployment of ``states``, by application-level policy where
    one is set; True if a target changed."""
    groups: dict[int, tuple[AppPolicy, list[DeploymentState]]] = {}
    changed = False
    for state in states:
        app_policy = state.autoscaler.app_policy if state.autoscaler is not None else None
        if app_policy is None:
            changed = decide(state, now) or changed
        else:
            groups.setdefault(id(app_policy), (app_policy, []))[1].append(state)
    for app_policy, members in groups.values():
        changed = decide_app(app_policy, members, now) or changed
    return changed


def _set_target(state: DeploymentState, target: int) -> bool:
    if target == state.target:
        return False
    logger.info("autoscaling deployment '%s' from %d to %d replicas", state.name, state.target, target)
    state.status = DeploymentStatus.UPSCALING if target > state.target else DeploymentStatus.DOWNSCALING
    state.trigger = DeploymentStatusTrigger.AUTOSCALING
    state.target = target
    return True


def record_queued(states: Iterable[DeploymentState], source: str, queued: Mapping[str, int], now: float) -> bool:
    """A router's queue lengths by deployment key; True if a target changed (scale from zero)."""
    changed = False
    for state in states:
        if state.autoscaler is None or state.key not in queued:
            continue
        state.autoscaler.observe(f"{source}/{state.key}", float(queued[state.key]), now, queued=True)
        if queued[state.key] and not state.running(state.version):
            changed = decide(state, now) or changed
    return changed


class AutoscalePoller:
    def __init__(
        self,
        deployments: Callable[[], Iterable[DeploymentState]],
        control: Callable[[Replica], ReplicaCalls | None],
        on_change: Callable[[], None],
        clock: Callable[[], float],
        after_tick: Callable[[], None] = lambda: None,
    ) -> None:
        """``deployments()``: every deployment now; ``control(replica)``: its connection, if it
        runs; ``on_change()``: some target changed; ``clock()``: monotonic seconds;
        ``after_tick()``: a tick decided (the autoscaling gauges changed)."""
        self._deployments = deployments
        self._control = control
        self._on_change = on_change
        self._clock = clock
        self._after_tick = after_tick

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self.tick()

    async def tick(self) -> None:
        """Read the metrics of every autoscaling deployment, then decide for each."""
        states = [s for s in self._deployments() if s.autoscaler is not None and not s.deleting]
        for state in states:
            await self._poll(state)
        if decide_all(states, self._clock()):
            self._on_change()
        if states:
            self._after_tick()

    async def _poll(self, state: DeploymentState) -> None:
        replicas = [(r, c) for r in state.running(state.version) if (c := self._control(r)) is not None]
        counts = await asyncio.gather(
            *(c.call(METRICS_METHOD, timeout_s=_METRICS_TIMEOUT_S) for _, c in replicas), return_exceptions=True
        )
        autoscaler = state.autoscaler  # after the await: a redeploy may have replaced or cleared it
        if autoscaler is None or state.deleting:
            return
        now = self._clock()
        for (replica, _), count in zip(replicas, counts):
            if isinstance(count, (int, float)):
                autoscaler.observe(replica.replica_id, float(count), now)

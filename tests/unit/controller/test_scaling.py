"""shoal.controller.scaling: the autoscaling poller on fake records, fake replica connections
and a fake clock (no process)."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal.controller.autoscale import Autoscaler
from shoal.controller.scaling import AutoscalePoller, ReplicaCalls, decide, record_queued
from shoal.controller.state import DeploymentState, Replica
from shoal.serve.config import AutoscalingConfig, DeploymentID
from shoal.serve.schema import DeploymentStatus, DeploymentStatusTrigger, ReplicaState


class FakeReplica:
    """Answers the metrics call with ``ongoing`` once ``answer`` is set."""

    def __init__(self, ongoing: float) -> None:
        self.ongoing = ongoing
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
        self.asked.set()
        await self.answer.wait()
        return self.ongoing


def autoscaling_deployment(name: str) -> DeploymentState:
    state = DeploymentState("app", name, b"", {"max_ongoing_requests": 5}, "v1", [], target=1)
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1, upscale_delay_s=0)
    state.autoscaler = Autoscaler(DeploymentID(name, "app"), config)
    state.replicas["r"] = Replica("r", 1, "v1", "", started_at=0.0, state=ReplicaState.RUNNING)
    state.status = DeploymentStatus.HEALTHY
    return state


def test_a_redeploy_that_clears_an_autoscaler_mid_tick_leaves_the_others_scaling() -> None:
    async def main() -> tuple[DeploymentState, DeploymentState, int]:
        a, b = autoscaling_deployment("a"), autoscaling_deployment("b")
        fake_a, fake_b = FakeReplica(3.0), FakeReplica(3.0)
        fakes: dict[Replica, ReplicaCalls] = {a.replicas["r"]: fake_a, b.replicas["r"]: fake_b}
        changes = 0

        def on_change() -> None:
            nonlocal changes
            changes += 1

        poller = AutoscalePoller(lambda: [a, b], fakes.get, on_change, clock=lambda: 100.0)
        tick = asyncio.get_running_loop().create_task(poller.tick())
        async with asyncio.timeout(5):
            await fake_a.asked.wait()
            a.autoscaler = None  # redeployed with a fixed num_replicas while the tick awaits
            fake_a.answer.set()
            fake_b.answer.set()
            await tick  # must not raise
        return a, b, changes

    a, b, changes = asyncio.run(main())
    assert a.target == 1
    assert (b.target, b.status, b.trigger) == (3, DeploymentStatus.UPSCALING, DeploymentStatusTrigger.AUTOSCALING)
    assert changes == 1


def test_queued_requests_scale_a_deployment_up_from_zero_at_once() -> None:
    state = autoscaling_deployment("a")
    state.replicas.clear()
    state.target = 0
    assert record_queued([state], "driver-1", {state.key: 2}, now=5.0)
    assert state.target >= 1 and state.status == DeploymentStatus.UPSCALING
    assert not record_queued([state], "driver-1", {"app#other": 2}, now=5.0)


def test_no_decision_for_a_failed_deployment() -> None:
    state = autoscaling_deployment("a")
    state.status = DeploymentStatus.DEPLOY_FAILED
    assert state.autoscaler is not None
    state.autoscaler.observe("r", 10.0, 1.0)
    assert not decide(state, 2.0)

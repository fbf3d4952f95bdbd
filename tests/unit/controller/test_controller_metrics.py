"""shoal.controller.metrics: the controller's gauges from fake records, Ray's status encoding, and
the autoscaling decision's numbers (``decide_desired``); no process."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal.controller import metrics as controller_metrics
from shoal.controller import scaling
from shoal.controller.autoscale import Autoscaler, DecisionState, decide_desired
from shoal.controller.health import monitor_health
from shoal.controller.metrics import APPLICATION_STATUS_CODES, DEPLOYMENT_STATUS_CODES, ControllerGauges
from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.serve.config import AutoscalingConfig, AutoscalingContext, DeploymentID
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, ReplicaState


def collected(gauges: ControllerGauges) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in gauges.collect()
        for sample in family.samples
    }


def deployment(name: str, *states: ReplicaState, autoscaling: AutoscalingConfig | None = None) -> DeploymentState:
    state = DeploymentState("app", name, b"", {}, "v1", [], target=len(states))
    for i, replica_state in enumerate(states):
        state.replicas[f"r{i}"] = Replica(f"r{i}", i, "v1", "", started_at=0.0, state=replica_state)
    if autoscaling is not None:
        state.autoscaler = Autoscaler(DeploymentID(name, "app"), autoscaling)
    return state


def test_status_codes_are_ray_serve_2_60s() -> None:
    """Ray's DeploymentStatus.to_numeric() / ApplicationStatus.to_numeric() (0 = UNKNOWN)."""
    assert {s.value: n for s, n in DEPLOYMENT_STATUS_CODES.items()} == {
        "DEPLOY_FAILED": 1, "UNHEALTHY": 2, "UPDATING": 3, "UPSCALING": 4, "DOWNSCALING": 5, "HEALTHY": 6,
    }
    assert {s.value: n for s, n in APPLICATION_STATUS_CODES.items()} == {
        "DEPLOY_FAILED": 1, "UNHEALTHY": 2, "NOT_STARTED": 3, "DELETING": 4, "DEPLOYING": 5, "RUNNING": 6,
    }
    assert set(DEPLOYMENT_STATUS_CODES) == set(DeploymentStatus)
    assert set(APPLICATION_STATUS_CODES) == set(ApplicationStatus)


def test_gauges_describe_the_records_published_last() -> None:
    d = deployment("D", ReplicaState.RUNNING, ReplicaState.RUNNING, ReplicaState.STARTING, ReplicaState.STOPPING)
    d.replicas["r1"].unhealthy = True
    d.status = DeploymentStatus.UNHEALTHY
    app = AppState("app", "/", "D", {"D": d}, status=ApplicationStatus.RUNNING)
    gauges = ControllerGauges(actor_id="c1")
    gauges.enabled = True
    gauges.control_loop(0.25, [app])
    gauges.control_loop(0.5, [app])
    tags = frozenset({("deployment", "D"), ("application", "app")})

    def of(replica_id: str) -> frozenset[tuple[str, str]]:
        return tags | {("replica", replica_id)}

    assert collected(gauges) == {
        ("ray_serve_controller_num_control_loops", frozenset({("actor_id", "c1")})): 2.0,
        ("ray_serve_controller_control_loop_duration_s", frozenset()): 0.5,
        ("ray_serve_application_status", frozenset({("application", "app")})): 6.0,
        ("ray_serve_deployment_replica_healthy", of("r0")): 1.0,  # running, not failing its checks
        ("ray_serve_deployment_replica_healthy", of("r1")): 0.0,  # running, failing its checks
        **{("ray_serve_health_check_failures_total", of(f"r{i}")): 0.0 for i in range(4)},
        ("ray_serve_deployment_status", tags): 2.0,
        ("ray_serve_autoscaling_target_replicas", tags): 4.0,
    }
    gauges.publish([])  # the application was deleted: its series go
    assert set(collected(gauges)) == {
        ("ray_serve_controller_num_control_loops", frozenset({("actor_id", "c1")})),
        ("ray_serve_controller_control_loop_duration_s", frozenset()),
    }


def test_gauges_compute_nothing_while_metrics_are_off() -> None:
    gauges = ControllerGauges()
    gauges.control_loop(0.1, [AppState("app", "/", "D", {"D": deployment("D", ReplicaState.RUNNING)})])
    assert collected(gauges) == {}


def test_autoscaling_gauges_show_the_last_decision() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2, upscale_delay_s=0)
    d = deployment("D", ReplicaState.RUNNING, autoscaling=config)
    assert d.autoscaler is not None
    gauges = ControllerGauges()
    gauges.enabled = True
    app = AppState("app", "/", "D", {"D": d})
    gauges.publish([app])
    assert not any(name == "ray_serve_autoscaling_desired_replicas" for name, _ in collected(gauges))
    d.autoscaler.observe("r0", 6.0, now=0.0)
    assert scaling.decide(d, 1.0)
    gauges.publish([app])
    samples = {name: v for (name, _), v in collected(gauges).items()}
    scopes = {dict(labels).get("policy_scope") for (name, labels) in collected(gauges)}
    assert scopes == {None, "deployment"}
    assert samples["ray_serve_autoscaling_total_requests"] == 6.0
    assert samples["ray_serve_autoscaling_target_ongoing_requests"] == 2.0
    assert samples["ray_serve_autoscaling_desired_replicas"] == 3.0
    assert samples["ray_serve_autoscaling_target_replicas"] == 3.0
    assert samples["ray_serve_autoscaling_policy_execution_time_ms"] >= 0


def _ctx(config: AutoscalingConfig, *, current: int, target: int, total: float) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID("D", "app"), deployment_name="D", app_name="app",
        current_num_replicas=current, target_num_replicas=target, running_replicas=[],
        total_num_requests=total, total_queued_requests=None, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config,
    )


def test_desired_is_the_move_before_the_bounds() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1, upscale_delay_s=0)

    def wants_ten(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        return 10, {}

    result, desired, _ = decide_desired(_ctx(config, current=2, target=2, total=0), config, DecisionState(), 5.0, wants_ten)
    assert (result, desired) == (4, 10)


def test_desired_is_the_target_while_a_move_waits_out_its_delay() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=1, upscale_delay_s=30)
    result, desired, _ = decide_desired(_ctx(config, current=2, target=2, total=8), config, DecisionState(), 5.0)
    assert (result, desired) == (2, 2)


def test_desired_at_a_cold_start_is_the_cold_start_number() -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=1, upscaling_factor=3)
    result, desired, _ = decide_desired(_ctx(config, current=0, target=0, total=1), config, DecisionState(), 5.0)
    assert (result, desired) == (3, 3)


class FlakyCheck:
    """``check_health`` answers: True is a success, False raises."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
        if not self.answers.pop(0):
            raise RuntimeError("unhealthy")
        return None


def test_every_health_check_reports_its_duration_and_whether_it_failed() -> None:
    results: list[bool] = []
    unhealthy: list[str] = []

    async def main() -> None:
        await monitor_health(
            FlakyCheck([True, False, True, False, False, False]),  # type: ignore[arg-type]
            period_s=0, timeout_s=1, on_unhealthy=unhealthy.append, name="r",
            on_checked=lambda latency_ms, failed: results.append(failed),
        )

    asyncio.run(main())
    assert results == [False, True, False, True, True, True]
    assert len(unhealthy) == 1


def test_deployment_tags_are_rays() -> None:
    assert controller_metrics.deployment_tags(deployment("D")) == {"deployment": "D", "application": "app"}


def test_a_gone_replicas_failures_stay_for_the_retention() -> None:
    now = [0.0]
    d = deployment("D", ReplicaState.RUNNING)
    d.replicas["r0"].health_check_failures = 3
    app = AppState("app", "/", "D", {"D": d}, status=ApplicationStatus.RUNNING)
    gauges = ControllerGauges(actor_id="c1", retention_s=10.0, clock=lambda: now[0])
    gauges.enabled = True
    failures = ("ray_serve_health_check_failures_total", frozenset({("deployment", "D"), ("application", "app"), ("replica", "r0")}))
    gauges.publish([app])
    assert collected(gauges)[failures] == 3.0
    del d.replicas["r0"]  # replaced: its record is gone
    now[0] = 5.0
    gauges.publish([app])
    assert collected(gauges)[failures] == 3.0  # still scraped
    now[0] = 15.0
    gauges.publish([app])
    assert failures not in collected(gauges)

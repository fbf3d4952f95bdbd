"""target_capacity and application-level autoscaling policies: Ray's rounding, bounds and
direction, the records a deploy builds, and one policy deciding for an application (no process,
fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.controller.autoscale import AppPolicy, Autoscaler, capacity_adjusted
from shoal.controller.deploy import apply_spec, capacity_direction
from shoal.controller.scaling import decide_all
from shoal.controller.state import Replica
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import AutoscalingConfig, AutoscalingPolicy, DeploymentID
from shoal.serve.schema import ReplicaState


def spec(name: str = "a", deployments: dict[str, dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    deployments = deployments or {"D": {"num_replicas": 4}}
    return {
        "name": name,
        "route_prefix": "/",
        "ingress": next(iter(deployments)),
        "deployments": [
            {"name": d, "definition": b"v1", "config": DeploymentConfig().merged(options).to_wire()}
            for d, options in deployments.items()
        ],
        "sys_path": [],
        **extra,
    }


@pytest.mark.parametrize(
    ("replicas", "capacity", "expected"),
    [
        (4, None, 4), (4, 100, 4), (4, 50, 2), (5, 50, 3),  # 2.5 rounds half up, not to even
        (3, 50, 2), (1, 10, 1), (4, 0, 0), (0, 50, 0), (10, 33.3, 3), (7, 150, 11),
    ],
)
def test_capacity_scales_a_count_as_ray_does(replicas: int, capacity: float | None, expected: int) -> None:
    assert capacity_adjusted(replicas, capacity) == expected


def test_capacity_direction_follows_rays_rule() -> None:
    apps = frozenset({"a"})
    assert capacity_direction(None, (apps, 50), None) == "UP"  # a new config with a capacity
    assert capacity_direction(None, (apps, None), None) is None
    assert capacity_direction((apps, None), (apps, 50), None) == "DOWN"
    assert capacity_direction((apps, 50), (apps, 80), "DOWN") == "UP"
    assert capacity_direction((apps, 80), (apps, 20), "UP") == "DOWN"
    assert capacity_direction((apps, 80), (apps, 80), "UP") == "UP"  # unchanged keeps it
    assert capacity_direction((apps, 80), (apps, None), "UP") is None
    assert capacity_direction((frozenset({"b"}), 10), (apps, 50), "DOWN") == "UP"  # other apps


def test_a_fixed_count_is_scaled_and_rescaled_without_replacing_replicas() -> None:
    app, _ = apply_spec(None, spec(target_capacity=50, target_capacity_direction="UP"))
    state = app.deployments["D"]
    assert state.target == 2
    state.replicas["r1"] = Replica("r1", 1, state.version, "", started_at=0.0, state=ReplicaState.RUNNING)
    again, _ = apply_spec(app, spec(target_capacity=100, target_capacity_direction="UP"))
    assert again.deployments["D"] is state and state.target == 4
    assert state.replicas["r1"].version == state.version  # same version: nothing restarts
    zero, _ = apply_spec(again, spec(target_capacity=0, target_capacity_direction="DOWN"))
    assert zero.deployments["D"].target == 0


def test_autoscaling_bounds_are_scaled_and_initial_replicas_bounds_a_scale_up() -> None:
    config = AutoscalingConfig(min_replicas=2, initial_replicas=6, max_replicas=10)
    scaler = Autoscaler(DeploymentID("D", "a"), config, target_capacity=50, capacity_direction="DOWN")
    assert (scaler.lower_bound, scaler.upper_bound) == (1, 5)
    scaler.capacity_direction = "UP"
    assert scaler.lower_bound == 3  # initial_replicas * 50%
    assert scaler.apply_bounds(9) == 5 and scaler.apply_bounds(0) == 3
    ctx = scaler.context(0.0, 3, 3)
    assert (ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas) == (3, 5)
    app, _ = apply_spec(None, spec(deployments={"D": {"autoscaling_config": config}}, target_capacity=20,
                                   target_capacity_direction="DOWN"))
    assert app.deployments["D"].target == 2  # initial_replicas 6, clamped to max_replicas 10 * 20%


def fixed_policy(contexts: dict[DeploymentID, Any]) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
    """An application-level policy: 3 replicas for every deployment whose name starts with F."""
    decisions = {dep: 3 for dep in contexts if dep.name.startswith("F")}
    return decisions, {dep: {"calls": ctx.policy_state.get("calls", 0) + 1} for dep, ctx in contexts.items()}


def test_an_application_policy_decides_for_its_autoscaling_deployments() -> None:
    autoscaling = {"autoscaling_config": AutoscalingConfig(min_replicas=1, max_replicas=5, upscale_delay_s=0)}
    policy = {"policy_function": f"{__name__}:fixed_policy"}
    app, _ = apply_spec(None, spec(deployments={"F": autoscaling, "G": autoscaling, "H": {"num_replicas": 2}},
                                   autoscaling_policy=policy))
    states = app.deployments
    f, g, h = states["F"], states["G"], states["H"]
    assert f.autoscaler is not None and g.autoscaler is not None and h.autoscaler is None
    assert f.autoscaler.app_policy is g.autoscaler.app_policy is not None
    for state in (f, g):
        state.replicas["r"] = Replica("r", 1, state.version, "", started_at=0.0, state=ReplicaState.RUNNING)
    assert decide_all(states.values(), now=1.0)
    assert (f.target, g.target, h.target) == (3, 1, 2)  # G left out by the policy keeps its target
    assert f.autoscaler.state.policy_state == {"calls": 1} and g.autoscaler.state.policy_state == {"calls": 1}
    decide_all(states.values(), now=2.0)
    assert f.autoscaler.state.policy_state == {"calls": 2}  # each deployment's state comes back


def test_an_application_decision_goes_through_the_deployments_bounds_and_delays() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=2, upscale_delay_s=10)
    scaler = Autoscaler(DeploymentID("F", "a"), config)
    policy = AppPolicy("a", AutoscalingPolicy(policy_function=f"{__name__}:fixed_policy"))
    members = {scaler.deployment_id: (scaler, 1, 1)}
    assert policy.targets(members, now=0.0) == {scaler.deployment_id: 1}  # the upscale delay runs
    assert policy.targets(members, now=10.0) == {scaler.deployment_id: 2}  # then max_replicas bounds 3


def broken_policy(contexts: dict[DeploymentID, Any]) -> Any:
    return {DeploymentID("nope", "a"): 4}, {}


def test_a_malformed_application_decision_leaves_every_target(caplog: pytest.LogCaptureFixture) -> None:
    scaler = Autoscaler(DeploymentID("F", "a"), AutoscalingConfig(max_replicas=5))
    policy = AppPolicy("a", AutoscalingPolicy(policy_function=f"{__name__}:broken_policy"))
    assert policy.targets({scaler.deployment_id: (scaler, 1, 1)}, now=0.0) == {scaler.deployment_id: 1}
    assert "autoscaling policy of application 'a' failed" in caplog.text

"""shoal.controller.deploy: route prefixes, specs into records, and the path custom policies are
imported from (no process)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from shoal.controller.deploy import ControllerError, apply_spec, check_route_prefixes
from shoal.controller.state import AppState, Replica
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import AutoscalingConfig, AutoscalingPolicy
from shoal.serve.schema import DeploymentStatus, ReplicaState


def spec(name: str, prefix: str | None = "/", *, definition: bytes = b"v1", sys_path: list[str] | None = None,
         **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "route_prefix": prefix,
        "ingress": "D",
        "deployments": [{"name": "D", "definition": definition, "config": DeploymentConfig(**config).to_wire()}],
        "sys_path": sys_path or [],
    }


def app(name: str, prefix: str | None, *, deleting: bool = False) -> AppState:
    built, _ = apply_spec(None, spec(name, prefix))
    built.deleting = deleting
    return built


def test_two_applications_cannot_share_a_route_prefix() -> None:
    apps = {"a": app("a", "/a"), "gone": app("gone", "/g", deleting=True)}
    with pytest.raises(ControllerError, match='Prefix /a is being used by application "a"'):
        check_route_prefixes(apps, [spec("b", "/a")], declarative=False)
    with pytest.raises(ControllerError, match='Prefix /x is being used by application "b"'):
        check_route_prefixes(apps, [spec("b", "/x"), spec("c", "/x")], declarative=False)
    check_route_prefixes(apps, [spec("a", "/a")], declarative=False)  # a redeploy keeps its own
    check_route_prefixes(apps, [spec("b", "/g")], declarative=False)  # an app being deleted frees it
    check_route_prefixes(apps, [spec("b", "/a")], declarative=True)  # "a" is deleted by this deploy
    check_route_prefixes(apps, [spec("b", None), spec("c", None)], declarative=False)


def test_a_redeploy_keeps_replicas_and_updates_in_place_options() -> None:
    old, _ = apply_spec(None, spec("a", num_replicas=2, user_config={"v": 1}))
    state = old.deployments["D"]
    state.replicas["r1"] = Replica("r1", 1, state.version, "", started_at=0.0, state=ReplicaState.RUNNING)
    state.status = DeploymentStatus.HEALTHY
    new, updates = apply_spec(old, spec("a", num_replicas=3, user_config={"v": 2}))
    assert new.deployments["D"] is state and state.target == 3
    assert [(u.update, u.previous) for u in updates] == [({"user_config": {"v": 2}}, {"user_config": {"v": 1}})]
    assert state.status == DeploymentStatus.UPDATING
    assert new.changed is old.changed  # who waits on the app keeps waiting on the same event


def test_a_new_version_starts_its_failure_count_over_and_dropped_deployments_are_deleted() -> None:
    old, _ = apply_spec(None, spec("a"))
    state = old.deployments["D"]
    state.failed_starts, state.last_error, state.status = 3, "boom", DeploymentStatus.DEPLOY_FAILED
    new, updates = apply_spec(old, spec("a", definition=b"v2"))
    assert (state.failed_starts, state.last_error, state.status) == (0, "", DeploymentStatus.UPDATING)
    assert updates == []
    other = {**spec("a"), "deployments": [{**spec("a")["deployments"][0], "name": "E"}], "ingress": "E"}
    newer, _ = apply_spec(new, other)
    assert newer.deployments["D"].deleting and newer.deployments["D"].target == 0


def test_a_custom_policy_is_imported_from_the_apps_path_without_keeping_it(tmp_path: Path) -> None:
    (tmp_path / "shoal_test_custom_policy.py").write_text("def policy(ctx):\n    return 2, {}\n")
    before = list(sys.path)
    autoscaling = AutoscalingConfig(
        min_replicas=1, max_replicas=4, policy=AutoscalingPolicy(policy_function="shoal_test_custom_policy:policy")
    )
    for _ in range(3):  # redeploys
        built, _ = apply_spec(None, spec("a", sys_path=[str(tmp_path)], num_replicas=None, autoscaling_config=autoscaling))
        assert built.deployments["D"].autoscaler is not None
    assert sys.path == before
    sys.modules.pop("shoal_test_custom_policy", None)

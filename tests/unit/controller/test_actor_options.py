"""shoal.controller.actor_options: what each ray_actor_options entry does, checked at deploy."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.controller.actor_options import ActorOptionsError, check, environment, memory_limit_bytes, merge_runtime_envs


def test_env_vars_and_gpus_make_the_replica_environment() -> None:
    options = {"num_gpus": 1, "runtime_env": {"env_vars": {"A": "1"}}}
    assert check("D", options, 1) == []
    assert environment(options, ("3",)) == {"A": "1", "CUDA_VISIBLE_DEVICES": "3"}
    assert environment({"num_gpus": 0}, ()) == {}  # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone at 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"resources": {"custom": 1}}, "ray_actor_options['resources']"),
        ({"accelerator_type": "A100"}, "ray_actor_options['accelerator_type']"),
        ({"label_selector": {"zone": "a"}}, "ray_actor_options['label_selector']"),
        ({"fallback_strategy": [{"label_selector": {}}]}, "ray_actor_options['fallback_strategy']"),
        ({"num_gpus": 2}, "ray_actor_options['num_gpus']=2"),
        ({"runtime_env": {"pip": ["torch"]}}, "runtime_env['pip']"),
        ({"runtime_env": {"working_dir": "s3://b/x.zip"}}, "runtime_env['working_dir']"),
        ({"runtime_env": {"conda": "env"}}, "runtime_env['conda']"),
        ({"runtime_env": {"container": {}}}, "runtime_env['container']"),
        ({"runtime_env": {"nonsense": 1}}, "runtime_env['nonsense']"),
        ({"runtime_env": {"env_vars": {"A": 1}}}, "runtime_env['env_vars']"),
    ],
)
def test_refused_entries_are_named(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ActorOptionsError) as info:
        check("D", options, 1)
    assert named in str(info.value) and "Deployment 'D'" in str(info.value)


def test_harmless_runtime_env_keys_warn_once_each() -> None:
    warnings = check("D", {"runtime_env": {"config": {"setup_timeout_seconds": 10}, "excludes": ["*.bin"]}}, 0)
    assert len(warnings) == 2
    assert "runtime_env['config']" in warnings[0] and "runtime_env['excludes']" in warnings[1]


def test_empty_entries_and_cpus_are_accepted() -> None:
    assert check("D", {"num_cpus": 64, "resources": {}, "label_selector": {}, "memory": 2**30}, 0) == []
    assert memory_limit_bytes({"memory": 2**30}) == 2**30
    assert memory_limit_bytes({"memory": 0}) is None


def test_deployment_runtime_env_over_the_application_s_env_vars_merged() -> None:
    app = {"env_vars": {"A": "app", "B": "app"}, "config": {"x": 1}}
    dep = {"env_vars": {"B": "dep"}, "config": {"y": 2}}
    assert merge_runtime_envs(app, dep) == {"env_vars": {"A": "app", "B": "dep"}, "config": {"y": 2}}
    assert merge_runtime_envs(app, {}) == app

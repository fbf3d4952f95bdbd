"""shoal.controller.template: the start-method setting (pure) and its deploy-time check."""

from __future__ import annotations

import pytest

from shoal.controller import actor_options
from shoal.controller.template import START_ENV, platform_can_fork, start_method_from


@pytest.mark.parametrize(
    ("env", "method"),
    [({}, "fork"), ({START_ENV: ""}, "fork"), ({START_ENV: "spawn"}, "spawn"), ({START_ENV: " Fork "}, "fork")],
)
def test_start_method_from(env: dict[str, str], method: str) -> None:
    assert start_method_from(env) == method


def test_start_method_default_is_the_instance_setting() -> None:
    assert start_method_from({}, default="spawn") == "spawn"


def test_unknown_start_method_names_the_variable() -> None:
    with pytest.raises(ValueError, match=START_ENV):
        start_method_from({START_ENV: "vfork"})


def test_deploy_check_refuses_an_unknown_start_method() -> None:
    options = {"runtime_env": {"env_vars": {START_ENV: "forkserver"}}}
    with pytest.raises(actor_options.ActorOptionsError, match=START_ENV):
        actor_options.check("D", options, 0)
    assert actor_options.check("D", {"runtime_env": {"env_vars": {START_ENV: "spawn"}}}, 0) == []


def test_this_platform_can_fork() -> None:
    assert platform_can_fork()  # Linux >= 5.3: the tests of forked replicas rely on it

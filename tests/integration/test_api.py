"""The serve API: the decorator and its validation, run/status/delete, handle lookups, contexts."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from helpers import alive, app_status, wait_until

from shoal import serve
from shoal.serve import Application, Deployment
from shoal.serve.exceptions import DeploymentUnavailableError, RayServeException
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(60)

# -- the decorator (no processes) -----------------------------------------------------------------


def test_bare_decorator_on_a_class() -> None:
    @serve.deployment
    class Model:
        def __call__(self) -> str:
            return "ok"

    assert isinstance(Model, Deployment)
    assert Model.name == "Model"
    assert Model.func_or_class.__name__ == "Model"
    assert Model.num_replicas == 1
    assert Model.max_ongoing_requests == 5
    assert Model.user_config is None
    assert Model.ray_actor_options == {"num_cpus": 1}


def test_decorator_with_options_on_a_class() -> None:
    @serve.deployment(
        name="Renamed", num_replicas=2, max_ongoing_requests=3, max_queued_requests=7,
        user_config={"threshold": 0.5}, ray_actor_options={"num_cpus": 0.5},
    )
    class Model:
        def reconfigure(self, config: dict[str, Any]) -> None: ...

    assert Model.name == "Renamed"
    assert Model.num_replicas == 2
    assert Model.max_ongoing_requests == 3
    assert Model.max_queued_requests == 7
    assert Model.user_config == {"threshold": 0.5}
    assert Model.ray_actor_options == {"num_cpus": 0.5}


def test_bare_decorator_on_a_function() -> None:
    @serve.deployment
    def greet(name: str) -> str:
        return f"hi {name}"

    assert isinstance(greet, Deployment)
    assert greet.name == "greet"
    assert greet.num_replicas == 1


def test_decorator_with_options_on_a_function() -> None:
    @serve.deployment(num_replicas=3, max_ongoing_requests=10)
    def greet(name: str) -> str:
        return f"hi {name}"

    assert (greet.name, greet.num_replicas, greet.max_ongoing_requests) == ("greet", 3, 10)


def test_deployment_cannot_be_called_directly() -> None:
    @serve.deployment
    class Model:
        pass

    with pytest.raises(RuntimeError):
        Model()


class _Cls:
    pass


def _fn() -> None:
    pass


VALIDATION_CASES = [
    pytest.param(
        _Cls, {"num_replicas": 0}, ValueError, "num_replicas is expected to larger than 0", id="num_replicas=0",
    ),
    pytest.param(
        _Cls, {"max_ongoing_requests": None}, ValueError,
        "`max_ongoing_requests` must be non-null, got None.", id="max_ongoing_requests=None",
    ),
    pytest.param(
        _Cls, {"ray_actor_options": {"num_cpu": 1}}, ValueError,
        "Specifying 'num_cpu' in ray_actor_options is not allowed.", id="bad ray_actor_options key",
    ),
    pytest.param(
        _fn, {"user_config": {"a": 1}}, ValueError,
        "deployment_def must be a class to use user_config", id="user_config on a function",
    ),
]


@pytest.mark.parametrize(("target", "options", "exc_type", "message"), VALIDATION_CASES)
def test_decorator_validation_errors(target: Any, options: dict[str, Any], exc_type: type, message: str) -> None:
    with pytest.raises(exc_type, match=re.escape(message)):
        serve.deployment(**options)(target)


@pytest.mark.parametrize(("target", "options", "exc_type", "message"), VALIDATION_CASES)
def test_options_validation_errors(target: Any, options: dict[str, Any], exc_type: type, message: str) -> None:
    base = serve.deployment(target)
    with pytest.raises(exc_type, match=re.escape(message)):
        base.options(**options)


def test_version_option_is_removed() -> None:
    with pytest.raises(ValueError, match=re.escape("`version` in `@serve.deployment` has been removed")):
        serve.deployment(version="1")(_Cls)


def test_bind_gives_an_application() -> None:
    dep = serve.deployment(_Cls)
    app = dep.bind(1, k="v")
    assert isinstance(app, Application)
    assert app.deployment.init_args == (1,)
    assert app.deployment.init_kwargs == {"k": "v"}
    assert dep.init_args == ()  # bind does not change the deployment


def test_options_returns_a_changed_copy() -> None:
    dep = serve.deployment(num_replicas=1)(_Cls)
    changed = dep.options(num_replicas=4, name="Other")
    assert (changed.num_replicas, changed.name) == (4, "Other")
    assert (dep.num_replicas, dep.name) == (1, "_Cls")


def test_serve_run_rejects_a_non_application() -> None:
    with pytest.raises(TypeError):
        serve.run(serve.deployment(_Cls))  # a Deployment, not bound


# -- run, status, delete --------------------------------------------------------------------------


@serve.deployment(num_replicas=2)
class Whoami:
    def __call__(self) -> int:
        return os.getpid()

    def context(self) -> tuple[str, str, str]:
        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment, ctx.replica_tag


@serve.deployment
def double(x: int) -> int:
    return 2 * x


def test_run_returns_a_handle_once_running(deploy: Any, app_name: str) -> None:
    handle = deploy(Whoami.bind(), app_name)
    assert isinstance(handle, DeploymentHandle)
    # No waiting: serve.run returned, so the app is RUNNING with both replicas up.
    app = app_status(app_name)
    assert app.status == "RUNNING"
    assert set(app.deployments) == {"Whoami"}
    dep = app.deployments["Whoami"]
    assert dep.status == "HEALTHY"
    assert dep.replica_states == {"RUNNING": 2}
    assert isinstance(handle.remote().result(timeout_s=10), int)


def test_function_deployment_runs(deploy: Any, app_name: str) -> None:
    handle = deploy(double.bind(), app_name)
    assert handle.remote(21).result(timeout_s=10) == 42
    assert app_status(app_name).deployments["double"].status == "HEALTHY"


def test_delete_removes_the_app_and_its_replicas(deploy: Any, app_name: str) -> None:
    handle = deploy(Whoami.options(num_replicas=1).bind(), app_name)
    pid = handle.remote().result(timeout_s=10)
    serve.delete(app_name)
    assert app_status(app_name) is None
    wait_until(lambda: not alive(pid), 10, "the deleted app's replica exits")
    with pytest.raises(RayServeException, match=re.escape(f"Application '{app_name}' does not exist.")):
        serve.get_app_handle(app_name)
    # A handle to the deleted app fails its calls instead of waiting forever.
    with pytest.raises(DeploymentUnavailableError):
        handle.remote().result(timeout_s=10)


def test_get_app_handle(deploy: Any, app_name: str) -> None:
    deploy(double.bind(), app_name)
    handle = serve.get_app_handle(app_name)
    assert isinstance(handle, DeploymentHandle)
    assert handle.remote(4).result(timeout_s=10) == 8


def test_get_app_handle_of_a_missing_app(serve_instance: Any) -> None:
    with pytest.raises(RayServeException, match=re.escape("Application 'no-such-app' does not exist.")):
        serve.get_app_handle("no-such-app")


def test_get_deployment_handle(deploy: Any, app_name: str) -> None:
    deploy(double.bind(), app_name)
    handle = serve.get_deployment_handle("double", app_name)
    assert handle.remote(5).result(timeout_s=10) == 10


def test_get_deployment_handle_needs_an_app_name_outside_an_app(serve_instance: Any) -> None:
    with pytest.raises(
        RayServeException,
        match=r"Please specify an application name when getting a deployment handle outside of an? \w+ application",
    ):
        serve.get_deployment_handle("double")


def test_get_deployment_handle_of_a_missing_deployment(serve_instance: Any) -> None:
    with pytest.raises(RayServeException):
        serve.get_deployment_handle("nope", "no-such-app")


def test_replica_context_inside_a_replica(deploy: Any, app_name: str) -> None:
    handle = deploy(Whoami.bind(), app_name)
    tags = set()
    for _ in range(20):
        app, deployment, tag = handle.context.remote().result(timeout_s=10)
        assert (app, deployment) == (app_name, "Whoami")
        assert re.fullmatch(r"\w+", tag), tag
        tags.add(tag)
    assert 1 <= len(tags) <= 2  # one tag per replica


def test_replica_context_outside_a_replica() -> None:
    with pytest.raises(RayServeException, match="may only be called from within a"):
        serve.get_replica_context()


# -- redeploying ----------------------------------------------------------------------------------


@serve.deployment(name="Versioned")
class V1:
    def __call__(self) -> str:
        return "v1"


@serve.deployment(name="Versioned")
class V2:
    def __call__(self) -> str:
        return "v2"


def test_redeploy_under_the_same_name_replaces_the_app(deploy: Any, app_name: str) -> None:
    first = deploy(V1.bind(), app_name)
    assert first.remote().result(timeout_s=10) == "v1"
    second = deploy(V2.bind(), app_name)
    # The first call after serve.run returns is answered by the new code, through both handles.
    assert second.remote().result(timeout_s=10) == "v2"
    assert first.remote().result(timeout_s=10) == "v2"
    app = app_status(app_name)
    assert app.status == "RUNNING"
    assert app.deployments["Versioned"].replica_states.get("RUNNING") == 1  # the old one may still be STOPPING
    wait_until(
        lambda: app_status(app_name).deployments["Versioned"].replica_states == {"RUNNING": 1}, 30,
        "the old replica stops",
    )

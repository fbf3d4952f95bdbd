"""Ray 2.60 API pieces: ``serve.ingress`` without a class (an app, a builder function, or the
class's ``__serve_build_asgi_app__``), ``serve.run_many`` / ``RunTarget`` / ``_run``,
``serve.shutdown_async`` and the exception names. Real processes, real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from helpers import live_children, wait_until

from shoal import serve
from shoal.runtime.errors import RayServeException
from shoal.serve.exceptions import RequestCancelledError, TaskCancelledError, gRPCStatusError

pytestmark = pytest.mark.timeout(60)


def test_shutdown_async_stops_the_instance() -> None:
    """Runs before the module's shared instance exists (it stops its own)."""
    assert not live_children()

    @serve.deployment
    def hello() -> str:
        return "hi"

    async def main() -> None:
        handle = serve.run(hello.bind(), name="bye", route_prefix=None)
        assert await handle.remote() == "hi"
        await serve.shutdown_async()

    asyncio.run(main())
    wait_until(lambda: not live_children(), 15, "no process left after shutdown_async")
    assert serve.status().applications == {}


@pytest.fixture(scope="module")
def http(serve_instance: Any) -> Iterator[httpx.Client]:
    url = serve.get_http_url()
    assert url is not None
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture
def apps(serve_instance: Any) -> Iterator[list[str]]:
    """Names of applications the test deployed; deleted after it."""
    names: list[str] = []
    yield names
    for name in names:
        serve.delete(name)


# -- serve.ingress without a class ---------------------------------------------------------------


standalone = FastAPI()


@standalone.get("/hi")
def say_hi() -> str:
    return "Hello world!"


@serve.deployment
class SubDeployment:
    def __call__(self) -> str:
        return "Hello from the sub-deployment!"


def build_asgi_app() -> FastAPI:
    """Ray's documented builder: evaluated in the replica; routes call a sub-deployment."""
    app = FastAPI()

    def get_sub_deployment_handle() -> Any:
        return serve.get_deployment_handle("SubDeployment", app_name="built")

    @app.get("/hi")
    async def hi(handle: Any = Depends(get_sub_deployment_handle)) -> str:  # noqa: B008
        return str(await handle.remote())

    return app


def test_ingress_of_a_standalone_app(http: httpx.Client, apps: list[str]) -> None:
    apps.append("standalone")
    serve.run(serve.deployment(serve.ingress(standalone)()).bind(), name="standalone", route_prefix="/standalone")
    assert http.get("/standalone/hi").json() == "Hello world!"


def test_ingress_of_a_builder_function(http: httpx.Client, apps: list[str]) -> None:
    apps.append("built")
    deployment = serve.deployment(serve.ingress(build_asgi_app)())
    serve.run(deployment.bind(SubDeployment.bind()), name="built", route_prefix="/built")
    assert http.get("/built/hi").json() == "Hello from the sub-deployment!"


@serve.deployment
@serve.ingress()
class LateBound:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    async def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI()

        @app.get("/")
        def root() -> str:
            return self.greeting

        return app


def test_ingress_without_an_app_uses_serve_build_asgi_app(http: httpx.Client, apps: list[str]) -> None:
    apps.append("late")
    serve.run(LateBound.bind("built after the constructor"), name="late", route_prefix="/late")
    assert http.get("/late").json() == "built after the constructor"


def test_ingress_validation() -> None:
    class NoBuilder:
        pass

    with pytest.raises(ValueError, match="requires NoBuilder to define `__serve_build_asgi_app__`"):
        serve.ingress()(NoBuilder)
    class Callable_:
        def __call__(self) -> None: ...

    class Inherits(Callable_):
        pass

    with pytest.raises(ValueError, match="may not have __call__ method"):
        serve.ingress(standalone)(Inherits)  # an inherited __call__ counts, as in Ray
    with pytest.raises(ValueError, match=r"@serve\.ingress must be used with a class"):
        serve.ingress(standalone)(say_hi)


# -- run_many, RunTarget, _run ---------------------------------------------------------------------


@serve.deployment
class Echo:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, *args: Any) -> str:
        return self.tag


def test_run_many_deploys_several_apps(http: httpx.Client, apps: list[str]) -> None:
    apps.extend(["many_a", "many_b"])
    handles = serve.run_many([
        serve.RunTarget(Echo.bind("a"), name="many_a", route_prefix="/many_a"),
        serve.RunTarget(Echo.bind("b"), name="many_b", route_prefix=None),
    ])
    assert [h.remote().result(timeout_s=10) for h in handles] == ["a", "b"]
    status = serve.status().applications
    assert status["many_a"].status == "RUNNING" and status["many_b"].status == "RUNNING"
    assert http.get("/many_a").text == "a"


def test_run_many_is_all_or_nothing(apps: list[str]) -> None:
    with pytest.raises(ValueError, match=r"No applications provided\."):
        serve.run_many([])
    with pytest.raises(RayServeException):
        serve.run_many([
            serve.RunTarget(Echo.bind("x"), name="clash_x", route_prefix="/clash"),
            serve.RunTarget(Echo.bind("y"), name="clash_y", route_prefix="/clash"),
        ])
    assert not {"clash_x", "clash_y"} & set(serve.status().applications)
    with pytest.raises(ValueError, match="external_scaler_enabled"):
        serve.run_many([serve.RunTarget(Echo.bind("z"), name="z", external_scaler_enabled=True)])
    with pytest.raises(TypeError, match="expects an `Application`"):
        serve.run_many([serve.RunTarget(Echo, name="z")])  # type: ignore[arg-type]


def test_run_without_waiting(apps: list[str]) -> None:
    apps.append("unblocked")
    handle = serve._run(Echo.bind("u"), _blocking=False, name="unblocked", route_prefix=None)
    assert handle.remote().result(timeout_s=30) == "u"


def test_run_many_in_local_testing_mode() -> None:
    handles = serve.run_many(
        [serve.RunTarget(Echo.bind("l1"), name="l1"), serve.RunTarget(Echo.bind("l2"), name="l2", route_prefix="/l2")],
        _local_testing_mode=True,
    )
    assert [h.remote().result(timeout_s=10) for h in handles] == ["l1", "l2"]


# -- exceptions ------------------------------------------------------------------------------------


@serve.deployment
class Slow:
    async def __call__(self) -> None:
        await asyncio.Event().wait()


def test_a_cancelled_response_raises_request_cancelled_error(apps: list[str]) -> None:
    apps.append("slow")
    handle = serve.run(Slow.bind(), name="slow", route_prefix=None)
    response = handle.remote()
    response.cancel()
    with pytest.raises(RequestCancelledError) as caught:
        response.result(timeout_s=10)
    assert isinstance(caught.value, TaskCancelledError) and isinstance(caught.value, RayServeException)
    assert str(caught.value) == f"Request {response.request_id} was cancelled."


def test_grpc_status_error_carries_its_status() -> None:
    err = gRPCStatusError(ValueError("bad"), "NOT_FOUND", "no such thing")
    assert isinstance(err, RayServeException) and str(err) == "bad"
    assert (err.grpc_code, err.grpc_details, type(err.original_exception)) == ("NOT_FOUND", "no such thing", ValueError)

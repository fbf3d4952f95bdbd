"""How user code runs in a replica: async concurrency, the sync thread pool, constructors,
reconfigure, exceptions, unknown methods and unserializable arguments."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shoal import serve
from shoal.serve.exceptions import RayServeException
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(60)


class CustomError(Exception):
    """A user exception type defined in the app's own module."""

    def __init__(self, code: int) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code


@serve.deployment(max_ongoing_requests=3)
class Worker:
    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.events: dict[str, asyncio.Event] = {}
        self.barrier = threading.Barrier(3)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def meet(self, mine: str, other: str) -> str:
        # Completes only if the other call runs at the same time.
        self._event(mine).set()
        await asyncio.wait_for(self._event(other).wait(), timeout=10)
        return mine

    def in_pool(self) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            # Three calls must run at once, in three threads, to pass the barrier.
            self.barrier.wait(timeout=10)
        finally:
            with self.lock:
                self.running -= 1
        return threading.get_ident()

    def sync_peak(self) -> int:
        return self.peak

    async def loop_ident(self) -> tuple[int, int]:
        return self.loop_thread, threading.get_ident()

    def pid(self) -> int:
        return os.getpid()

    def fail(self, message: str) -> None:
        raise ValueError(message)

    async def fail_async(self, code: int) -> None:
        raise CustomError(code)

    def returns_lock(self) -> Any:
        return threading.Lock()

    def fail_unpicklable(self) -> None:
        err = RuntimeError("carries a lock")
        err.lock = threading.Lock()  # type: ignore[attr-defined]
        raise err

    def takes(self, *args: Any, **kwargs: Any) -> int:
        return len(args) + len(kwargs)


@serve.deployment
class AsyncInit:
    async def __init__(self, value: str) -> None:
        await asyncio.sleep(0)
        self.value = value

    def __call__(self) -> str:
        return self.value


@serve.deployment(user_config={"greeting": "hello"})
class Configured:
    def __init__(self) -> None:
        self.greeting: str | None = None
        self.calls: list[Any] = []

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.calls.append(config)
        self.greeting = config["greeting"]

    def __call__(self) -> tuple[str | None, list[Any]]:
        return self.greeting, self.calls


@serve.deployment(user_config={"n": 1})
class AsyncConfigured:
    def __init__(self) -> None:
        self.n = 0

    async def reconfigure(self, config: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        self.n = config["n"]

    def __call__(self) -> int:
        return self.n


@pytest.fixture(scope="module")
def worker(serve_instance: Any) -> Iterator[DeploymentHandle]:
    handle = serve.run(Worker.bind(), name="execution_worker", route_prefix=None)
    yield handle
    serve.delete("execution_worker")


def test_async_methods_run_concurrently(worker: DeploymentHandle) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    first = worker.meet.remote(a, b)
    second = worker.meet.remote(b, a)
    assert (first.result(timeout_s=15), second.result(timeout_s=15)) == (a, b)


def test_sync_methods_run_in_a_thread_pool(worker: DeploymentHandle) -> None:
    loop_thread, async_thread = worker.loop_ident.remote().result(timeout_s=10)
    assert loop_thread == async_thread  # async methods run on the replica's loop thread
    responses = [worker.in_pool.remote() for _ in range(6)]
    idents = [r.result(timeout_s=20) for r in responses]
    assert len(set(idents)) == 3  # up to max_ongoing_requests threads, each call in one of them
    assert loop_thread not in idents
    assert worker.sync_peak.remote().result(timeout_s=10) == 3


def test_async_init(deploy: Any, app_name: str) -> None:
    handle = deploy(AsyncInit.bind("constructed"), app_name)
    assert handle.remote().result(timeout_s=10) == "constructed"


def test_reconfigure_runs_before_traffic(deploy: Any, app_name: str) -> None:
    handle = deploy(Configured.bind(), app_name)
    assert handle.remote().result(timeout_s=10) == ("hello", [{"greeting": "hello"}])


def test_async_reconfigure_runs_before_traffic(deploy: Any, app_name: str) -> None:
    handle = deploy(AsyncConfigured.bind(), app_name)
    assert handle.remote().result(timeout_s=10) == 1


def test_user_exception_keeps_its_type_and_remote_traceback(worker: DeploymentHandle) -> None:
    pid = worker.pid.remote().result(timeout_s=10)
    with pytest.raises(ValueError) as info:
        worker.fail.remote("bad input 42").result(timeout_s=10)
    text = str(info.value)
    assert "bad input 42" in text
    assert "Traceback (most recent call last)" in text
    assert ", in fail\n" in text  # the replica's frame of the user method
    assert text.rstrip().endswith("ValueError: bad input 42")
    assert info.value.args == ("bad input 42",)
    # The replica keeps serving, in the same process.
    assert worker.pid.remote().result(timeout_s=10) == pid


def test_custom_exception_type_and_attributes(worker: DeploymentHandle) -> None:
    with pytest.raises(CustomError) as info:
        worker.fail_async.remote(7).result(timeout_s=10)
    assert info.value.code == 7
    assert "custom failure 7" in str(info.value)
    assert "in fail_async" in str(info.value)


def test_unknown_method(worker: DeploymentHandle) -> None:
    with pytest.raises(RayServeException) as info:
        worker.no_such_method.remote().result(timeout_s=10)
    message = str(info.value)
    assert "'no_such_method'" in message
    assert "Worker" in message
    assert worker.pid.remote().result(timeout_s=10) > 0


def test_unserializable_positional_argument_fails_at_remote(worker: DeploymentHandle) -> None:
    with pytest.raises(TypeError, match=r"Positional argument 1 \(lock\)"):
        worker.takes.remote(1, threading.Lock())


def test_unserializable_keyword_argument_fails_at_remote(worker: DeploymentHandle) -> None:
    with pytest.raises(TypeError, match=r"Keyword argument 'guard' \(lock\)"):
        worker.takes.remote(1, guard=threading.Lock())
    assert worker.takes.remote(1, guard="fine").result(timeout_s=10) == 2


def test_unserializable_return_value_fails_the_call(worker: DeploymentHandle) -> None:
    pid = worker.pid.remote().result(timeout_s=10)
    with pytest.raises(TypeError, match="could not be serialized"):
        worker.returns_lock.remote().result(timeout_s=10)
    assert worker.pid.remote().result(timeout_s=10) == pid


def test_unpicklable_exception_still_reaches_the_caller(worker: DeploymentHandle) -> None:
    with pytest.raises(Exception) as info:
        worker.fail_unpicklable.remote().result(timeout_s=10)
    assert isinstance(info.value, (RuntimeError, RayServeException))
    assert "carries a lock" in str(info.value)
    assert "fail_unpicklable" in str(info.value)

"""DeploymentHandle, DeploymentResponse and DeploymentResponseGenerator against real replicas."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shoal import serve
from shoal.serve.exceptions import RayServeException, RequestCancelledError
from shoal.serve.handle import (
    DeploymentHandle,
    DeploymentResponse,
    DeploymentResponseGenerator,
)

pytestmark = pytest.mark.timeout(30)


@serve.deployment(max_ongoing_requests=50)
class Probe:
    """Methods the tests drive. Named events (``key``) are gates, 'started' and 'cancelled'
    markers, so a test waits on what happened in the replica instead of sleeping."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], asyncio.Event] = {}

    def _event(self, kind: str, key: str) -> asyncio.Event:
        return self.events.setdefault((kind, key), asyncio.Event())

    def __call__(self, x: Any = None) -> Any:
        return ("call", x)

    def one(self) -> int:
        return 1

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def echo(self, x: Any) -> Any:
        return x

    async def open(self, key: str) -> None:
        self._event("gate", key).set()

    async def wait_gate(self, key: str, value: Any = None) -> Any:
        self._event("started", key).set()
        await self._event("gate", key).wait()
        return value

    async def wait_started(self, key: str) -> None:
        await self._event("started", key).wait()

    async def hang(self, key: str) -> None:
        self._event("started", key).set()
        try:
            await asyncio.sleep(30)  # the work that gets cancelled
        except asyncio.CancelledError:
            self._event("cancelled", key).set()
            raise

    async def wait_cancelled(self, key: str) -> bool:
        await self._event("cancelled", key).wait()
        return True

    async def gated_numbers(self, key: str, n: int) -> AsyncIterator[int]:
        yield 0
        await self._event("gate", key).wait()
        for i in range(1, n):
            yield i

    def sync_numbers(self, n: int) -> Iterator[int]:
        for i in range(n):
            yield i


@serve.deployment
class Leaf:
    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self) -> str:
        return self.label


@serve.deployment
class Hub:
    """Holds handles given in ``.bind()``: directly, inside a list and inside a dict."""

    def __init__(
        self, direct: DeploymentHandle, in_list: list[DeploymentHandle], in_dict: dict[str, DeploymentHandle]
    ) -> None:
        self.direct = direct
        self.in_list = in_list
        self.in_dict = in_dict

    async def __call__(self) -> list[str]:
        handles = [self.direct, *self.in_list, *self.in_dict.values()]
        assert all(isinstance(h, DeploymentHandle) for h in handles)
        return list(await asyncio.gather(*[h.remote() for h in handles]))

    async def call(self, handle: DeploymentHandle, *args: Any) -> Any:
        return await handle.remote(*args)


@pytest.fixture(scope="module")
def probe(serve_instance: Any) -> Iterator[DeploymentHandle]:
    handle = serve.run(Probe.bind(), name="handles_probe", route_prefix=None)
    yield handle
    serve.delete("handles_probe")


def _key() -> str:
    return uuid.uuid4().hex


def test_remote_returns_at_once(probe: DeploymentHandle) -> None:
    key = _key()
    response = probe.wait_gate.remote(key, "done")
    assert isinstance(response, DeploymentResponse)
    # Had remote() waited for the call to finish, the gate could never be opened.
    probe.open.remote(key).result(timeout_s=10)
    assert response.result(timeout_s=10) == "done"


def test_result_timeout(probe: DeploymentHandle) -> None:
    key = _key()
    response = probe.wait_gate.remote(key, "late")
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.2)
    # The call goes on after a timeout.
    probe.open.remote(key).result(timeout_s=10)
    assert response.result(timeout_s=10) == "late"


def test_result_inside_a_running_loop_raises(probe: DeploymentHandle) -> None:
    async def main() -> int:
        response = probe.one.remote()
        with pytest.raises(RuntimeError, match="should not be called from within an `asyncio` event loop"):
            response.result()
        return await response

    assert asyncio.run(main()) == 1


def test_await_from_async_driver_code(probe: DeploymentHandle) -> None:
    async def main() -> list[int]:
        single = await probe.add.remote(40, 2)
        many = await asyncio.gather(*[probe.add.remote(i, 1) for i in range(10)])
        return [single, *many]

    assert asyncio.run(main()) == [42, *range(1, 11)]


def test_method_attribute_and_method_name_option(probe: DeploymentHandle) -> None:
    assert probe.remote(7).result(timeout_s=10) == ("call", 7)
    assert probe.add.remote(1, b=2).result(timeout_s=10) == 3
    assert probe.options(method_name="add").remote(2, 3).result(timeout_s=10) == 5
    assert probe.options(method_name="echo").remote([1, (2,)]).result(timeout_s=10) == [1, (2,)]


def test_cancel(probe: DeploymentHandle) -> None:
    key = _key()
    response = probe.hang.remote(key)
    probe.wait_started.remote(key).result(timeout_s=10)
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)
    # The replica's coroutine saw CancelledError.
    assert probe.wait_cancelled.remote(key).result(timeout_s=10) is True


def test_cancelling_an_awaiting_task_cancels_the_call(probe: DeploymentHandle) -> None:
    key = _key()

    async def main() -> None:
        task = asyncio.ensure_future(probe.hang.remote(key))
        await probe.wait_started.remote(key)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await probe.wait_cancelled.remote(key) is True

    asyncio.run(main())


def test_cancel_before_it_is_sent_or_after_it_finished(probe: DeploymentHandle) -> None:
    done = probe.one.remote()
    assert done.result(timeout_s=10) == 1
    done.cancel()  # a no-op on a finished call
    assert done.result(timeout_s=10) == 1


def test_response_as_top_level_argument_is_resolved(probe: DeploymentHandle) -> None:
    assert probe.add.remote(probe.one.remote(), b=probe.add.remote(2, 3)).result(timeout_s=10) == 6
    assert probe.echo.remote(probe.echo.remote([1, 2])).result(timeout_s=10) == [1, 2]


@pytest.mark.parametrize("wrap", [lambda r: [r], lambda r: {"r": r}], ids=["list", "dict"])
def test_response_nested_in_an_argument_raises(probe: DeploymentHandle, wrap: Any) -> None:
    inner = probe.one.remote()
    with pytest.raises(RayServeException, match="only pass `DeploymentResponse` objects as top level arguments"):
        probe.echo.remote(wrap(inner)).result(timeout_s=10)
    assert inner.result(timeout_s=10) == 1


def test_stream_with_for_yields_items_as_they_come(probe: DeploymentHandle) -> None:
    key = _key()
    gen = probe.options(stream=True).gated_numbers.remote(key, 4)
    assert isinstance(gen, DeploymentResponseGenerator)
    it = iter(gen)
    # The generator cannot finish before the gate opens, and the gate opens only after the
    # first item arrived here.
    assert next(it) == 0
    probe.open.remote(key).result(timeout_s=10)
    assert list(it) == [1, 2, 3]


def test_stream_with_async_for_yields_items_as_they_come(probe: DeploymentHandle) -> None:
    key = _key()

    async def main() -> list[int]:
        items = []
        async for item in probe.options(stream=True).gated_numbers.remote(key, 3):
            items.append(item)
            if item == 0:
                await probe.open.remote(key)
        return items

    assert asyncio.run(main()) == [0, 1, 2]


def test_stream_of_a_sync_generator(probe: DeploymentHandle) -> None:
    assert list(probe.options(stream=True).sync_numbers.remote(5)) == [0, 1, 2, 3, 4]
    assert list(probe.options(stream=True).sync_numbers.remote(0)) == []


@pytest.mark.parametrize("method", ["sync_numbers", "gated_numbers"])
def test_calling_a_generator_without_stream_raises_type_error(probe: DeploymentHandle, method: str) -> None:
    args = (3,) if method == "sync_numbers" else (_key(), 3)
    with pytest.raises(TypeError, match=r"stream=True"):
        getattr(probe, method).remote(*args).result(timeout_s=10)


def test_remote_from_many_threads(probe: DeploymentHandle) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker(base: int) -> None:
        values = [probe.add.remote(base, i).result(timeout_s=10) for i in range(20)]
        with lock:
            results.extend(values)

    threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == sorted(1000 * t + i for t in range(4) for i in range(20))


@pytest.mark.timeout(60)
def test_handles_bound_into_another_deployment(serve_instance: Any) -> None:
    app = Hub.bind(
        Leaf.options(name="Direct").bind("direct"),
        [Leaf.options(name="InList").bind("in-list")],
        {"d": Leaf.options(name="InDict").bind("in-dict")},
    )
    try:
        hub = serve.run(app, name="handles_hub", route_prefix=None)
        assert hub.remote().result(timeout_s=10) == ["direct", "in-list", "in-dict"]
        # A handle passed as a call argument works inside the replica too.
        other = serve.get_deployment_handle("InDict", "handles_hub")
        assert hub.call.remote(other).result(timeout_s=10) == "in-dict"
    finally:
        serve.delete("handles_hub")

"""``serve.run(app, _local_testing_mode=True)``: everything in-process, no child processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from helpers import live_children

from shoal import serve
from shoal.serve.exceptions import RequestCancelledError
from shoal.serve.handle import DeploymentHandle, DeploymentResponse

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", autouse=True)
def local_mode_only() -> Iterator[None]:
    assert not live_children()
    yield
    serve.shutdown()
    assert not live_children()


@serve.deployment
class Adder:
    def __init__(self, amount: int) -> None:
        self.amount = amount

    def __call__(self, x: int) -> int:
        return x + self.amount

    async def numbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    def squares(self, n: int) -> Iterator[int]:
        for i in range(n):
            yield i * i

    async def forever(self) -> None:
        await asyncio.sleep(30)


@serve.deployment
class Composer:
    def __init__(self, first: DeploymentHandle, others: list[DeploymentHandle]) -> None:
        self.first = first
        self.others = others

    async def __call__(self, x: int) -> int:
        x = await self.first.remote(x)
        for other in self.others:
            x = await other.remote(x)
        return x

    async def chained(self, x: int) -> int:
        # A DeploymentResponse passed straight into another call.
        return await self.others[0].remote(self.first.remote(x))


def test_handle_calls_run_in_process_without_child_processes(no_processes: None) -> None:
    handle = serve.run(Adder.bind(10), name="local_adder", _local_testing_mode=True)
    assert isinstance(handle, DeploymentHandle)
    response = handle.remote(5)
    assert isinstance(response, DeploymentResponse)
    assert response.result(timeout_s=10) == 15
    assert not live_children()


def test_composition(no_processes: None) -> None:
    app = Composer.bind(Adder.bind(1), [Adder.options(name="Plus100").bind(100)])
    handle = serve.run(app, name="local_composer", _local_testing_mode=True)
    assert handle.remote(0).result(timeout_s=10) == 101
    assert handle.chained.remote(0).result(timeout_s=10) == 101


def test_streaming(no_processes: None) -> None:
    handle = serve.run(Adder.bind(0), name="local_stream", _local_testing_mode=True)
    assert list(handle.options(stream=True).numbers.remote(4)) == [0, 1, 2, 3]
    assert list(handle.options(stream=True).squares.remote(4)) == [0, 1, 4, 9]

    async def consume() -> list[int]:
        return [i async for i in handle.options(stream=True).numbers.remote(3)]

    assert asyncio.run(consume()) == [0, 1, 2]


def test_await_and_cancel(no_processes: None) -> None:
    handle = serve.run(Adder.bind(2), name="local_async", _local_testing_mode=True)

    async def main() -> int:
        return await handle.remote(1)

    assert asyncio.run(main()) == 3
    pending = handle.forever.remote()
    pending.cancel()
    with pytest.raises(RequestCancelledError):
        pending.result(timeout_s=10)


def test_user_exception_keeps_its_type(no_processes: None) -> None:
    handle = serve.run(Adder.bind(1), name="local_error", _local_testing_mode=True)
    with pytest.raises(TypeError):
        handle.remote("not a number").result(timeout_s=10)
    assert handle.remote(1).result(timeout_s=10) == 2

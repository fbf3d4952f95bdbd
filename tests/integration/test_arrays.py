"""Arrays and large buffers through real handles: driver -> replica, replica -> replica, results
and streamed items; as frames (below ``shm.THRESHOLD_BYTES``) and through shared memory (above),
and no segment is left behind after success, error or cancellation."""

from __future__ import annotations

import os
from typing import Any

import pytest
from helpers import wait_until

from shoal import serve
from shoal.runtime import shm
from shoal.serve.exceptions import RequestCancelledError

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
SIZES = [64 * 1024, MIB, shm.THRESHOLD_BYTES + MIB]  # frames of their own (the smallest out of band), segment


def segments_left() -> list[str]:
    """The segments in the instance's directory (spare files, allocated ahead, are not ones)."""
    directory = shm.directory()
    assert directory is not None, "the driver found no segment directory"
    return [n for n in os.listdir(directory) if shm.SPARE not in n]


def no_segments_left() -> None:
    wait_until(lambda: not segments_left(), 15, "every segment removed")


@serve.deployment(max_ongoing_requests=20)
class Arrays:
    def __init__(self, gate: Any = None) -> None:
        self.gate = gate

    async def echo(self, x: Any) -> Any:
        return x

    def echo_sync(self, x: Any) -> Any:
        return x

    async def describe(self, x: Any) -> Any:
        return [type(x).__name__, len(x) if not hasattr(x, "shape") else list(x.shape), bool(getattr(x, "flags", None) and x.flags.writeable)]

    async def doubled(self, x: Any) -> Any:
        return x * 2

    async def pieces(self, n: int, nbytes: int) -> Any:
        for i in range(n):
            yield np.full(nbytes // 4, i, dtype=np.float32)

    async def fail(self, x: Any) -> None:
        raise ValueError(f"refused {x.nbytes} bytes")

    async def hold(self, x: Any, key: str) -> float:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return float(x[0])


@serve.deployment
class Outer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, x: Any) -> Any:
        doubled = await self.inner.doubled.remote(x)
        return np.concatenate([doubled, await self.inner.echo.remote(x)])


@pytest.fixture(scope="module")
def arrays(serve_instance: Any, gate: Any) -> Any:
    handle = serve.run(Arrays.bind(gate), name="arrays", route_prefix=None)
    yield handle
    serve.delete("arrays")


@pytest.mark.parametrize("nbytes", SIZES)
def test_an_array_goes_to_a_replica_and_back(arrays: Any, nbytes: int) -> None:
    array = np.random.default_rng(1).random(nbytes // 4, dtype=np.float32)
    for method in ("echo", "echo_sync"):
        back = getattr(arrays, method).remote(array).result(timeout_s=30)
        assert back.dtype == np.float32 and np.array_equal(back, array)
        assert not back.flags.writeable  # read-only, as Ray Serve's
    assert arrays.describe.remote(array).result(timeout_s=30) == ["ndarray", [nbytes // 4], False]
    assert np.array_equal(arrays.doubled.remote(array).result(timeout_s=30), array * 2)
    no_segments_left()


@pytest.mark.parametrize("nbytes", SIZES)
def test_buffers_keep_their_types(arrays: Any, nbytes: int) -> None:
    raw = os.urandom(nbytes)
    assert arrays.echo.remote(raw).result(timeout_s=30) == raw
    back = arrays.echo.remote(bytearray(raw)).result(timeout_s=30)
    assert type(back) is bytearray and back == raw
    view = arrays.echo.remote(memoryview(raw)).result(timeout_s=30)
    assert type(view) is memoryview and view.tobytes() == raw
    nested = arrays.echo.remote({"a": [np.frombuffer(raw, np.uint8)], "b": (raw, 1)}).result(timeout_s=30)
    assert nested["a"][0].tobytes() == raw and nested["b"] == (raw, 1)
    no_segments_left()


def test_the_same_array_twice_in_one_call(arrays: Any) -> None:
    array = np.ones(shm.THRESHOLD_BYTES // 8)
    back = arrays.echo.remote({"x": array, "y": array}).result(timeout_s=30)
    assert back["x"] is back["y"] and np.array_equal(back["x"], array)
    no_segments_left()


@pytest.mark.parametrize("nbytes", SIZES)
def test_a_replica_passes_arrays_to_another(serve_instance: Any, nbytes: int) -> None:
    handle = serve.run(Outer.bind(Arrays.bind()), name="outer", route_prefix=None)
    try:
        array = np.arange(nbytes // 4, dtype=np.float32)
        back = handle.remote(array).result(timeout_s=30)
        assert np.array_equal(back, np.concatenate([array * 2, array]))
    finally:
        serve.delete("outer")
    no_segments_left()


@pytest.mark.parametrize("nbytes", SIZES)
def test_streamed_items_are_arrays(arrays: Any, nbytes: int) -> None:
    items = list(arrays.options(method_name="pieces", stream=True).remote(4, nbytes))
    assert [float(item[0]) for item in items] == [0.0, 1.0, 2.0, 3.0]
    assert all(item.nbytes == nbytes // 4 * 4 for item in items)
    no_segments_left()


@pytest.mark.parametrize("nbytes", SIZES)
def test_an_error_leaves_no_segment(arrays: Any, nbytes: int) -> None:
    with pytest.raises(ValueError, match=f"refused {nbytes} bytes"):
        arrays.fail.remote(np.zeros(nbytes, dtype=np.uint8)).result(timeout_s=30)
    no_segments_left()


def test_a_cancelled_call_leaves_no_segment(arrays: Any, gate: Any) -> None:
    array = np.arange(shm.THRESHOLD_BYTES // 4, dtype=np.float32)
    response = arrays.hold.remote(array, "cancel-me")
    gate.arrived.remote("cancel-me").result(timeout_s=30)  # the replica has mapped it
    assert segments_left()
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=30)
    no_segments_left()
    gate.open.remote("cancel-me").result(timeout_s=30)


def test_results_outlive_their_segments(arrays: Any) -> None:
    arrays_back = [arrays.doubled.remote(np.full(shm.THRESHOLD_BYTES // 4, i, np.float32)).result(timeout_s=30) for i in range(3)]
    no_segments_left()  # the files are gone; the mappings stay while the arrays live
    assert [float(a[-1]) for a in arrays_back] == [0.0, 2.0, 4.0]

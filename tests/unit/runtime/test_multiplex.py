"""``@serve.multiplexed``: Ray's validation, the per-replica LRU cache, one load per model, and
what is reported to routers. Pure asyncio: no processes."""

from __future__ import annotations

import asyncio
import re

import pytest
from inproc import run

from shoal import serve
from shoal.runtime import request_router_report
from shoal.runtime.context import RequestContext, reset_request, set_request

pytestmark = pytest.mark.timeout(30)


def test_the_decorator_validates_as_rays_does() -> None:
    with pytest.raises(TypeError, match=re.escape("@serve.multiplexed can only be used to decorate async functions or methods.")):
        serve.multiplexed(lambda model_id: model_id)
    with pytest.raises(TypeError, match="at least one 'model_id: str' argument"):

        @serve.multiplexed
        async def no_args() -> None: ...

    with pytest.raises(TypeError, match=re.escape("max_num_models_per_replica must be an integer.")):
        serve.multiplexed(max_num_models_per_replica="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("max_num_models_per_replica must be positive.")):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="async functions"):

        @serve.multiplexed(max_num_models_per_replica=2)
        def sync_loader(model_id: str) -> str:
            return model_id

    serve.multiplexed(max_num_models_per_replica=-1)  # unlimited


class Model:
    def __init__(self, model_id: str, events: list[str]) -> None:
        self.model_id, self.events = model_id, events

    async def __del__(self) -> None:  # async: awaited by the cache
        self.events.append(f"del {self.model_id}")


def test_concurrent_requests_load_a_model_once_and_the_lru_one_is_unloaded() -> None:
    class Deployment:
        def __init__(self) -> None:
            self.events: list[str] = []
            self.release = asyncio.Event()

        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> Model:
            self.events.append(f"load {model_id}")
            await self.release.wait()
            return Model(model_id, self.events)

    async def main() -> None:
        d = Deployment()
        loads = [asyncio.ensure_future(d.get_model("a")) for _ in range(5)]
        await asyncio.sleep(0)
        assert request_router_report.current() is not None
        assert "a" in request_router_report.current().ids  # reported while loading
        d.release.set()
        models = await asyncio.gather(*loads)
        assert {id(m) for m in models} == {id(models[0])} and d.events == ["load a"]
        await d.get_model("b")
        await d.get_model("a")  # a is the most recently used now
        await d.get_model("c")  # evicts b
        assert d.events == ["load a", "load b", "del b", "load c"]  # unloaded before c loads
        assert set(request_router_report.current().ids) >= {"a", "c"}
        assert "b" not in request_router_report.current().ids
        with pytest.raises(ValueError, match=re.escape("The model ID cannot be empty.")):
            await d.get_model("")
        with pytest.raises(TypeError, match=re.escape("The model ID must be a string.")):
            await d.get_model(3)  # type: ignore[arg-type]
        await request_router_report.shutdown()  # what a stopping replica does: unload the rest
        assert sorted(d.events[4:]) == ["del a", "del c"]

    run(main)


def test_a_function_loader_and_the_request_model_id() -> None:
    loaded: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> str:
        loaded.append(model_id)
        return model_id.upper()

    async def main() -> None:
        token = set_request(RequestContext(multiplexed_model_id="m7"))
        try:
            assert serve.get_multiplexed_model_id() == "m7"
            assert await load(serve.get_multiplexed_model_id()) == "M7"
        finally:
            reset_request(token)
        assert serve.get_multiplexed_model_id() == ""
        assert await load("m7") == "M7" and await load("m8") == "M8"
        assert loaded == ["m7", "m8"]
        with pytest.raises(TypeError, match="more than one arguments"):
            await load("a", "b")

    run(main)


def test_a_failed_load_is_not_cached_and_not_reported() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.fail = True

        @serve.multiplexed
        async def get_model(self, model_id: str) -> str:
            if self.fail:
                raise RuntimeError("download failed")
            return model_id

    async def main() -> None:
        flaky = Flaky()
        with pytest.raises(RuntimeError, match="download failed"):
            await flaky.get_model("z")
        current = request_router_report.current()
        assert current is None or "z" not in current.ids
        flaky.fail = False
        assert await flaky.get_model("z") == "z"

    run(main)


def test_metrics_count_requests_loads_failed_loads_and_unloads() -> None:
    """Ray's semantics: every valid call is a get-model request; a load is counted when it
    starts (a failed one too) and timed when it succeeds; an unload is counted and timed whether
    or not the model has a ``__del__``."""
    from shoal.serve import multiplex

    class Loader:
        @serve.multiplexed(max_num_models_per_replica=1)
        async def get(self, model_id: str) -> object:
            if model_id == "bad":
                raise RuntimeError("cannot load")
            return object()  # no __del__

    def counts() -> dict[str, float]:
        m = multiplex._process_metrics()
        return {
            "requests": m.get_model_requests._value.get(), "loads": m.loads._value.get(),
            "unloads": m.unloads._value.get(),
            "load_n": sum(b.get() for b in m.load_latency_ms._buckets),
            "unload_n": sum(b.get() for b in m.unload_latency_ms._buckets),
        }

    async def main() -> None:
        loader = Loader()
        await loader.get("warm-up")  # makes the process's metrics
        before = counts()
        await loader.get("a")  # evicts warm-up
        await loader.get("a")  # a hit
        with pytest.raises(RuntimeError):
            await loader.get("bad")  # evicts a, then fails
        with pytest.raises(ValueError):
            await loader.get("")  # not a request
        after = counts()
        assert {k: after[k] - before[k] for k in ("requests", "loads", "unloads", "load_n", "unload_n")} == {
            "requests": 3, "loads": 2, "unloads": 2, "load_n": 1, "unload_n": 2,
        }
        m = multiplex._process_metrics()
        assert m.registered_model.bind({"model_id": "a"})._value.get() == 0
        assert m.num_models._value.get() == sum(len(h.models) for h in multiplex._holders)  # every cache here
        await multiplex.shutdown_all()

    run(main)

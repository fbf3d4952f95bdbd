"""Model multiplexing: ``@serve.multiplexed`` and ``serve.get_multiplexed_model_id()``.

A replica serving many models keeps the most recently used ones loaded. The decorated async
loader takes a model id and returns the model; each replica (each instance of the deployment's
class, or the process for a function) keeps an LRU cache of at most
``max_num_models_per_replica`` models (``-1``: no limit). A cache hit marks the model most
recently used; a miss loads it, first unloading the least recently used model when the cache is
full (its ``__del__`` is called, awaited if it is ``async def``, run in a thread otherwise).
Loads and unloads happen one at a time, so concurrent requests for one model load it once.

Every change of the models held (loading included) is reported to request routers
(``shoal.runtime.request_router_report``), which then send requests for a model to a replica
that holds it.

Metrics (Ray's names; inside a replica labelled with its ``deployment``/``replica``/``application``):
``ray_serve_multiplexed_get_model_requests_counter_total`` (every call with a valid model id),
``ray_serve_multiplexed_models_load_counter_total`` (loads started, failed ones included) and
``ray_serve_multiplexed_model_load_latency_ms`` (loads that succeeded),
``ray_serve_multiplexed_models_unload_counter_total`` and
``ray_serve_multiplexed_model_unload_latency_ms`` (``__del__`` included), and the gauges
``ray_serve_num_multiplexed_models`` (models loaded in this process) and
``ray_serve_registered_multiplexed_model_id`` {model_id} (1 while loaded, 0 once unloaded). Ray
sets the two gauges every second; here they change when the models do.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from shoal.runtime import request_router_report
from shoal.runtime.context import current_request
from shoal.runtime.metrics import LATENCY_BUCKETS_MS
from shoal.serve import metrics as serve_metrics

__all__ = ["get_multiplexed_model_id", "multiplexed"]

logger = logging.getLogger("shoal.serve")

F = TypeVar("F", bound=Callable[..., Any])

_WRAPPER_ATTR = "__serve_multiplex_wrapper"
_holders: weakref.WeakSet[_ModelMultiplexWrapper] = weakref.WeakSet()  # every cache in this process


class _MultiplexMetrics:
    """This process's multiplexing metrics (made at the first cache; in a replica, with its tags)."""

    def __init__(self) -> None:
        # Ray Serve 2.60's MODEL_LOAD_LATENCY_BUCKETS_MS are its request latency buckets.
        self.load_latency_ms = serve_metrics.Histogram(
            "serve_multiplexed_model_load_latency_ms", description="The time it takes to load a model.",
            boundaries=LATENCY_BUCKETS_MS,
        ).bind()
        self.unload_latency_ms = serve_metrics.Histogram(
            "serve_multiplexed_model_unload_latency_ms", description="The time it takes to unload a model.",
            boundaries=LATENCY_BUCKETS_MS,
        ).bind()
        self.num_models = serve_metrics.Gauge(
            "serve_num_multiplexed_models", description="The number of models loaded on the current replica.",
        ).bind()
        self.registered_model = serve_metrics.Gauge(
            "serve_registered_multiplexed_model_id", description="The model id registered on the current replica.",
            tag_keys=("model_id",),
        )
        self.get_model_requests = serve_metrics.Counter(
            "serve_multiplexed_get_model_requests_counter",
            description="The counter for get model requests on the current replica.",
        ).bind()
        self.unloads = serve_metrics.Counter(
            "serve_multiplexed_models_unload_counter",
            description="The counter for unloaded models on the current replica.",
        ).bind()
        self.loads = serve_metrics.Counter(
            "serve_multiplexed_models_load_counter", description="The counter for loaded models on the current replica.",
        ).bind()

    def held(self, model_id: str, loaded: bool) -> None:
        """``model_id`` was loaded (or unloaded): set both gauges."""
        self.registered_model.bind({"model_id": model_id}).set(1 if loaded else 0)
        self.num_models.set(sum(len(h.models) for h in _holders))


_metrics: _MultiplexMetrics | None = None


def _process_metrics() -> _MultiplexMetrics:
    global _metrics
    if _metrics is None:
        _metrics = _MultiplexMetrics()
    return _metrics


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the current request (``""`` if it has none)."""
    return current_request().multiplexed_model_id


class _ModelMultiplexWrapper:
    """One LRU cache of loaded models (see the module docstring)."""

    def __init__(self, load: Callable[..., Coroutine[Any, Any, Any]], self_arg: Any, max_num_models_per_replica: int) -> None:
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._load = load
        self._self_arg = self_arg
        self.max_num_models_per_replica = max_num_models_per_replica
        self._lock = asyncio.Lock()
        self._loading: set[str] = set()
        self.metrics = _process_metrics()
        _holders.add(self)
        request_router_report.on_shutdown(shutdown_all)

    def model_ids(self) -> set[str]:
        """Models loaded or being loaded (routers may send their requests here already)."""
        return set(self.models) | self._loading

    async def load_model(self, model_id: str) -> Any:
        if not isinstance(model_id, str):
            raise TypeError("The model ID must be a string.")
        if not model_id:
            raise ValueError("The model ID cannot be empty.")
        self.metrics.get_model_requests.inc()
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        self._loading.add(model_id)
        _report()
        try:
            async with self._lock:
                if model_id in self.models:  # loaded by a request that held the lock before us
                    self.models.move_to_end(model_id)
                    return self.models[model_id]
                if 0 < self.max_num_models_per_replica <= len(self.models):
                    await self.unload_model_lru()
                logger.debug("loading model '%s'", model_id)
                self.metrics.loads.inc()
                started_s = time.perf_counter()
                if self._self_arg is None:
                    model = await self._load(model_id)
                else:
                    model = await self._load(self._self_arg, model_id)
                self.metrics.load_latency_ms.observe((time.perf_counter() - started_s) * 1000)
                self.models[model_id] = model
                self.metrics.held(model_id, loaded=True)
                return model
        except Exception:
            logger.exception("Failed to load model '%s'.", model_id)
            raise
        finally:
            self._loading.discard(model_id)
            _report()

    async def unload_model_lru(self) -> None:
        """Unload the least recently used model, calling its ``__del__``."""
        self.metrics.unloads.inc()
        started_s = time.perf_counter()
        model_id, model = self.models.popitem(last=False)
        _report()
        logger.debug("unloading model '%s'", model_id)
        try:
            finalizer = getattr(model, "__del__", None)
            if finalizer is not None:
                if inspect.iscoroutinefunction(finalizer):
                    await finalizer()
                else:
                    await asyncio.get_running_loop().run_in_executor(None, finalizer)
                _disarm(model)
            self.metrics.unload_latency_ms.observe((time.perf_counter() - started_s) * 1000)
        finally:
            self.metrics.held(model_id, loaded=False)

    async def shutdown(self) -> None:
        """Unload every model (the replica is stopping)."""
        while self.models:
            try:
                await self.unload_model_lru()
            except Exception:
                logger.exception("Failed to unload a model.")


_DISARMED: dict[type, type] = {}


def _disarm(model: Any) -> None:
    """Keep the garbage collector from calling ``model.__del__`` a second time (an async one
    would then never be awaited): the model becomes an instance of a subclass whose
    ``__del__`` does nothing. Left as it is if its class cannot be swapped."""
    cls = type(model)
    try:
        unloaded = _DISARMED.get(cls)
        if unloaded is None:
            namespace = {"__del__": lambda self: None, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
            unloaded = _DISARMED[cls] = type(cls.__name__, (cls,), namespace)
        model.__class__ = unloaded
    except Exception:
        pass


def _report() -> None:
    request_router_report.set_model_ids(set().union(*(h.model_ids() for h in _holders)))


async def shutdown_all() -> None:
    """Unload the models of every cache in this process (a replica shutting down)."""
    for holder in list(_holders):
        await holder.shutdown()


def _check_loader(func: Any) -> None:
    if not callable(func):
        raise TypeError("The `multiplexed` decorator must be used with a function or method.")
    if not inspect.iscoroutinefunction(func):
        raise TypeError("@serve.multiplexed can only be used to decorate async functions or methods.")
    if not 1 <= len(inspect.signature(func).parameters) <= 2:
        raise TypeError(
            "@serve.multiplexed can only be used to decorate functions or methods with at least one "
            "'model_id: str' argument."
        )


def _self_of(args: tuple[Any, ...], func: Callable[..., Any]) -> Any:
    """``args[0]`` if this is a call of ``func`` as a method of it, else None."""
    if args:
        method = getattr(args[0], func.__name__, None)
        if method is not None and getattr(method, "__wrapped__", None) is func:
            return args[0]
    return None


def multiplexed(func: Any = None, max_num_models_per_replica: int = 3) -> Any:
    """Make an async model loader (function or method taking one ``model_id: str``) a per-replica
    LRU cache of at most ``max_num_models_per_replica`` models (``-1``: unlimited)."""
    if func is not None:
        _check_loader(func)
    if isinstance(max_num_models_per_replica, bool) or not isinstance(max_num_models_per_replica, int):
        raise TypeError("max_num_models_per_replica must be an integer.")
    if max_num_models_per_replica != -1 and max_num_models_per_replica <= 0:
        raise ValueError("max_num_models_per_replica must be positive.")

    def decorate(loader: F) -> F:
        _check_loader(loader)

        @functools.wraps(loader)
        async def wrapper(*args: Any) -> Any:
            error = "Functions decorated with `@serve.multiplexed` must take exactly one argument, the multiplexed model ID (str), but got {}"
            if not args:
                raise TypeError(error.format("no arguments are provided."))
            self_arg = _self_of(args, loader)
            if len(args) != (1 if self_arg is None else 2):
                raise TypeError(error.format("more than one arguments."))
            owner: Any = loader if self_arg is None else self_arg
            cache = owner.__dict__.get(_WRAPPER_ATTR) if hasattr(owner, "__dict__") else None
            if cache is None:
                cache = _ModelMultiplexWrapper(loader, self_arg, max_num_models_per_replica)
                setattr(owner, _WRAPPER_ATTR, cache)
            return await cache.load_model(args[-1])

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate

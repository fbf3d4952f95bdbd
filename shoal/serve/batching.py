"""``@serve.batch``: callers pass one item each; the decorated function gets them as lists.

Contract (Ray Serve 2.60's ``ray.serve.batching``):

- The decorated function is ``async def``: a coroutine function, which returns one result per
  caller as a list of the same length, or an async generator, which yields such lists and streams
  each caller its own items (``StopIteration`` or ``StopAsyncIteration`` in a caller's slot ends
  that caller's stream). A wrong length, or an exception, fails every caller of that batch; the
  batches after it still run.
- Every argument is batched: a caller passes single values (positionally or by keyword, checked
  against the function's signature when it calls) and the function receives, for each argument
  any caller passed, the list of the callers' values, in the order they arrived. An argument that
  some callers passed and others left to its default gets the default in their slots.
- A batch runs as soon as it is full (``max_batch_size`` items, or ``batch_size_fn(items)``
  reaching ``max_batch_size``; an item that would push it over waits for the next batch, and an
  item bigger than ``max_batch_size`` by itself fails with ``RuntimeError``), or once
  ``batch_wait_timeout_s`` passed since its oldest item arrived, and while fewer than
  ``max_concurrent_batches`` batches of this queue are running. A batch is formed only when it can
  start, so items that arrive while every slot is busy go into the next batch, which is then as
  full as the queue allows.
- Each batch is split by the callers' ``multiplexed_model_id``; the parts run concurrently
  under one of the ``max_concurrent_batches`` slots. Inside the batch function the request
  context (``shoal.runtime.context.current_request()``) carries the part's app name and
  ``multiplexed_model_id``, and ``get_batch_request_contexts()`` returns each caller's request
  context, in the order of the batch (Ray keeps them in ``_serve_batch_request_context``).
- A caller that is cancelled (``DeploymentResponse.cancel()``, an HTTP client that disconnects:
  both cancel the replica's request task) before its batch starts is left out of it; once its
  batch runs, the other callers still get their results and its own is dropped. A streaming
  caller that stops reading is no longer fed; a streaming batch nobody reads any more is closed.
- There is one queue per decorated function and object (``self``), created on the running event
  loop at its first call; settings belong to the decorated function. ``set_max_batch_size`` and
  ``set_batch_wait_timeout_s`` (for example from ``reconfigure``) apply to every queue of the
  function at once, including the batch being formed. A warning is logged when the replica's
  ``max_ongoing_requests`` is below ``max_batch_size * max_concurrent_batches``.

Everything runs on the caller's event loop: no threads.

Metrics (Ray's, each labelled ``function_name``, the decorated function's ``__name__``, plus the
replica's ``deployment``/``replica``/``application`` inside a replica):
``ray_serve_batch_queue_length`` (callers waiting in the queue, the batch being formed included,
set whenever it changes), ``ray_serve_batch_wait_time_ms`` (per batch: from when it could start
forming, a free slot and its first item, to when it was taken), and per batch part that runs
(after the callers cancelled meanwhile are left out): ``ray_serve_actual_batch_size`` (its size,
by ``batch_size_fn`` if given), ``ray_serve_batch_utilization_percent`` (that size over
``max_batch_size``), ``ray_serve_batches_processed_total`` and ``ray_serve_batch_execution_time_ms``
(the batch function's run, to its last item for a generator, failed runs included).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from shoal.runtime import context
from shoal.runtime.context import RequestContext
from shoal.runtime.errors import RayServeException
from shoal.runtime.metrics import LATENCY_BUCKETS_MS
from shoal.serve import metrics as serve_metrics

logger = logging.getLogger("shoal.serve")

F = TypeVar("F", bound=Callable[..., Any])

_STREAM_SENTINELS = (StopIteration, StopAsyncIteration)
_END: Any = object()  # a streaming caller's last future resolves to this: its stream ended

_batch_request_contexts: contextvars.ContextVar[list[RequestContext] | None] = contextvars.ContextVar(
    "shoal_batch_request_contexts", default=None
)


def get_batch_request_contexts() -> list[RequestContext]:
    """The request contexts of the callers of the batch running in this task, in batch order;
    empty outside a batch function."""
    return list(_batch_request_contexts.get() or ())


# -- validation (Ray's types and messages) -------------------------------------------------------


def _validate_max_batch_size(max_batch_size: Any) -> int:
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool):
        if isinstance(max_batch_size, float) and max_batch_size.is_integer():
            max_batch_size = int(max_batch_size)
        else:
            raise TypeError(f"max_batch_size must be integer >= 1, got {max_batch_size}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size}")
    return int(max_batch_size)


def _validate_batch_wait_timeout_s(batch_wait_timeout_s: Any) -> float:
    if not isinstance(batch_wait_timeout_s, (float, int)) or isinstance(batch_wait_timeout_s, bool):
        raise TypeError(f"batch_wait_timeout_s must be a float >= 0, got {batch_wait_timeout_s}")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be a float >= 0, got {batch_wait_timeout_s}")
    return float(batch_wait_timeout_s)


def _validate_max_concurrent_batches(max_concurrent_batches: Any) -> int:
    if (
        not isinstance(max_concurrent_batches, int)
        or isinstance(max_concurrent_batches, bool)
        or max_concurrent_batches < 1
    ):
        raise TypeError(f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches}")
    return max_concurrent_batches


def _validate_batch_size_fn(batch_size_fn: Any) -> None:
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(batch_size_fn)}")


def _replica_max_ongoing_requests() -> int | None:
    """The ``max_ongoing_requests`` of the replica this code runs in; None outside a replica."""
    return context.get_replica_context().max_ongoing_requests if context.in_replica() else None


# -- metrics (Ray's names and buckets) ----------------------------------------------------------

# Ray Serve 2.60's DEFAULT_BATCH_SIZE_BUCKETS and DEFAULT_BATCH_UTILIZATION_BUCKETS_PERCENT.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_UTILIZATION_BUCKETS_PERCENT = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)

_metric_set: _BatchMetricSet | None = None


class _BatchMetricSet:
    """The batching metrics of this process, made at the first queue (in a replica: with its tags)."""

    def __init__(self) -> None:
        keys = ("function_name",)
        self.wait_time_ms = serve_metrics.Histogram(
            "serve_batch_wait_time_ms", description="Time requests waited for batch to fill (in milliseconds).",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=keys,
        )
        self.execution_time_ms = serve_metrics.Histogram(
            "serve_batch_execution_time_ms", description="Time to execute the batch function (in milliseconds).",
            boundaries=LATENCY_BUCKETS_MS, tag_keys=keys,
        )
        self.queue_length = serve_metrics.Gauge(
            "serve_batch_queue_length", description="Number of requests waiting in the batch queue.", tag_keys=keys,
        )
        self.utilization_percent = serve_metrics.Histogram(
            "serve_batch_utilization_percent",
            description="Batch utilization as percentage (actual_batch_size / max_batch_size * 100).",
            boundaries=BATCH_UTILIZATION_BUCKETS_PERCENT, tag_keys=keys,
        )
        self.batch_size = serve_metrics.Histogram(
            "serve_actual_batch_size", description="The actual number of requests in each batch.",
            boundaries=BATCH_SIZE_BUCKETS, tag_keys=keys,
        )
        self.processed = serve_metrics.Counter(
            "serve_batches_processed", description="Counter of batches executed.", tag_keys=keys,
        )


class _BatchMetrics:
    """The label children of one function's batching metrics, bound once per queue."""

    __slots__ = ("batch_size", "execution_time_ms", "processed", "queue_length", "utilization_percent", "wait_time_ms")

    def __init__(self, function_name: str) -> None:
        global _metric_set
        if _metric_set is None:
            _metric_set = _BatchMetricSet()
        tags = {"function_name": function_name}
        self.wait_time_ms = _metric_set.wait_time_ms.bind(tags)
        self.execution_time_ms = _metric_set.execution_time_ms.bind(tags)
        self.queue_length = _metric_set.queue_length.bind(tags)
        self.utilization_percent = _metric_set.utilization_percent.bind(tags)
        self.batch_size = _metric_set.batch_size.bind(tags)
        self.processed = _metric_set.processed.bind(tags)


# -- arguments ------------------------------------------------------------------------------------


class _Arguments:
    """How a batched function's calls are checked and stacked into one call of lists."""

    def __init__(self, func: Callable[..., Any], is_method: bool) -> None:
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if is_method and params and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            params = params[1:]  # self: passed apart, never batched
        self.signature = signature.replace(parameters=params)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name; TypeError if they do not fit the signature."""
        return dict(self.signature.bind(*args, **kwargs).arguments)

    def stack(self, calls: Sequence[dict[str, Any]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One call whose every argument is the list of the callers' values for it."""
        stacked: dict[str, Any] = {}
        for name, param in self.signature.parameters.items():
            if not any(name in call for call in calls):
                continue  # nobody passed it: the function's own default applies
            if param.kind == inspect.Parameter.VAR_POSITIONAL:
                lengths = {len(call.get(name, ())) for call in calls}
                if len(lengths) != 1:
                    raise RayServeException("All batch requests should have the same number of parameters.")
                stacked[name] = tuple(
                    [call.get(name, ())[i] for call in calls] for i in range(lengths.pop())
                )
            elif param.kind == inspect.Parameter.VAR_KEYWORD:
                keys = [tuple(call.get(name, {})) for call in calls]
                if any(set(k) != set(keys[0]) for k in keys):
                    raise RayServeException("All batch requests should have the same number of parameters.")
                stacked[name] = {key: [call[name][key] for call in calls] for key in keys[0]}
            else:
                stacked[name] = [call.get(name, param.default) for call in calls]
        bound = inspect.BoundArguments(self.signature, stacked)
        return bound.args, bound.kwargs


def _first_item(call: dict[str, Any]) -> Any:
    """What ``batch_size_fn`` sees of one call: its first argument (Ray's ``args[0]``)."""
    return next(iter(call.values()), None)


# -- the queue ------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Pending:
    """One caller's item, waiting in a queue or part of a running batch."""

    call: dict[str, Any]
    future: asyncio.Future[Any]
    request: RequestContext
    arrived_at: float  # loop time


class _BatchQueue:
    """The items waiting to be batched for one (function, object) on one event loop.

    A runner task exists while items wait: it takes a slot (one of ``max_concurrent_batches``),
    forms a batch (see the module's docstring), starts it as its own task, and goes on; it ends
    when the queue is empty and starts again at the next ``put``.
    """

    def __init__(self, batcher: _Batcher, self_arg: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.batcher = batcher
        self.self_arg = self_arg
        self.loop = loop
        self._items: deque[_Pending] = deque()
        self._changed = asyncio.Event()  # an item arrived or the settings changed
        self._slots = asyncio.Semaphore(batcher.max_concurrent_batches)
        self._runner: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.metrics = _BatchMetrics(batcher.func.__name__)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, pending: _Pending) -> None:
        self._items.append(pending)
        self.metrics.queue_length.set(len(self._items))
        self._changed.set()
        if self._runner is None or self._runner.done():
            # A fresh context: the batches must not inherit the first caller's request context.
            self._runner = self.loop.create_task(self._run(), context=contextvars.Context())
            self._runner.add_done_callback(self._runner_done)

    def wake(self) -> None:
        """Look again at the batch being formed (the settings changed)."""
        self._changed.set()

    async def _run(self) -> None:
        while self._live():
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = self.loop.create_task(self._execute(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """The runner ended: normally with the queue empty. If it was cancelled (its loop is
        shutting down) or failed, the callers still waiting get that outcome, never a hang."""
        if task.cancelled():
            for pending in self._items:
                pending.future.cancel()
        elif (exc := task.exception()) is not None:
            logger.error("the batch queue of %s failed", self.batcher.func.__qualname__, exc_info=exc)
            for pending in self._items:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            return
        self._items.clear()
        self.metrics.queue_length.set(0)

    def _live(self) -> bool:
        """Drop the items of callers that went away; True if any item still waits."""
        if any(p.future.done() for p in self._items):
            self._items = deque(p for p in self._items if not p.future.done())
            self.metrics.queue_length.set(len(self._items))
        return bool(self._items)

    async def _form_batch(self) -> list[_Pending]:
        """Wait until the items at the head of the queue make a batch (full, or the oldest has
        waited ``batch_wait_timeout_s``) and take them; [] if every caller went away."""
        forming_since = self.loop.time()
        while True:
            if not self._live():
                return []
            count, full = self._fill()
            if count == 0:
                self.metrics.queue_length.set(len(self._items))
                continue  # head items were failed (too big on their own, or batch_size_fn raised)
            wait_s = self._items[0].arrived_at + self.batcher.batch_wait_timeout_s - self.loop.time()
            if full or wait_s <= 0:
                batch = [self._items.popleft() for _ in range(count)]
                self.metrics.queue_length.set(len(self._items))
                now = self.loop.time()
                self.metrics.wait_time_ms.observe((now - max(forming_since, batch[0].arrived_at)) * 1000)
                return batch
            self._changed.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _fill(self) -> tuple[int, bool]:
        """How many head items the next batch takes, and whether that batch is full."""
        max_batch_size = self.batcher.max_batch_size
        size_fn = self.batcher.batch_size_fn
        if size_fn is None:
            return min(len(self._items), max_batch_size), len(self._items) >= max_batch_size
        items: list[Any] = []
        for i, pending in enumerate(self._items):
            items.append(_first_item(pending.call))
            try:
                size = size_fn(items)
            except Exception as exc:  # fails the callers it was asked about, not the queue
                for _ in range(i + 1):
                    self._items.popleft().future.set_exception(exc)
                return 0, False
            if size > max_batch_size:
                if i == 0:
                    self._items.popleft()
                    pending.future.set_exception(
                        RuntimeError(
                            "Size of item is greater than max_batch_size. Please increase the "
                            "max_batch_size or check the implementation of the batch_size_fn."
                        )
                    )
                    return 0, False
                return i, True  # this item waits for the next batch
            if size == max_batch_size:
                return i + 1, True
        return len(items), False

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            parts: dict[str, list[_Pending]] = {}
            for pending in batch:
                parts.setdefault(pending.request.multiplexed_model_id, []).append(pending)
            if len(parts) == 1:
                await self._run_part(batch)
            else:
                # Tasks, not bare coroutines: each part sets its own request context.
                await asyncio.gather(*(self.loop.create_task(self._run_part(part)) for part in parts.values()))
        finally:
            self._slots.release()

    async def _run_part(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # callers cancelled meanwhile
        if not batch:
            return
        self._count_batch(batch)
        started_s = self.loop.time()
        first = batch[0].request
        token = context.set_request(
            RequestContext(app_name=first.app_name, multiplexed_model_id=first.multiplexed_model_id)
        )
        contexts_token = _batch_request_contexts.set([p.request for p in batch])
        try:
            args, kwargs = self.batcher.arguments(self.self_arg is not None).stack([p.call for p in batch])
            if self.self_arg is not None:
                args = (self.self_arg, *args)
            if self.batcher.is_generator:
                await self._stream(self.batcher.func(*args, **kwargs), batch)
            else:
                results = await self.batcher.func(*args, **kwargs)
                _check_length(results, len(batch))
                for pending, result in zip(batch, results):
                    if not pending.future.done():
                        pending.future.set_result(result)
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as exc:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            _batch_request_contexts.reset(contexts_token)
            context.reset_request(token)
            self.metrics.execution_time_ms.observe((self.loop.time() - started_s) * 1000)

    def _count_batch(self, batch: list[_Pending]) -> None:
        """Record a batch (part) about to run: its size (by ``batch_size_fn`` if given; its
        length if that raises) and how full it is."""
        size = len(batch)
        size_fn = self.batcher.batch_size_fn
        if size_fn is not None:
            try:
                size = size_fn([_first_item(p.call) for p in batch])
            except Exception:
                logger.exception("batch_size_fn raised while sizing a batch for metrics")
        self.metrics.utilization_percent.observe(size / self.batcher.max_batch_size * 100)
        self.metrics.batch_size.observe(size)
        self.metrics.processed.inc()

    async def _stream(self, generator: Any, batch: list[_Pending]) -> None:
        """Feed each caller its items from a streaming batch function; each caller's future
        resolves to ``(item, next_future)``, or to ``_END`` when its stream is over."""
        futures: list[asyncio.Future[Any] | None] = [p.future for p in batch]
        try:
            try:
                async for results in generator:
                    _check_length(results, len(batch))
                    for i, result in enumerate(results):
                        future = futures[i]
                        if future is None:
                            continue
                        if future.done():  # the caller stopped reading
                            futures[i] = None
                        elif _ends_stream(result):
                            future.set_result(_END)
                            futures[i] = None
                        else:
                            futures[i] = self.loop.create_future()
                            future.set_result((result, futures[i]))
                    if all(f is None for f in futures):
                        break  # nobody reads any more
            finally:
                await generator.aclose()
        except Exception as exc:
            for future in futures:
                if future is not None and not future.done():
                    future.set_exception(exc)
            return
        for future in futures:
            if future is not None and not future.done():
                future.set_result(_END)


def _ends_stream(result: Any) -> bool:
    """``StopIteration`` or ``StopAsyncIteration`` (the class or an instance) in a caller's slot.
    By identity: an item's own ``==`` (an array's, say) is never called."""
    return any(result is sentinel for sentinel in _STREAM_SENTINELS) or isinstance(result, _STREAM_SENTINELS)


def _check_length(results: Any, expected: int) -> None:
    try:
        length = len(results)
    except TypeError:
        raise TypeError(
            f"Batched function must return a list with one result per request, got {type(results).__name__}."
        ) from None
    if length != expected:
        raise RayServeException(
            "Batched function doesn't preserve batch size. "
            f"The input list has length {expected} but the returned list has length {length}."
        )


# -- the decorated function -----------------------------------------------------------------------


class _Batcher:
    """A decorated function's settings and its queues (one per object it is a method of)."""

    def __init__(
        self,
        func: Callable[..., Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
        batch_size_fn: Callable[[list[Any]], int] | None,
    ) -> None:
        self.func = func
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        self.is_generator = inspect.isasyncgenfunction(func)
        self.wrapper: Callable[..., Any] | None = None
        self._arguments: dict[bool, _Arguments] = {}
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._function_queue: _BatchQueue | None = None
        self._queues: weakref.WeakSet[_BatchQueue] = weakref.WeakSet()
        self._by_id: dict[int, _BatchQueue] = {}  # queues of objects without a __dict__

    # Queues are bound to a running loop: a pickled copy (the deployment shipped to a replica)
    # starts without them.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_function_queue", "_queues", "_by_id", "_arguments"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arguments = {}
        self._reset_runtime()

    def arguments(self, is_method: bool) -> _Arguments:
        """How calls are checked and stacked, for a method (``self`` apart) or a function."""
        found = self._arguments.get(is_method)
        if found is None:
            found = self._arguments[is_method] = _Arguments(self.func, is_method)
        return found

    # -- settings (Ray's setters and getters) ---------------------------------------------------

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Batch up to ``new_max_batch_size`` items from now on, the batch being formed included."""
        self.max_batch_size = _validate_max_batch_size(new_max_batch_size)
        queues = list(self._queues)
        for queue in queues:
            queue.wake()
        if queues:
            self.warn_if_bounded()

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Wait up to ``new_batch_wait_timeout_s`` for a batch to fill, from now on."""
        self.batch_wait_timeout_s = _validate_batch_wait_timeout_s(new_batch_wait_timeout_s)
        for queue in list(self._queues):
            queue.wake()

    def get_max_batch_size(self) -> int:
        return self.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s

    def warn_if_bounded(self) -> None:
        max_ongoing_requests = _replica_max_ongoing_requests()
        if max_ongoing_requests is not None and max_ongoing_requests < self.max_batch_size * self.max_concurrent_batches:
            logger.warning(
                "`max_batch_size` (%d) * `max_concurrent_batches` (%d) is larger than "
                "`max_ongoing_requests` (%d). This means the replica will never achieve the "
                "configured `max_batch_size` concurrently. Please update `max_ongoing_requests` "
                "to be >= `max_batch_size` * `max_concurrent_batches`.",
                self.max_batch_size, self.max_concurrent_batches, max_ongoing_requests,
            )

    # -- calls ----------------------------------------------------------------------------------

    def enqueue(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue one caller's item; its future resolves to the caller's result."""
        self_arg = self._self_of(args)
        is_method = self_arg is not None
        if is_method:
            args = args[1:]
        call = self.arguments(is_method).bind(args, kwargs)
        loop = asyncio.get_running_loop()
        queue = self._queue_for(self_arg, loop)
        future: asyncio.Future[Any] = loop.create_future()
        queue.put(_Pending(call, future, context.current_request(), loop.time()))
        return future

    def _self_of(self, args: tuple[Any, ...]) -> Any:
        """The object the function was called on as a method, or None for a plain call."""
        if args and self.wrapper is not None:
            try:
                attr = inspect.getattr_static(type(args[0]), self.func.__name__)
            except AttributeError:
                return None
            if attr is self.wrapper:
                return args[0]
        return None

    def _queue_for(self, self_arg: Any, loop: asyncio.AbstractEventLoop) -> _BatchQueue:
        queue = self._lookup(self_arg)
        if queue is None or queue.loop is not loop:
            queue = _BatchQueue(self, self_arg, loop)
            self._store(self_arg, queue)
            self._queues.add(queue)
            self.warn_if_bounded()
        return queue

    def _lookup(self, self_arg: Any) -> _BatchQueue | None:
        if self_arg is None:
            return self._function_queue
        own = getattr(self_arg, "__dict__", None)
        if own is not None:
            queue: _BatchQueue | None = own.get(_QUEUES_ATTR, {}).get(self)
            return queue
        return self._by_id.get(id(self_arg))

    def _store(self, self_arg: Any, queue: _BatchQueue) -> None:
        if self_arg is None:
            self._function_queue = queue
            return
        own = getattr(self_arg, "__dict__", None)
        if own is not None:
            own.setdefault(_QUEUES_ATTR, {})[self] = queue
            return
        key = id(self_arg)
        self._by_id[key] = queue
        try:
            weakref.finalize(self_arg, self._by_id.pop, key, None)
        except TypeError:
            pass  # not weakly referenceable: the queue lives as long as the function


_QUEUES_ATTR = "__shoal_batch_queues__"


def _decorate(
    func: F,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    max_concurrent_batches: int,
    batch_size_fn: Callable[[list[Any]], int] | None,
) -> F:
    _check_async(func)
    batcher = _Batcher(func, max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
    wrapper: Callable[..., Any]
    if batcher.is_generator:

        async def stream_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            future = batcher.enqueue(args, kwargs)
            try:
                while True:
                    step = await future
                    if step is _END:
                        return
                    item, future = step
                    yield item
            finally:
                future.cancel()  # a caller that stops reading is no longer fed

        wrapper = stream_wrapper
    else:

        async def batch_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await batcher.enqueue(args, kwargs)

        wrapper = batch_wrapper
    functools.update_wrapper(wrapper, func)
    batcher.wrapper = wrapper
    attrs: dict[str, Any] = {
        "set_max_batch_size": batcher.set_max_batch_size,
        "set_batch_wait_timeout_s": batcher.set_batch_wait_timeout_s,
        "_get_max_batch_size": batcher.get_max_batch_size,
        "_get_batch_wait_timeout_s": batcher.get_batch_wait_timeout_s,
        "_shoal_batcher": batcher,
    }
    for name, value in attrs.items():
        setattr(wrapper, name, value)
    return wrapper  # type: ignore[return-value]


def _check_async(func: Any) -> None:
    if not callable(func):
        raise TypeError("@serve.batch can only be used to decorate functions or methods.")
    if not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)):
        raise TypeError("Functions decorated with @serve.batch must be 'async def'")


@overload
def batch(_func: F, /) -> F: ...


@overload
def batch(
    _func: None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Callable[[F], F]: ...


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Any:
    """Turn an ``async def`` function or method taking lists into one callers call with single
    items (see the module's docstring). Use bare (``@serve.batch``) or with options
    (``@serve.batch(max_batch_size=32)``).

    Raises TypeError if the function is not ``async def`` (or not callable), and TypeError or
    ValueError naming the option for an invalid option, with Ray Serve's messages.
    """
    if _func is not None:
        _check_async(_func)
    max_batch_size = _validate_max_batch_size(max_batch_size)
    batch_wait_timeout_s = _validate_batch_wait_timeout_s(batch_wait_timeout_s)
    max_concurrent_batches = _validate_max_concurrent_batches(max_concurrent_batches)
    _validate_batch_size_fn(batch_size_fn)

    def decorator(func: F) -> F:
        return _decorate(func, max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)

    return decorator(_func) if _func is not None else decorator

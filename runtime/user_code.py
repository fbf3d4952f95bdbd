"""UserCallable: runs a deployment's user code the way Ray Serve does.

- ``async def`` methods run on the replica's event loop, concurrently.
- Plain ``def`` methods run in a thread pool sized ``max_ongoing_requests`` (``user_threads``;
  Ray's default ``RAY_SERVE_RUN_SYNC_IN_THREADPOOL=1``), with the request's contextvars copied in.
- A method that returns a generator (sync or async) may only be called with ``stream=True``;
  its items are produced one by one (sync generators advance in the thread pool).
- ``async def __init__`` is awaited; ``reconfigure(user_config)`` runs after construction when a
  ``user_config`` is set, before the replica takes traffic; a ``reconfigure`` with a ``rank``
  parameter also gets the replica's rank (and runs even without a ``user_config``), as in Ray.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal.runtime.errors import RayServeException
from shoal.runtime.inbox import LoopInbox
from shoal.runtime.user_threads import UserThreads

_END = object()


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 (the method itself, not callability)
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def _new_pool(max_ongoing_requests: int) -> UserThreads:
    return UserThreads(max(1, max_ongoing_requests), thread_name_prefix="shoal-user")


class UserCallable:
    """One deployment's user object (or function) inside a replica."""

    def __init__(
        self,
        *,
        deployment_name: str,
        func_or_class: Any,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        max_ongoing_requests: int,
    ) -> None:
        self.deployment_name = deployment_name
        self._target = func_or_class
        self._is_function = not inspect.isclass(func_or_class)
        self._init_args = init_args
        self._init_kwargs = init_kwargs
        self._pool = _new_pool(max_ongoing_requests)
        self.instance: Any = None
        self._resolved: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._inbox: LoopInbox | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def construct(self, user_config: Any = None, rank: Any = 0) -> None:
        """Create the user object (awaiting ``async def __init__``), then apply ``user_config``."""
        if self._is_function:
            self.instance = self._target
        else:
            cls = self._target
            obj = cls.__new__(cls)
            init = obj.__init__
            if inspect.iscoroutinefunction(init):
                await init(*self._init_args, **self._init_kwargs)
            else:
                result = init(*self._init_args, **self._init_kwargs)
                if inspect.isawaitable(result):
                    await result
            self.instance = obj
        await self.reconfigure(user_config, rank)

    async def reconfigure(self, user_config: Any, rank: Any = 0) -> None:
        """Call the user's ``reconfigure(user_config[, rank])`` (Ray's rules): when
        ``user_config`` is not None, or when the method takes a ``rank`` (then it gets one)."""
        method = None if self._is_function else getattr(self.instance, "reconfigure", None)
        wants_rank = method is not None and "rank" in _parameters(method)
        if user_config is None and not wants_rank:
            return
        if self._is_function:
            raise ValueError("deployment_def must be a class to use user_config or rank")
        if method is None:
            raise RayServeException(
                f"user_config or rank specified but deployment '{self.deployment_name}' is missing a "
                "`reconfigure` method."
            )
        await self.invoke(method, (user_config,), {"rank": rank} if wants_rank else {})

    def resize(self, max_ongoing_requests: int) -> None:
        """Run sync methods on a pool of ``max_ongoing_requests`` threads from now on; calls
        already on the old pool finish there (its threads end when they do)."""
        old, self._pool = self._pool, _new_pool(max_ongoing_requests)
        old.shutdown(wait=False)

    async def check_health(self) -> None:
        method = getattr(self.instance, "check_health", None) if not self._is_function else None
        if method is not None:
            await self.invoke(method, (), {})

    async def destroy(self) -> None:
        """Run the user's ``__del__`` once (awaited if async), then stop the thread pool."""
        try:
            method = None if self._is_function else getattr(type(self.instance), "__del__", None)
            if method is not None:
                await self.invoke(functools.partial(method, self.instance), (), {})
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- calls ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Callable[..., Any], bool]:
        """``(callable, is_async)`` for method ``name``, looked up once."""
        found = self._resolved.get(name)
        if found is None:
            fn = self.method(name)
            found = self._resolved[name] = (fn, _is_async(fn))
        return found

    def method(self, name: str) -> Callable[..., Any]:
        """The user callable for ``name``; RayServeException naming the deployment if missing."""
        if self._is_function:
            if name == "__call__":
                function: Callable[..., Any] = self.instance
                return function
            available = ["__call__"]
        else:
            fn = getattr(self.instance, name, None) if not name.startswith("__") or name == "__call__" else None
            if callable(fn):
                bound: Callable[..., Any] = fn
                return bound
            available = sorted(
                n for n in dir(self.instance)
                if (not n.startswith("_") or n == "__call__") and callable(getattr(self.instance, n, None))
            )
        raise RayServeException(
            f"Tried to call a method '{name}' that does not exist on deployment "
            f"'{self.deployment_name}'. Available methods: {available}."
        )

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``name`` and return its value. TypeError if it returns a generator."""
        fn, is_async = self.resolve(name)
        result = await self.invoke(fn, args, kwargs, is_async)
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            if inspect.isgenerator(result):
                result.close()
            raise TypeError(
                f"Method '{name}' returned a generator. You must use "
                "`handle.options(stream=True)` to call generators on a deployment."
            )
        return result

    async def stream(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """Yield the items of the generator ``name`` returns, as they are produced."""
        fn, is_async = self.resolve(name)
        result = await self.invoke(fn, args, kwargs, is_async)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        elif inspect.isgenerator(result):
            loop = asyncio.get_running_loop()
            try:
                while True:
                    item = await loop.run_in_executor(self._pool, next, result, _END)
                    if item is _END:
                        break
                    yield item
            finally:
                result.close()
        else:
            raise TypeError(
                f"Called method '{name}' with `handle.options(stream=True)` but it did not "
                "return a generator."
            )

    async def invoke(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], is_async: bool | None = None
    ) -> Any:
        """Call ``fn``: on the loop if it is async, else in the thread pool with the contextvars."""
        if is_async if is_async is not None else _is_async(fn):
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        if self._inbox is None:
            self._inbox = LoopInbox(loop)
        inbox = self._inbox
        done: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                value = ctx.run(fn, *args, **kwargs)
            except BaseException as exc:  # delivered to the awaiting request, not swallowed
                error = exc
                inbox.post(lambda: _settle(done, None, error))
            else:
                inbox.post(lambda: _settle(done, value, None))

        # Completions come back through the inbox: one loop wakeup for a batch of them, where
        # run_in_executor would write to the loop's self-pipe once per call; ``post`` makes no
        # concurrent Future (see ``user_threads``).
        self._pool.post(run)
        result = await done
        return await result if inspect.isawaitable(result) else result


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)

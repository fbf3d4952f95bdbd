"""DeploymentHandle, DeploymentResponse and DeploymentResponseGenerator (Ray Serve's handle API).

``handle.remote(...)`` returns at once; the call is routed on the runtime's loop. Its outcome is
read with ``.result(timeout_s=)`` from sync code or ``await`` from async code (any loop).
``.cancel()`` makes the outcome ``RequestCancelledError`` and cancels the replica's coroutine; an
awaiting task that is cancelled cancels the call it awaits, so cancellation cascades down a chain
of deployments. A ``DeploymentResponse`` passed as a top-level argument is awaited before the
call is sent, and the callee receives its value.

Handles pickle as (deployment, app, options) and find the runtime of the process that
unpickles them, so they can be passed into other deployments.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Generic, Iterator, TypeVar

from shoal.runtime import wire
from shoal.runtime.context import current_request
from shoal.runtime.errors import RayServeException, RequestCancelledError
from shoal.runtime.router import Call

R = TypeVar("R")

_request_prefix = os.urandom(6).hex()
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes: a random per-process prefix and a counter."""
    return f"{_request_prefix}{next(_request_counter):010x}"

_SYNC_IN_LOOP = (
    "Sync methods should not be called from within an `asyncio` event loop. "
    "Use `await response` instead."
)


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


@dataclass(frozen=True)
class HandleOptions:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    session_id: str = ""
    stream: bool = False


# -- outcome sinks (set on the runtime loop thread) ---------------------------------------------


class _FutureSink:
    """The outcome of a unary call: an asyncio future when the caller is on the runtime loop,
    else a concurrent future any thread can wait on."""

    def __init__(self, loop_future: asyncio.Future[Any] | None) -> None:
        self.afut = loop_future
        self.cfut: concurrent.futures.Future[Any] | None = (
            None if loop_future is not None else concurrent.futures.Future()
        )

    def set_result(self, value: Any) -> None:
        fut = self.afut if self.afut is not None else self.cfut
        if not fut.done():
            try:
                fut.set_result(value)
            except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
                pass

    def set_exception(self, exc: BaseException) -> None:
        fut = self.afut if self.afut is not None else self.cfut
        if not fut.done():
            try:
                fut.set_exception(exc)
            except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
                pass

    def push(self, item: Any) -> None:  # pragma: no cover - unary calls never stream
        raise AssertionError("stream item for a unary call")

    def finish(self) -> None:  # pragma: no cover
        raise AssertionError("stream end for a unary call")


END = object()


class StreamSink:
    """Items of a streaming call, consumed from any thread (``next_sync``) or loop
    (``next_async``)."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._exc: BaseException | None = None
        self._done = False
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def set_result(self, value: Any) -> None:  # a stream has no single value
        self.finish()

    def set_exception(self, exc: BaseException) -> None:
        with self._cond:
            if self._done:
                return
            self._exc = exc
            self._done = True
        self._wake()

    def push(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
        self._wake()

    def finish(self) -> None:
        with self._cond:
            self._done = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            if _running_loop() is loop:
                _set_if_pending(fut)
            else:
                loop.call_soon_threadsafe(_set_if_pending, fut)

    def _take(self) -> Any:
        if self._items:
            return self._items.popleft()
        if self._done:
            if self._exc is not None:
                raise self._exc
            return END
        return None

    def next_sync(self, timeout_s: float | None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._done, timeout_s):
                raise TimeoutError("Timed out waiting for the next item of the stream.")
            return self._take()

    async def next_async(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items or self._done:
                    return self._take()
                fut = loop.create_future()
                self._waiter = (loop, fut)
            await fut


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- responses -----------------------------------------------------------------------------------


class _ResponseBase:
    def __init__(self, runtime: Any, router_key: tuple[str, str], call: Call) -> None:
        self._runtime = runtime
        self._router_key = router_key
        self._call = call

    @property
    def request_id(self) -> str:
        return self._call.request_id

    def cancel(self) -> None:
        """Cancel the call (idempotent); its outcome becomes ``RequestCancelledError``."""
        rt = self._runtime
        router_cancel = lambda: rt.router(*self._router_key).cancel(self._call)  # noqa: E731
        if rt.in_loop_thread():
            router_cancel()
        else:
            rt.inbox.post(router_cancel)

    def cancelled(self) -> bool:
        return self._call.cancelled

    def __reduce__(self) -> Any:
        raise RayServeException(
            "`DeploymentResponse` is not serializable. If you are passing the "
            "`DeploymentResponse` in a nested object (e.g. a list or dictionary) to a "
            "downstream deployment handle call, that is no longer supported. Please only pass "
            "`DeploymentResponse` objects as top level arguments."
        )


class DeploymentResponse(_ResponseBase, Generic[R]):
    """The future result of ``handle.remote()``."""

    def __init__(self, runtime: Any, router_key: tuple[str, str], call: Call, sink: _FutureSink) -> None:
        super().__init__(runtime, router_key, call)
        self._sink = sink

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> R:
        """Block until the call finishes and return its value (or raise its exception).

        RuntimeError when called from a running event loop (use ``await``); TimeoutError after
        ``timeout_s`` (the call goes on; ``cancel()`` stops it).
        """
        if not _skip_asyncio_check and _in_running_loop():
            raise RuntimeError(_SYNC_IN_LOOP)
        fut = self._sink.cfut
        if fut is None:
            raise RuntimeError(_SYNC_IN_LOOP)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"Timed out after {timeout_s}s waiting for request {self.request_id}.") from None
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(self.request_id) from None

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> R:
        sink = self._sink
        try:
            if sink.afut is not None and self._runtime.in_loop_thread():
                return await sink.afut
            assert sink.cfut is not None
            return await asyncio.wrap_future(sink.cfut)
        except asyncio.CancelledError:
            # The awaiting task was cancelled: cancel the call it was waiting for.
            self.cancel()
            raise

    def _future_on(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        if self._sink.afut is not None and self._sink.afut.get_loop() is loop:
            return self._sink.afut
        assert self._sink.cfut is not None
        return asyncio.wrap_future(self._sink.cfut, loop=loop)


class DeploymentResponseGenerator(_ResponseBase, Generic[R]):
    """The items of a ``stream=True`` call, as they are produced: ``for`` or ``async for``."""

    def __init__(self, runtime: Any, router_key: tuple[str, str], call: Call, sink: StreamSink) -> None:
        super().__init__(runtime, router_key, call)
        self._sink = sink

    def __await__(self) -> Any:
        raise TypeError(
            "`DeploymentResponseGenerator` cannot be awaited directly. Use `async for` or "
            "`await response.__anext__()` instead."
        )

    def result(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "`DeploymentResponseGenerator` doesn't support `.result()`. Iterate over it with "
            "`for` or `async for` instead."
        )

    def __iter__(self) -> Iterator[R]:
        return self

    def __next__(self) -> R:
        if _in_running_loop():
            raise RuntimeError(_SYNC_IN_LOOP)
        item = self._sink.next_sync(None)
        if item is END:
            raise StopIteration
        return item

    def __aiter__(self) -> "DeploymentResponseGenerator[R]":
        return self

    async def __anext__(self) -> R:
        try:
            item = await self._sink.next_async()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if item is END:
            raise StopAsyncIteration
        return item


# -- the handle ----------------------------------------------------------------------------------


class DeploymentHandle(Generic[R]):
    """A client for one deployment: ``handle.remote(...)``, ``handle.method.remote(...)``."""

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        _options: HandleOptions | None = None,
        _runtime: Any = None,
    ) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.handle_options = _options or HandleOptions()
        self._runtime = _runtime

    @property
    def deployment_id(self) -> str:
        return f"Deployment(name='{self.deployment_name}', app='{self.app_name}')"

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self.deployment_name}', app='{self.app_name}')"

    def options(
        self,
        *,
        method_name: str | None = None,
        multiplexed_model_id: str | None = None,
        session_id: str | None = None,
        stream: bool | None = None,
        **_ignored: Any,
    ) -> "DeploymentHandle[R]":
        """A handle sharing this one's router, with the given options changed."""
        changes = {
            k: v
            for k, v in dict(
                method_name=method_name,
                multiplexed_model_id=multiplexed_model_id,
                session_id=session_id,
                stream=stream,
            ).items()
            if v is not None
        }
        return DeploymentHandle(
            self.deployment_name,
            self.app_name,
            _options=replace(self.handle_options, **changes),
            _runtime=self._runtime,
        )

    def __getattr__(self, name: str) -> "DeploymentHandle[R]":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def __reduce__(self) -> Any:
        return (_rebuild_handle, (self.deployment_name, self.app_name, self.handle_options))

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Send the call; returns a DeploymentResponse (or a generator with ``stream=True``)."""
        rt = self._runtime
        if rt is None:
            from shoal.runtime.client import get_runtime

            rt = self._runtime = get_runtime()
        opts = self.handle_options
        parent = current_request()
        request_id = parent.request_id or new_request_id()
        on_loop = rt.in_loop_thread()
        sink: Any = StreamSink() if opts.stream else _FutureSink(rt.loop.create_future() if on_loop else None)
        pending = _top_level_responses(args, kwargs)
        meta: dict[str, Any] = {}
        if opts.multiplexed_model_id:
            meta["mx"] = opts.multiplexed_model_id
        if parent.route:
            meta["route"] = parent.route
        if pending:
            call = Call(opts.method_name, request_id, opts.stream, 0, b"", sink, meta)
        else:
            enc, payload = _encode_args(args, kwargs, self, opts.method_name)
            call = Call(opts.method_name, request_id, opts.stream, int(enc), payload, sink, meta)
        key = (self.app_name, self.deployment_name)

        def submit() -> None:
            if pending:
                rt.loop.create_task(_resolve_then_submit(rt, key, call, args, kwargs, self))
            else:
                rt.router(*key).submit(call)

        if on_loop:
            submit()
        else:
            rt.inbox.post(submit)
        if opts.stream:
            return DeploymentResponseGenerator(rt, key, call, sink)
        response: DeploymentResponse[Any] = DeploymentResponse(rt, key, call, sink)
        if sink.afut is not None:
            sink.afut.add_done_callback(lambda f: f.cancelled() and response.cancel())
        return response


def _rebuild_handle(deployment_name: str, app_name: str, options: HandleOptions) -> DeploymentHandle[Any]:
    return DeploymentHandle(deployment_name, app_name, _options=options)


def _top_level_responses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for value in (*args, *kwargs.values()):
        if isinstance(value, DeploymentResponseGenerator):
            raise RuntimeError(
                "Streaming deployment handle results cannot be passed to downstream handle "
                "calls. If you have a use case requiring this feature, please file a "
                "feature request."
            )
        if isinstance(value, DeploymentResponse):
            return True
    return False


def _encode_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], handle: DeploymentHandle[Any], method: str
) -> tuple[wire.Encoding, bytes]:
    try:
        return wire.dumps_args(args, kwargs)
    except RayServeException:
        raise
    except Exception as exc:
        where = f"the call to method '{method}' of deployment '{handle.deployment_name}'"
        for index, value in enumerate(args):
            try:
                wire.dumps(value)
            except Exception as inner:
                raise TypeError(
                    f"Positional argument {index} ({type(value).__name__}) of {where} cannot be "
                    f"serialized: {inner}"
                ) from inner
        for name, value in kwargs.items():
            try:
                wire.dumps(value)
            except Exception as inner:
                raise TypeError(
                    f"Keyword argument '{name}' ({type(value).__name__}) of {where} cannot be "
                    f"serialized: {inner}"
                ) from inner
        raise TypeError(f"The arguments of {where} cannot be serialized: {exc}") from exc


async def _resolve_then_submit(
    rt: Any, key: tuple[str, str], call: Call, args: tuple[Any, ...], kwargs: dict[str, Any],
    handle: DeploymentHandle[Any],
) -> None:
    """Await the DeploymentResponses among the arguments, then encode and submit the call."""
    loop = asyncio.get_running_loop()

    async def value_of(v: Any) -> Any:
        return await v._future_on(loop) if isinstance(v, DeploymentResponse) else v

    try:
        resolved_args = tuple([await value_of(a) for a in args])
        resolved_kwargs = {k: await value_of(v) for k, v in kwargs.items()}
        enc, payload = _encode_args(resolved_args, resolved_kwargs, handle, call.method)
    except Exception as exc:
        call.resolve(exc)
        return
    call.enc, call.payload = int(enc), payload
    rt.router(*key).submit(call)

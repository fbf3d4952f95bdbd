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
import itertools
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from shoal.runtime import wire
from shoal.runtime.api import RuntimeAPI
from shoal.runtime.context import current_request
from shoal.runtime.errors import RayServeException
from shoal.runtime.reply import END, ReplySink, ThreadSafeSink
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


# -- responses -----------------------------------------------------------------------------------


class _ResponseBase:
    def __init__(self, runtime: RuntimeAPI, router_key: tuple[str, str], call: Call) -> None:
        self._runtime = runtime
        self._router_key = router_key
        self._call = call

    @property
    def request_id(self) -> str:
        return self._call.request_id

    def cancel(self) -> None:
        """Cancel the call (idempotent); its outcome becomes ``RequestCancelledError``."""
        rt = self._runtime
        if rt.in_loop_thread():
            self._cancel_on_loop()
        else:
            rt.inbox.post(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        self._runtime.router(*self._router_key).cancel(self._call)

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

    def __init__(
        self, runtime: RuntimeAPI, router_key: tuple[str, str], call: Call, sink: ReplySink | ThreadSafeSink
    ) -> None:
        super().__init__(runtime, router_key, call)
        self._sink = sink

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> R:
        """Block until the call finishes and return its value (or raise its exception).

        RuntimeError when called from a running event loop (use ``await``); TimeoutError after
        ``timeout_s`` (the call goes on; ``cancel()`` stops it).
        """
        if not _skip_asyncio_check and _in_running_loop():
            raise RuntimeError(_SYNC_IN_LOOP)
        sink = self._sink
        if not isinstance(sink, ThreadSafeSink):
            raise RuntimeError(_SYNC_IN_LOOP)
        try:
            value: R = sink.result_sync(timeout_s)
        except TimeoutError:
            raise TimeoutError(f"Timed out after {timeout_s}s waiting for request {self.request_id}.") from None
        return value

    def __await__(self) -> Generator[Any, None, R]:
        return self._wait().__await__()

    async def _wait(self) -> R:
        sink = self._sink
        if isinstance(sink, ReplySink) and not self._runtime.in_loop_thread():
            raise RuntimeError("a DeploymentResponse made on the runtime's loop is awaited there only")
        try:
            value: R = await sink.result()
        except asyncio.CancelledError:
            # The awaiting task was cancelled: cancel the call it was waiting for.
            self.cancel()
            raise
        return value


class DeploymentResponseGenerator(_ResponseBase, Generic[R]):
    """The items of a ``stream=True`` call, as they are produced: ``for`` or ``async for``."""

    def __init__(self, runtime: RuntimeAPI, router_key: tuple[str, str], call: Call, sink: ThreadSafeSink) -> None:
        super().__init__(runtime, router_key, call)
        self._sink = sink

    def __await__(self) -> Generator[Any, None, Any]:
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
        item: R = self._sink.next_sync(None)
        if item is END:
            raise StopIteration
        return item

    def __aiter__(self) -> DeploymentResponseGenerator[R]:
        return self

    async def __anext__(self) -> R:
        try:
            item: R = await self._sink.next()
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
        _runtime: RuntimeAPI | None = None,
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
    ) -> DeploymentHandle[R]:
        """A handle sharing this one's router, with the given options changed."""
        changes: dict[str, Any] = {
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

    def __getattr__(self, name: str) -> DeploymentHandle[R]:
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
        sink: ReplySink | ThreadSafeSink = ThreadSafeSink() if opts.stream or not on_loop else ReplySink()
        pending = _top_level_responses(args, kwargs)
        if pending:
            enc, payload = wire.Encoding.MSGPACK, b""
        else:
            enc, payload = _encode_args(args, kwargs, self, opts.method_name)
        header = wire.request_header(
            opts.method_name, request_id, enc, opts.stream, opts.multiplexed_model_id, parent.route
        )
        call = Call(header, payload, sink)
        key = (self.app_name, self.deployment_name)
        runtime = rt

        def submit() -> None:
            if pending:
                _spawn(runtime, _resolve_then_submit(runtime, key, call, args, kwargs, self))
            else:
                runtime.router(*key).submit(call)

        if on_loop:
            submit()
        else:
            rt.inbox.post(submit)
        if opts.stream:
            assert isinstance(sink, ThreadSafeSink)
            return DeploymentResponseGenerator(rt, key, call, sink)
        return DeploymentResponse(rt, key, call, sink)


_pending_tasks: set[asyncio.Task[None]] = set()


def _spawn(rt: RuntimeAPI, coro: Any) -> None:
    """Run ``coro`` on the runtime loop, keeping a reference to its task until it ends."""
    task = rt.loop.create_task(coro)
    _pending_tasks.add(task)
    task.add_done_callback(_pending_tasks.discard)


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
    rt: RuntimeAPI, key: tuple[str, str], call: Call, args: tuple[Any, ...], kwargs: dict[str, Any],
    handle: DeploymentHandle[Any],
) -> None:
    """Await the DeploymentResponses among the arguments, then encode and submit the call."""
    async def value_of(v: Any) -> Any:
        return await v if isinstance(v, DeploymentResponse) else v

    try:
        resolved_args = tuple([await value_of(a) for a in args])
        resolved_kwargs = {k: await value_of(v) for k, v in kwargs.items()}
        enc, payload = _encode_args(resolved_args, resolved_kwargs, handle, call.header.method)
    except Exception as exc:
        call.resolve(exc)
        return
    call.header, call.payload = replace(call.header, enc=enc), payload
    rt.router(*key).submit(call)

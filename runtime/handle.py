"""DeploymentHandle, DeploymentResponse and DeploymentResponseGenerator (Ray Serve's handle API).

``handle.remote(...)`` returns at once; the call is routed on the runtime's loop. Its outcome is
read with ``.result(timeout_s=)`` from sync code or ``await`` from async code (any loop).
``.cancel()`` makes the outcome ``RequestCancelledError`` and cancels the replica's coroutine; an
awaiting task that is cancelled cancels the call it awaits, so cancellation cascades down a chain
of deployments. A ``DeploymentResponse`` passed as a top-level argument is awaited before the
call is sent, and the callee receives its value.

Each ``remote()`` call counts in ``ray_serve_handle_request_counter_total`` (see
``router_metrics``), labelled with the handle's ``handle_id``.

Handles pickle as (deployment, app, options) and find the runtime of the process that
unpickles them, so they can be passed into other deployments.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from shoal.runtime import router_metrics, shm, wire
from shoal.runtime.api import RuntimeAPI
from shoal.runtime.broadcast import DeploymentBroadcastResponse, fan_out
from shoal.runtime.context import current_request
from shoal.runtime.errors import RayServeException
from shoal.runtime.reply import END, ReplySink, ThreadSafeSink
from shoal.runtime.router import Call

logger = logging.getLogger("shoal.handle")

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
    return asyncio._get_running_loop() is not None


# Ray's serialization method names (its gRPC by-value transport); see ``DeploymentHandle.options``.
_SERIALIZATIONS = {"cloudpickle", "pickle", "msgpack", "orjson", "noop"}
_SUPPORTED_SERIALIZATIONS = ("cloudpickle", "pickle")
_RAY_ONLY = (
    "Converting DeploymentResponses to Ray ObjectRefs is not supported by shoal: there is no Ray "
    "object store. `await` the response (or call `.result()`) to get its value."
)


@dataclass(frozen=True)
class HandleOptions:
    """What ``handle.options(...)`` sets (Ray's ``DynamicHandleOptions``)."""

    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    session_id: str = ""
    stream: bool = False
    request_serialization: str = "cloudpickle"
    response_serialization: str = "cloudpickle"


def _check_serialization(which: str, method: str) -> str:
    """Ray's validation of ``request_serialization`` / ``response_serialization``, then shoal's:
    its transport encodes plain values with msgpack and everything else with cloudpickle, which
    gives the values a (cloud)pickle round trip gives; the other methods are refused."""
    name = method.lower()
    if name not in _SERIALIZATIONS:
        raise ValueError(
            f"Unsupported {which} serialization method: {name}. Valid options: {_SERIALIZATIONS}"
        )
    if name not in _SUPPORTED_SERIALIZATIONS:
        raise ValueError(
            f"handle.options({which}_serialization={method!r}) is not supported by shoal: values "
            "travel as msgpack when they are plain data and as cloudpickle otherwise, as with "
            "'cloudpickle' (the default) or 'pickle'."
        )
    return name


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
        """True once ``cancel()`` was called (the call may still have run to completion)."""
        return self._call.cancelled

    @property
    def by_reference(self) -> bool:
        """Always False: results travel by value (there is no object store)."""
        return False

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

    async def _to_object_ref(self) -> Any:
        """Ray-only (a Ray ``ObjectRef``): RuntimeError."""
        raise RuntimeError(_RAY_ONLY)

    def _to_object_ref_sync(self, _timeout_s: float | None = None, _allow_running_in_asyncio_loop: bool = False) -> Any:
        """Ray-only (a Ray ``ObjectRef``): RuntimeError."""
        raise RuntimeError(_RAY_ONLY)


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

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> Any:
        """Not supported on a generator (Ray's API parity): TypeError."""
        raise TypeError(
            "`DeploymentResponseGenerator` doesn't support `.result()`. Use iteration instead: "
            "`for item in response` (outside deployments) or `async for item in response` "
            "(inside deployments)."
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

    async def _to_object_ref_gen(self) -> Any:
        """Ray-only (a Ray ``ObjectRefGenerator``): RuntimeError."""
        raise RuntimeError(_RAY_ONLY)

    def _to_object_ref_gen_sync(
        self, _timeout_s: float | None = None, _allow_running_in_asyncio_loop: bool = False
    ) -> Any:
        """Ray-only (a Ray ``ObjectRefGenerator``): RuntimeError."""
        raise RuntimeError(_RAY_ONLY)


# -- the handle ----------------------------------------------------------------------------------


class DeploymentHandle(Generic[R]):
    """A client for one deployment: ``handle.remote(...)``, ``handle.method.remote(...)``.

    A handle owns no router: every handle of a process to one deployment (and every copy made
    by ``options``) shares the runtime's router for it, which lives as long as the runtime.
    """

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        _options: HandleOptions | None = None,
        _runtime: RuntimeAPI | None = None,
        _handle_id: str | None = None,
        _initialized: bool = False,
    ) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.handle_options = _options or HandleOptions()
        self.handle_id = _handle_id or os.urandom(6).hex()
        self._runtime = _runtime
        self._initialized = _initialized

    @property
    def deployment_id(self) -> str:
        return f"Deployment(name='{self.deployment_name}', app='{self.app_name}')"

    @property
    def is_initialized(self) -> bool:
        """True once ``_init()``, ``options()`` or ``remote()`` was called on this handle."""
        return self._initialized

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self.deployment_name}', app='{self.app_name}')"

    def _init(
        self,
        *,
        _prefer_local_routing: bool = False,
        _source: Any = None,
        _run_router_in_separate_loop: bool = True,
    ) -> None:
        """Ray's one-time handle initialization (before the first ``options``/``remote``).

        RuntimeError if the handle is initialized already. ``_prefer_local_routing`` changes
        nothing on one machine (every replica is local); ``_source`` and
        ``_run_router_in_separate_loop`` are Ray's router placement, which shoal decides itself
        (the driver's router runs on the runtime's own thread, as Ray's separate loop does).
        """
        if self._initialized:
            raise RuntimeError(
                "Handle has already been initialized. Note that a handle is implicitly "
                "initialized when you call `.options()` or `.remote()`. You either tried to call "
                "`._init()` twice or called `._init()` after calling `.options()` or `.remote()`. "
                "If you want to modify the init options, please do so before calling `.options()` "
                "or `.remote()`."
            )
        self._initialized = True

    def options(
        self,
        *,
        method_name: str | None = None,
        multiplexed_model_id: str | None = None,
        session_id: str | None = None,
        stream: bool | None = None,
        _prefer_local_routing: bool | None = None,
        _by_reference: bool | None = None,
        request_serialization: str | None = None,
        response_serialization: str | None = None,
    ) -> DeploymentHandle[R]:
        """A handle sharing this one's router, with the given options changed (Ray's keywords;
        any other keyword is a TypeError).

        ``_prefer_local_routing`` is deprecated in Ray (a warning) and changes nothing on one
        machine. ``_by_reference=True`` (Ray object refs) is refused: results travel by value.
        ``request_serialization`` / ``response_serialization`` are validated as Ray does; shoal
        encodes plain values with msgpack and others with cloudpickle, the outcome of
        ``"cloudpickle"`` (default) or ``"pickle"``; the other methods are refused.
        """
        if _prefer_local_routing is not None:
            warnings.warn(
                "Modifying `_prefer_local_routing` with `options()` is deprecated. Please use "
                "`init()` instead.",
                stacklevel=2,
            )
        if _by_reference:
            raise ValueError(
                "handle.options(_by_reference=True) is not supported by shoal: there is no Ray "
                "object store; arguments and results travel by value."
            )
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
        if request_serialization is not None:
            changes["request_serialization"] = _check_serialization("request", request_serialization)
        if response_serialization is not None:
            changes["response_serialization"] = _check_serialization("response", response_serialization)
        self._initialized = True
        return DeploymentHandle(
            self.deployment_name,
            self.app_name,
            _options=replace(self.handle_options, **changes),
            _runtime=self._runtime,
            _handle_id=self.handle_id,
            _initialized=True,
        )

    def __getattr__(self, name: str) -> DeploymentHandle[R]:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def __reduce__(self) -> Any:
        return (_rebuild_handle, (self.deployment_name, self.app_name, self.handle_options))

    def _get_runtime(self) -> RuntimeAPI:
        rt = self._runtime
        if rt is None:
            from shoal.runtime.client import get_runtime

            rt = self._runtime = get_runtime()
        return rt

    def running_replicas_populated(self) -> bool:
        """True once this process's router knows at least one running replica of the deployment."""
        if not self._initialized:
            return False
        rt = self._get_runtime()
        snapshot = getattr(rt, "snapshot", None)
        if snapshot is None:  # local testing mode: the in-process instance
            return True
        entry = snapshot.deployment(self.app_name, self.deployment_name)
        return bool(entry is not None and entry.replicas)

    def shutdown(self) -> None:
        """Ray stops the handle's own router here. A shoal handle owns none (the process's
        handles to a deployment share the runtime's router, stopped with the runtime), so there
        is nothing to stop; calls already sent go on."""

    async def shutdown_async(self) -> None:
        """``shutdown``, awaitable."""
        self.shutdown()

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Send the call; returns a DeploymentResponse (or a generator with ``stream=True``)."""
        rt = self._get_runtime()
        self._initialized = True
        opts = self.handle_options
        parent = current_request()
        request_id = parent.request_id or new_request_id()
        on_loop = rt.in_loop_thread()
        sink: ReplySink | ThreadSafeSink = ThreadSafeSink() if opts.stream or not on_loop else ReplySink()
        pending = _top_level_responses(args, kwargs)
        if pending:
            enc, payload, buffers = wire.Encoding.MSGPACK, b"", list[pickle.PickleBuffer]()
        else:
            enc, payload, buffers = _encode_args(args, kwargs, self, opts.method_name)
        header = wire.request_header(
            opts.method_name, request_id, enc, opts.stream, opts.multiplexed_model_id, parent.route
        )
        call = Call(header, payload, sink)
        if buffers:
            call.buffers, call.segments = shm.place(buffers)
        key = (self.app_name, self.deployment_name)
        router_metrics.count_handle_request(self.app_name, self.deployment_name, self.handle_id, parent.route)
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

    def broadcast(self, method_name: str, *args: Any, **kwargs: Any) -> DeploymentBroadcastResponse:
        """Call ``method_name`` on every running replica of the deployment, in parallel (Ray's
        alpha API, for infrequent control-plane work; see ``shoal.runtime.broadcast``).

        Bypasses ``max_queued_requests``. ``DeploymentResponse`` arguments are resolved first.
        Returns a ``DeploymentBroadcastResponse``: ``.results(timeout_s=, return_exceptions=)``
        or ``await .results_async(...)`` give one outcome per replica.
        """
        rt = self._get_runtime()
        self._initialized = True
        _top_level_responses(args, kwargs)  # refuses generators, as remote() does
        opts = self.handle_options
        parent = current_request()
        key = (self.app_name, self.deployment_name)
        handle = self

        async def run() -> list[tuple[bool, Any]]:
            resolved_args = tuple([await _value_of(a) for a in args])
            resolved_kwargs = {k: await _value_of(v) for k, v in kwargs.items()}
            enc, payload, raw_buffers = _encode_args(resolved_args, resolved_kwargs, handle, method_name)
            # Frames only (no segments): the calls share the buffers and end at different times.
            buffers = tuple(b.raw() for b in raw_buffers)

            def make_call(sink: ReplySink) -> Call:
                header = wire.request_header(
                    method_name, new_request_id(), enc, False, opts.multiplexed_model_id, parent.route
                )
                return Call(header, payload, sink, buffers=buffers)

            return await fan_out(rt, key, make_call)

        return DeploymentBroadcastResponse(rt, run())

    def choose_replica(self, *args: Any, **kwargs: Any) -> Any:
        """Ray's two-phase routing (reserve a replica, then ``dispatch``): refused, with
        RayServeException, because shoal's routers do not expose replica reservations."""
        raise RayServeException(
            "DeploymentHandle.choose_replica() / dispatch() (two-phase routing) are not supported "
            "by shoal; use handle.remote(), which routes and sends in one step."
        )

    def dispatch(self, selection: Any, *args: Any, **kwargs: Any) -> Any:
        """See ``choose_replica``: refused with RayServeException."""
        self.choose_replica()


async def _value_of(value: Any) -> Any:
    return await value if isinstance(value, DeploymentResponse) else value


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
) -> tuple[wire.Encoding, bytes, list[pickle.PickleBuffer]]:
    try:
        return wire.dumps_args_oob(args, kwargs)
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
    try:
        resolved_args = tuple([await _value_of(a) for a in args])
        resolved_kwargs = {k: await _value_of(v) for k, v in kwargs.items()}
        enc, payload, buffers = _encode_args(resolved_args, resolved_kwargs, handle, call.header.method)
        if buffers:
            call.buffers, call.segments = shm.place(buffers)
            if call.resolved:  # cancelled while its arguments resolved
                call.release_segments()
    except Exception as exc:
        call.resolve(exc)
        return
    call.header, call.payload = replace(call.header, enc=enc), payload
    rt.router(*key).submit(call)

"""Runtime: one per process that calls deployments (the driver, the proxy, each replica).

It owns the loop routers run on, the control connection to the supervisor, and the routers. The
controller's snapshots (replica sets, limits, routes; versioned) arrive by long-polling: the
runtime asks "anything newer than version v?" and the supervisor answers when there is, so an
older snapshot is never applied over a newer one.

Control calls are signed with the instance's key, read from the run directory (``transport.
read_key``) when the runtime is created, and again whenever its file was replaced (a supervisor
started again on the run directory makes a new key); replies without the key's MAC are dropped.

In the driver the loop runs in a daemon thread ("shoal-runtime"), so handles work from sync code
(``.result()``) and from any other event loop (``await``). In a replica or the proxy, the
runtime uses the process's own loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import zmq

from shoal.runtime import shm, transport, wire
from shoal.runtime.errors import RayServeException, ShoalConnectionError
from shoal.runtime.inbox import LoopInbox
from shoal.runtime.router import Router

logger = logging.getLogger("shoal.client")

_DEFAULT_CALL_TIMEOUT_S = 30.0
_QUEUE_REPORT_INTERVAL_S = 0.25
# A thread making calls faster than the runtime's loop sends them waits for the loop every this many
# calls (see LoopInbox: otherwise the loop gets the GIL once per switch interval).
_INBOX_PACE_AT = 64

_ERROR_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "RuntimeError": RuntimeError,
    "TimeoutError": TimeoutError,
    "RayServeException": RayServeException,
}


class Runtime:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, control_endpoint: str, app_name: str = "", role: str = "driver"
    ) -> None:
        self.loop = loop
        self.role = role  # "driver", "replica" or "proxy": the controller tracks what the proxy applied
        self.inbox = LoopInbox(loop, pace_at=_INBOX_PACE_AT)
        self.control_endpoint = control_endpoint
        self._key_stamp = _file_stamp(transport.key_path(control_endpoint))  # before reading: see _current_key
        self._key = transport.read_key(control_endpoint)
        shm.configure_from_endpoint(control_endpoint)  # where large arrays go (and come from)
        self._warned_bad_reply = False
        self.app_name = app_name  # the app this process serves, if it is a replica
        self.routers: dict[tuple[str, str], Router] = {}
        self.snapshot = wire.Snapshot()
        self.snapshot_changed = asyncio.Event()  # set (and replaced) whenever a snapshot is applied
        self._thread: threading.Thread | None = None
        self._control: transport.Channel | None = None
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], tuple[bytes, ...]]]] = {}
        self._ids = itertools.count(1)
        self._listener: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self.source_id = f"{role}-{os.getpid()}-{id(self):x}"  # names this router process in metrics
        self._closed = False

    # -- setup (on the loop thread) -------------------------------------------------------------

    def _start(self) -> None:
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(self.control_endpoint)
        self._control = transport.Channel(sock, self._on_control, self.loop, key=self._key)
        self._listener = self.loop.create_task(self._listen())

    def in_loop_thread(self) -> bool:
        # _get_running_loop: None outside a loop, where get_running_loop would build an exception
        # (a driver's thread asks on every remote() and result()).
        return asyncio._get_running_loop() is self.loop

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread and return its result (from any other thread)."""
        if self.in_loop_thread():
            return fn()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result()

    # -- routers --------------------------------------------------------------------------------

    def router(self, app_name: str, deployment_name: str) -> Router:
        """The router for a deployment (created on first use). Loop thread only."""
        key = (app_name, deployment_name)
        router = self.routers.get(key)
        if router is None:
            router = Router(app_name, deployment_name, self.loop, on_queued=self._queued)
            self.routers[key] = router
            if self.snapshot.version:
                router.update(self.snapshot.deployment(app_name, deployment_name))
        return router

    async def wait_snapshot(self, predicate: Callable[[wire.Snapshot], bool], timeout_s: float) -> bool:
        """Wait (on the loop) until the applied snapshot satisfies ``predicate``; False after
        ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate(self.snapshot):
                    await self.snapshot_changed.wait()
        except TimeoutError:
            return False
        return True

    def _queued(self, router: Router) -> None:
        """A request waits in an autoscaling deployment's router: report the queue lengths
        now (a deployment at zero replicas scales up on this) and then while they last."""
        if self._reporter is None or self._reporter.done():
            self._reporter = self.loop.create_task(self._report_queues())

    async def _report_queues(self) -> None:
        while not self._closed:
            queued = {wire.deployment_key(app, name): len(r.queue) for (app, name), r in self.routers.items() if r.autoscaling}
            try:
                await self.call("metrics", {"queued": queued, "source": self.source_id}, timeout_s=5.0)
            except Exception as exc:
                logger.debug("queue report failed: %s", exc)
            if not any(queued.values()):
                return  # the zeros are reported once; the next queued request starts a new round
            await asyncio.sleep(_QUEUE_REPORT_INTERVAL_S)

    def _apply(self, snapshot: wire.Snapshot) -> None:
        """Route with ``snapshot`` unless a newer one is applied already."""
        if snapshot.version <= self.snapshot.version:
            return
        self.snapshot = snapshot
        changed, self.snapshot_changed = self.snapshot_changed, asyncio.Event()
        changed.set()
        for (app, name), router in self.routers.items():
            router.update(snapshot.deployment(app, name))

    async def _listen(self) -> None:
        while not self._closed:
            try:
                meta, _ = await self.call(
                    "listen", {"version": self.snapshot.version, "role": self.role}, timeout_s=None
                )
                snapshot = wire.Snapshot.from_wire(meta["snapshot"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                logger.warning("snapshot listener: %s", exc)
                await asyncio.sleep(0.5)
                continue
            self._apply(snapshot)

    # -- control calls --------------------------------------------------------------------------

    async def call(
        self,
        op: str,
        meta: dict[str, Any] | None = None,
        payload: tuple[bytes, ...] = (),
        timeout_s: float | None = _DEFAULT_CALL_TIMEOUT_S,
    ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
        """Ask the supervisor to do ``op``; raises its error as the matching exception type."""
        assert self._control is not None
        call_id = next(self._ids)
        fut = self.loop.create_future()
        self._pending[call_id] = fut
        body = {"op": op, **(meta or {})}
        self._control.key = self._current_key()
        self._control.send_message(wire.Message(wire.Kind.CALL, 0, call_id, body, payload))
        try:
            async with asyncio.timeout(timeout_s):
                reply, data = await fut
        except TimeoutError:
            raise ShoalConnectionError(
                f"the shoal supervisor at {self.control_endpoint} did not answer '{op}' within "
                f"{timeout_s}s; is it running? (`shoal status` checks)"
            ) from None
        finally:
            self._pending.pop(call_id, None)
        if not reply.get("ok", False):
            etype = _ERROR_TYPES.get(reply.get("etype", ""), RayServeException)
            raise etype(reply.get("error", "unknown error"))
        return reply, data

    def call_sync(
        self, op: str, meta: dict[str, Any] | None = None, payload: tuple[bytes, ...] = (),
        timeout_s: float | None = _DEFAULT_CALL_TIMEOUT_S,
    ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
        if self.in_loop_thread():
            raise RuntimeError("call_sync() cannot be used on the runtime's own loop")
        return asyncio.run_coroutine_threadsafe(self.call(op, meta, payload, timeout_s), self.loop).result()

    def _current_key(self) -> bytes:
        """The instance's key, read again if its file was replaced since it was last read."""
        stamp = _file_stamp(transport.key_path(self.control_endpoint))
        if stamp is not None and stamp != self._key_stamp:
            # Stamped before reading: a file replaced in between is read once more next time.
            self._key_stamp = stamp
            self._key = transport.read_key(self.control_endpoint)
        return self._key

    def _on_control(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 1:
                raise wire.ProtocolError(f"expected one frame, got {len(frames)}")
            msg = wire.decode([wire.verify(frames[0], self._key)])
        except wire.ProtocolError as exc:
            if not self._warned_bad_reply:  # once: whoever answers there is not our supervisor
                self._warned_bad_reply = True
                logger.warning("dropped a reply on %s: %s", self.control_endpoint, exc)
            return
        fut = self._pending.get(msg.call_id)
        if fut is not None and not fut.done():
            fut.set_result((msg.meta, msg.payload))

    # -- teardown -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._listener, self._reporter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for router in self.routers.values():
            router.close()
        self.routers.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ShoalConnectionError("the runtime was shut down"))
        if self._control is not None:
            self._control.close()

    def close(self) -> None:
        """Stop the runtime from a foreign thread; joins the loop thread if it owns one."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.aclose(), self.loop).result(timeout=5)
            except Exception:
                logger.debug("runtime close did not finish cleanly", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        transport.terminate_context()


def _file_stamp(path: str) -> tuple[int, int] | None:
    """What changes when the file at ``path`` is replaced or rewritten; None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime; RayServeException if the process is not connected to shoal."""
    if _runtime is None:
        raise RayServeException(
            "This process is not connected to a shoal instance: call `serve.run(...)` or "
            "`serve.start()` first, or set SHOAL_ADDRESS."
        )
    return _runtime


def current_runtime() -> Runtime | None:
    return _runtime


def connect_driver(control_endpoint: str) -> Runtime:
    """Start (once) the driver's runtime thread, connected to ``control_endpoint``."""
    global _runtime
    with _lock:
        if _runtime is not None:
            if _runtime.control_endpoint == control_endpoint:
                return _runtime
            _close_driver_locked()
        import uvloop

        loop = uvloop.new_event_loop()
        rt = Runtime(loop, control_endpoint)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()
            loop.close()

        rt._thread = threading.Thread(target=run, name="shoal-runtime", daemon=True)
        rt._thread.start()
        started.wait()
        rt.run_sync(rt._start)
        _runtime = rt
        return rt


def close_driver() -> None:
    with _lock:
        _close_driver_locked()


def _close_driver_locked() -> None:
    global _runtime
    if _runtime is not None and _runtime._thread is not None:
        rt, _runtime = _runtime, None
        rt.close()


def init_replica_runtime(control_endpoint: str, app_name: str, role: str = "replica") -> Runtime:
    """Create the runtime of a replica or proxy process on the running loop."""
    global _runtime
    rt = Runtime(asyncio.get_running_loop(), control_endpoint, app_name, role)
    rt._start()
    _runtime = rt
    return rt


async def shutdown_runtime() -> None:
    global _runtime
    if _runtime is not None:
        rt, _runtime = _runtime, None
        await rt.aclose()


atexit.register(close_driver)

"""``handle.broadcast(method, ...)``: one call of ``method`` on every running replica (Ray's alpha
``DeploymentHandle.broadcast``), for infrequent control-plane work such as cache resets.

The replicas are those the caller's snapshot lists as running when ``broadcast`` is called;
replicas added later are not included. Each gets its own call over a connection of its own (the
router's p2c queue is bypassed, and with it ``max_queued_requests``, as in Ray). A replica at
``max_ongoing_requests`` answers REJECTED; the call is then sent to the same replica again after
a backoff (25 ms doubling to 0.5 s), or at once when the replica says a slot freed (SLOT_FREE),
so every replica runs it once. A replica that dies first
yields ``ReplicaDiedError`` in its place. In local testing mode the one in-process instance runs
it.

``DeploymentBroadcastResponse.results()`` / ``await results_async()`` return one outcome per
replica (order not guaranteed); the first exception is raised unless ``return_exceptions``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from shoal.runtime import wire
from shoal.runtime.api import RuntimeAPI
from shoal.runtime.errors import DeploymentUnavailableError, ReplicaDiedError
from shoal.runtime.reply import Reply, ReplySink
from shoal.runtime.router import Call, ReplicaConn, Router

_INITIAL_BACKOFF_S = 0.025
_MAX_BACKOFF_S = 0.5
_FIRST_SNAPSHOT_WAIT_S = 10.0  # a fresh runtime's first snapshot normally arrives within ms

_SYNC_IN_LOOP = (
    "Sync methods should not be called from within an `asyncio` event loop. "
    "Use `await response.results_async()` instead."
)

MakeCall = Callable[[ReplySink], Call]


class _Fanout:
    """The ``ConnOwner`` of one broadcast's connections: retries REJECTED on the same replica."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deployment: str) -> None:
        self.loop = loop
        self.deployment = deployment
        self.conns: list[ReplicaConn] = []
        self._backoff_s: dict[ReplicaConn, float] = {}
        self._retries: dict[ReplicaConn, tuple[asyncio.TimerHandle, Call]] = {}  # rejected, waiting

    def on_reply(self, conn: ReplicaConn, call: Call, reply: Reply) -> None:
        if reply.kind == wire.Kind.REJECTED:
            delay_s = self._backoff_s.get(conn, _INITIAL_BACKOFF_S)
            self._backoff_s[conn] = min(delay_s * 2, _MAX_BACKOFF_S)
            self._retries[conn] = (self.loop.call_later(delay_s, self._resend, conn, call), call)
            return
        call.deliver(reply)

    def on_slot_free(self, conn: ReplicaConn) -> None:
        """The replica that rejected ``conn``'s call has a free slot: send the call again now."""
        waiting = self._retries.get(conn)
        if waiting is not None:
            waiting[0].cancel()
            self._resend(conn, waiting[1])

    def _resend(self, conn: ReplicaConn, call: Call) -> None:
        self._retries.pop(conn, None)
        if call.resolved:
            return
        if conn.dead:
            call.resolve(self._died(conn, call))
            return
        conn.send(call)

    def on_model_ids(self, conn: ReplicaConn) -> None:
        """Multiplexed model ids on a reply: a broadcast routes nothing by them."""

    def on_death(self, conn: ReplicaConn) -> None:
        conn.fail_all(lambda call: self._died(conn, call))

    def _died(self, conn: ReplicaConn, call: Call) -> BaseException:
        return ReplicaDiedError(
            f"Replica '{conn.replica_id}' of {self.deployment} died before it answered broadcast "
            f"request {call.request_id}."
        )

    def close(self) -> None:
        for timer, _call in self._retries.values():
            timer.cancel()
        self._retries.clear()
        for conn in self.conns:
            conn.close()


async def _wait_first_snapshot(rt: RuntimeAPI) -> None:
    """A runtime that has not yet received the controller's first snapshot knows no replicas;
    wait (bounded) for it. (Only the first call of a fresh process can get here.)"""
    wait_snapshot = getattr(rt, "wait_snapshot", None)
    if wait_snapshot is not None:
        await wait_snapshot(lambda snapshot: snapshot.version > 0, _FIRST_SNAPSHOT_WAIT_S)


async def fan_out(rt: RuntimeAPI, key: tuple[str, str], make_call: MakeCall) -> list[tuple[bool, Any]]:
    """Run one call per running replica of deployment ``key`` (on ``rt``'s loop) and return
    ``(ok, value_or_exception)`` per replica. DeploymentUnavailableError if there is none."""
    router = rt.router(*key)
    if not isinstance(router, Router):  # local testing mode: the one in-process instance
        sink = ReplySink()
        router.submit(make_call(sink))
        return [await _outcome(sink)]
    await _wait_first_snapshot(rt)
    if router.unavailable_reason is not None:
        raise DeploymentUnavailableError(router.deployment_id, router.unavailable_reason)
    addresses = router.entry.replicas
    if not addresses:
        raise DeploymentUnavailableError(router.deployment_id, "because it has no running replicas")
    fanout = _Fanout(rt.loop, router.deployment_id)
    sinks = []
    try:
        for address in addresses:
            conn = ReplicaConn(
                fanout, address.replica_id, address.incarnation, address.endpoint, rt.loop,
                on_slot_free=fanout.on_slot_free,
            )
            fanout.conns.append(conn)
            sink = ReplySink()
            sinks.append(sink)
            conn.send(make_call(sink))
        return list(await asyncio.gather(*(_outcome(s) for s in sinks)))
    finally:
        fanout.close()


async def _outcome(sink: ReplySink) -> tuple[bool, Any]:
    try:
        return True, await sink.result()
    except Exception as exc:
        return False, exc


def _collect(outcomes: list[tuple[bool, Any]], return_exceptions: bool) -> list[Any]:
    if not return_exceptions:
        for ok, value in outcomes:
            if not ok:
                raise value
    return [value for _, value in outcomes]


class DeploymentBroadcastResponse:
    """The outcomes of ``handle.broadcast(...)``: the calls are sent when ``broadcast`` is
    called; ``results()`` / ``await results_async()`` collect them."""

    def __init__(self, rt: RuntimeAPI, coro: Any) -> None:
        self._rt = rt
        self._task: asyncio.Task[list[tuple[bool, Any]]] | None = None
        self._future: concurrent.futures.Future[list[tuple[bool, Any]]] | None = None
        if rt.in_loop_thread():
            self._task = rt.loop.create_task(coro)
        else:
            self._future = asyncio.run_coroutine_threadsafe(coro, rt.loop)

    def results(self, *, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Block until every replica answered; one outcome per replica (order not guaranteed).

        ValueError for a negative ``timeout_s``; TimeoutError after it (the calls go on);
        RuntimeError when called from a running event loop.
        """
        if timeout_s is not None and timeout_s < 0:
            raise ValueError("timeout_s must be None or non-negative.")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(_SYNC_IN_LOOP)
        assert self._future is not None  # made off the loop: no loop runs in this thread
        try:
            outcomes = self._future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError("Timed out waiting for broadcast results.") from None
        return _collect(outcomes, return_exceptions)

    async def results_async(self, *, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Like ``results``, awaited (from any event loop)."""
        if timeout_s is not None and timeout_s < 0:
            raise ValueError("timeout_s must be None or non-negative.")
        if self._task is not None and self._rt.in_loop_thread():
            waiting: asyncio.Future[list[tuple[bool, Any]]] = asyncio.shield(self._task)
        elif self._future is not None:
            waiting = asyncio.shield(asyncio.wrap_future(self._future))
        else:  # made on the runtime's loop, awaited on another loop
            future = asyncio.run_coroutine_threadsafe(_await_task(self._task), self._rt.loop)
            waiting = asyncio.shield(asyncio.wrap_future(future))
        try:
            outcomes = await asyncio.wait_for(waiting, timeout_s)
        except TimeoutError:
            raise TimeoutError("Timed out waiting for broadcast results.") from None
        return _collect(outcomes, return_exceptions)

    def __repr__(self) -> str:
        return "DeploymentBroadcastResponse()"


async def _await_task(task: asyncio.Task[list[tuple[bool, Any]]] | None) -> list[tuple[bool, Any]]:
    assert task is not None
    return await task

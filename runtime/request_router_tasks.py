"""RoutingTasks: how a ``Router`` routes with a custom ``RequestRouter`` (Ray's routing loop).

The calls wait in the router's FIFO queue (``Router.queue``); up to
``min(waiting calls, 2 * replicas, 50)`` routing tasks run. Each takes the next call not yet
being routed and asks the request router for ranked tiers (``choose_replicas``); in the first
tier that has one, the replica with the lowest queue length below its ``max_ongoing_requests``
(as this caller knows it) is chosen. If none has room, the task asks again, at once the first
time, then after a backoff (``initial_backoff_s`` times ``backoff_multiplier`` per attempt, at
most ``max_backoff_s``), cut short when a request to the deployment ends or the replica set
changes. With ``FIFOMixin`` the replica found goes to the oldest waiting call (with the same
multiplexed model id if there is one), else to the call it was chosen for.

The call is then sent like any other: a replica at its limit answers REJECTED, and the call goes
back to the front of the queue to be routed again. Cancellation, deaths and the queue bound
(``max_queued_requests``) are the router's, as for the built-in router.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from shoal.runtime import wire
from shoal.runtime.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaResult,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
    lowest_queue_len,
)

if TYPE_CHECKING:
    from shoal.runtime.router import Call, ReplicaConn, Router

logger = logging.getLogger("shoal.router")

Sleep = Callable[[float], Coroutine[Any, Any, None]]
_WARN_EVERY_ATTEMPTS = 50


class RoutingTasks:
    def __init__(self, router: Router, policy: RequestRouter, sleep: Sleep) -> None:
        self.router = router
        self.policy = policy
        self._sleep = sleep
        self._fifo = isinstance(policy, FIFOMixin)
        self._to_route: collections.deque[Call] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakers: set[asyncio.Future[None]] = set()
        self._closed = False

    # -- what the router tells it -----------------------------------------------------------------

    def add(self, call: Call, *, front: bool = False) -> None:
        """Route ``call`` (already in ``router.queue``): at the front after a rejection."""
        if call.pending is None:
            call.pending = self._pending(call)
        else:
            call.pending.reset_future()
        if front:
            self._to_route.appendleft(call)
        else:
            self._to_route.append(call)
        self._start_tasks()

    def replicas_changed(self, conns: list[ReplicaConn]) -> None:
        self.policy.update_replicas([c.running for c in conns if c.running is not None])
        self.wake()
        self._start_tasks()

    def wake(self) -> None:
        """Cut the tasks' backoffs short: a slot may have freed up."""
        for waker in self._wakers:
            if not waker.done():
                waker.set_result(None)
        self._wakers.clear()

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._to_route.clear()

    # -- routing --------------------------------------------------------------------------------

    def _pending(self, call: Call) -> PendingRequest:
        header = call.header
        metadata = RequestMetadata(
            request_id=header.request_id,
            internal_request_id=f"{header.request_id}:{id(call):x}",
            call_method=header.method,
            route=header.route,
            app_name=self.router.app_name,
            multiplexed_model_id=header.multiplexed_model_id,
            is_streaming=header.stream,
            is_http_request=header.http,
        )

        def decode() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return ((), {}) if header.http else wire.loads_args(header.enc, call.payload, call.buffers)

        return PendingRequest(metadata, time.time(), self.router.loop.create_future(), _decode=decode)

    def _target(self) -> int:
        return min(len(self.router.queue), self.policy.max_num_routing_tasks)

    def _start_tasks(self) -> None:
        if self._closed:
            return
        for _ in range(self._target() - len(self._tasks)):
            task = self.router.loop.create_task(self._run())
            self._tasks.add(task)

    async def _run(self) -> None:
        task = asyncio.current_task()
        restart_after_s = 0.0
        call: Call | None = None
        try:
            while len(self._tasks) <= self._target():
                call = self._next_to_route()
                if call is None and not self._fifo:
                    break  # every waiting call has its task
                conn = await self._find(call)
                if conn is not None:
                    self._fulfill(conn, call)
        except Exception:
            logger.exception("the request router of %s raised; its requests wait for the next routing task",
                             self.router.deployment_id)
            restart_after_s = self.policy.max_backoff_s  # a router that keeps raising does not spin
            if call is not None and _waiting(call):
                self._to_route.appendleft(call)  # the next task routes it
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not self._closed and self.router.queue:
                self.router.loop.call_later(restart_after_s, self._start_tasks)

    def _next_to_route(self) -> Call | None:
        while self._to_route:
            call = self._to_route.popleft()
            if _waiting(call):
                return call
        return None

    async def _find(self, call: Call | None) -> ReplicaConn | None:
        """A replica with room for ``call`` (or, without one, for the next waiting call); None
        when there is nothing left to route or this task is one too many."""
        pending = call.pending if call is not None else None
        attempt = 0
        retried = False
        started = time.monotonic()
        while True:
            if (call is not None and not _waiting(call)) or not self.router.queue:
                return None
            if len(self._tasks) > self._target():
                if call is not None:
                    self._to_route.appendleft(call)
                return None
            if pending is not None:
                pending.routing_context.should_backoff = True
            tiers = await self.policy.choose_replicas(list(self.policy.curr_replicas.values()), pending)
            for tier in tiers:
                if tier:
                    chosen = lowest_queue_len([r for r in tier if self._sendable(r)])
                    if chosen is not None:
                        conn: ReplicaConn = chosen._conn
                        return conn
            if pending is not None and not pending.routing_context.should_backoff:
                continue
            if not retried:
                retried = True  # the first retry is immediate
                continue
            await self._backoff(self.policy._compute_backoff_s(attempt))
            attempt += 1
            if attempt % _WARN_EVERY_ATTEMPTS == 0:
                logger.warning("Failed to route request after %d attempts over %.2fs. Retrying. Request ID: %s.",
                               attempt, time.monotonic() - started, call.request_id if call is not None else "")

    def _sendable(self, replica: RunningReplica) -> bool:
        conn = replica._conn
        return conn is not None and not conn.dead and self.router.replicas.get(conn.replica_id) is conn

    async def _backoff(self, delay_s: float) -> None:
        loop = self.router.loop
        waker: asyncio.Future[None] = loop.create_future()
        self._wakers.add(waker)
        sleeper = loop.create_task(self._sleep(delay_s))
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            self._wakers.discard(waker)

    def _fulfill(self, conn: ReplicaConn, chosen_for: Call | None) -> None:
        """Send the call the replica goes to (see the module docstring) to ``conn``."""
        queue = self.router.queue
        target: Call | None = None
        if self._fifo:
            model_id = chosen_for.header.multiplexed_model_id if chosen_for is not None else ""
            if model_id:
                target = next((c for c in queue if c.header.multiplexed_model_id == model_id and _waiting(c)), None)
            if target is None:
                target = next((c for c in queue if _waiting(c)), None)
        elif chosen_for is not None and _waiting(chosen_for):
            target = chosen_for
        if target is None:
            return
        if target is not chosen_for and chosen_for is not None and _waiting(chosen_for):
            self._to_route.appendleft(chosen_for)  # it still needs a replica
        queue.remove(target)
        pending = target.pending
        assert pending is not None and conn.running is not None
        replica_id = conn.running.replica_id
        self.policy.on_send_request(replica_id)
        conn.send(target)
        if not pending.future.done():
            pending.future.set_result(conn.running)
        self.policy.on_request_routed(pending, replica_id, ReplicaResult(target.request_id, replica_id,
                                                                         lambda: self.router.cancel(target)))


def _waiting(call: Call) -> bool:
    """Not ended and not sent: the call still needs a replica."""
    return not call.resolved and call.conn is None

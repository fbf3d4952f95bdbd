"""Router: sends one caller's requests for one deployment to its replicas.

Each process (driver, proxy, replica) has one Router per deployment it calls, living on that
process's runtime loop; every method runs on the loop thread.

- A request goes to a replica chosen by power of two choices among the replicas this caller has
  fewer than ``max_ongoing_requests`` requests on. If there is none, it waits in the caller's FIFO
  queue; over ``max_queued_requests`` waiting, it fails at once with ``BackPressureError``.
- The replica enforces the limit across callers: a replica already at its limit answers REJECTED
  (nothing ran), the request goes back to the head of the queue and that replica is skipped for
  a backoff period (25 ms doubling to 0.5 s, Ray's defaults).
- Replica sets come from the controller's snapshots. A replica that leaves the snapshot while
  draining keeps its requests until they finish. A replica whose socket closes (its process
  exited) fails the requests it has not answered with ``ReplicaDiedError`` as soon as the
  connection sees it, after the replies it sent before closing are delivered: a request that
  may have started is never re-executed, and a reply that was sent is never lost.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from shoal.runtime import p2c, transport, wire
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.runtime.reply import END, PULL, Reply, Sink, decode_reply

logger = logging.getLogger("shoal.router")

_INITIAL_BACKOFF_S = 0.025
_MAX_BACKOFF_S = 0.5
_REPORT_TTL_S = 1.0

Clock = Callable[[], float]


@dataclass(eq=False, slots=True)
class Call:
    """One request from this process; ``payload`` holds the encoded arguments."""

    header: wire.RequestHeader
    payload: bytes
    sink: Sink
    call_id: int = 0
    conn: ReplicaConn | None = None
    cancelled: bool = False
    resolved: bool = False

    @property
    def request_id(self) -> str:
        return self.header.request_id

    def resolve(self, exc: BaseException | None = None, value: Any = None) -> None:
        """End the call (first outcome wins): with ``exc`` if given, else with ``value``."""
        if self.resolved:
            return
        self.resolved = True
        if exc is not None:
            self.sink.set_exception(exc)
        else:
            self.sink.set_result(value)

    def deliver(self, reply: Reply) -> None:
        """Hand a decoded reply (any kind but REJECTED, which the caller decides on) to the sink."""
        kind = reply.kind
        if kind == wire.Kind.RESULT:
            self.resolve(value=reply.value)
        elif self.resolved:
            return
        elif kind == wire.Kind.STREAM_ITEM:
            self.sink.push(reply.value)
        elif kind == wire.Kind.STREAM_END:
            if reply.value is not END:  # a last item may ride on the end of the stream
                self.sink.push(reply.value)
            self.resolved = True
            self.sink.finish()
        elif kind == wire.Kind.ERROR:
            self.resolve(reply.value)
        elif kind == wire.Kind.CANCELLED:
            self.resolve(RequestCancelledError(self.request_id))
        elif kind == wire.Kind.PULL and self.header.http:
            self.sink.push(PULL)

    def ack(self, n: int) -> None:
        """Tell the replica running this HTTP call that its client took ``n`` more response
        batches (see ``wire.RESPONSE_WINDOW``); nothing if it runs nowhere now."""
        conn = self.conn
        if conn is not None and self.call_id in conn.calls:
            conn.channel.send_message(wire.Message(wire.Kind.ACK, conn.incarnation, self.call_id, {"n": n}))

    def cancel(self) -> bool:
        """Mark the call cancelled and end it with RequestCancelledError; False if it had ended
        or was cancelled already (nothing to do)."""
        if self.cancelled or self.resolved:
            return False
        self.cancelled = True
        self.resolve(RequestCancelledError(self.request_id))
        return True


class ConnOwner(Protocol):
    """Who a ``ReplicaConn`` reports to (a Router, or the supervisor's ``ReplicaControl``)."""

    def on_reply(self, conn: ReplicaConn, call: Call, reply: Reply) -> None:
        """A reply for ``call``; terminal ones are already removed from ``conn.calls``."""

    def on_death(self, conn: ReplicaConn) -> None:
        """The replica's socket closed (it exited): every reply it sent has been delivered; the
        calls left in ``conn.calls`` will never be answered."""


class ReplicaConn:
    """One DEALER connection from this process to one replica incarnation.

    The connection watches its socket: when the replica's end closes, the replies already
    received are delivered first, then ``owner.on_death`` is called (``dead`` is then True).
    """

    def __init__(
        self, owner: ConnOwner, replica_id: str, incarnation: int, endpoint: str,
        loop: asyncio.AbstractEventLoop, clock: Clock = time.monotonic,
    ) -> None:
        self.owner = owner
        self.replica_id = replica_id
        self.incarnation = incarnation
        self.reported_q = 0  # the replica's ongoing count (all callers) at its last reply ...
        self.reported_at = 0.0  # ... and when it came; older than _REPORT_TTL_S it is ignored
        self.skip_until = 0.0
        self.calls: dict[int, Call] = {}  # sent, no terminal reply yet
        self.dead = False
        self._clock = clock
        self._ids = itertools.count(1)
        sock = transport.make_socket(zmq.DEALER)
        self.channel = transport.Channel(sock, self._on_message, loop, on_disconnect=self._on_disconnect)
        sock.connect(endpoint)  # after the monitor starts, so that it sees the connection

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def send(self, call: Call) -> None:
        call.call_id = next(self._ids)
        call.conn = self
        self.calls[call.call_id] = call
        self.channel.send_message(wire.request(self.incarnation, call.call_id, call.header, call.payload))

    def send_cancel(self, call: Call) -> None:
        self.channel.send_message(wire.Message(wire.Kind.CANCEL, self.incarnation, call.call_id))

    def send_receive(self, call: Call, message: dict[str, Any]) -> None:
        """Forward a later ASGI receive message to a request running on this replica."""
        self.channel.send_message(
            wire.Message(wire.Kind.RECEIVE, self.incarnation, call.call_id, {}, (wire.pack(message),))
        )

    def fail_all(self, exc_for: Callable[[Call], BaseException]) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.resolve(exc_for(call))

    def close(self) -> None:
        self.channel.close()

    def _on_message(self, frames: list[bytes]) -> None:
        msg = wire.decode(frames)
        if msg.incarnation != self.incarnation:
            return  # a reply from another incarnation is never taken for ours
        call = self.calls.get(msg.call_id)
        if call is None:
            return
        try:
            reply = decode_reply(msg, call.header.http)
        except Exception as exc:
            del self.calls[msg.call_id]
            call.resolve(RayServeException(f"undecodable reply to request {call.request_id}: {exc!r}"))
            return
        if msg.kind in wire.TERMINAL_KINDS:
            del self.calls[msg.call_id]
            self.reported_q = reply.q
            self.reported_at = self._clock()
        self.owner.on_reply(self, call, reply)

    def _on_disconnect(self) -> None:
        if not self.dead:
            self.dead = True
            self.owner.on_death(self)


class Router:
    """The calls of this process to one deployment; every method runs on ``loop``'s thread.

    ``clock`` (seconds, monotonic) times REJECTED backoffs and replica reports; tests pass a
    fake one.
    """

    def __init__(
        self,
        app_name: str,
        deployment_name: str,
        loop: asyncio.AbstractEventLoop,
        on_queued: Callable[[Router], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.app_name = app_name
        self._on_queued = on_queued  # called when a request waits here (autoscaling signal)
        self.autoscaling = False
        self.deployment_name = deployment_name
        self.loop = loop
        self.replicas: dict[str, ReplicaConn] = {}
        self.draining: dict[str, ReplicaConn] = {}
        self.queue: collections.deque[Call] = collections.deque()
        self.entry = wire.DeploymentEntry()
        self.unavailable_reason: str | None = None
        self._clock = clock
        self._dropped: set[ReplicaConn] = set()  # gone from the snapshot, awaiting their death
        self._rng = random.Random()
        self._backoff_s = _INITIAL_BACKOFF_S
        self._retry: asyncio.TimerHandle | None = None
        self._load_of = self._load  # bound once: _choose runs per request

    @property
    def deployment_id(self) -> str:
        return f"Deployment(name='{self.deployment_name}', app='{self.app_name}')"

    # -- requests -------------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        if call.cancelled:
            call.resolve(RequestCancelledError(call.request_id))
            return
        if self.unavailable_reason is not None:
            call.resolve(DeploymentUnavailableError(self.deployment_id, self.unavailable_reason))
            return
        if not self.queue:
            conn = self._choose()
            if conn is not None:
                conn.send(call)
                return
        entry = self.entry
        if entry.max_queued_requests != -1 and len(self.queue) >= entry.max_queued_requests:
            call.resolve(
                BackPressureError(
                    num_queued_requests=len(self.queue),
                    max_queued_requests=entry.max_queued_requests,
                    status_code=entry.backpressure_status_code,
                    retry_after_s=entry.backpressure_retry_after_s,
                )
            )
            return
        self.queue.append(call)
        if self.autoscaling and self._on_queued is not None:
            self._on_queued(self)

    def cancel(self, call: Call) -> None:
        """Cancel ``call``: its outcome becomes RequestCancelledError at once."""
        if not call.cancel():
            return
        conn = call.conn
        if conn is not None and call.call_id in conn.calls:
            conn.send_cancel(call)
        else:
            try:
                self.queue.remove(call)
            except ValueError:
                pass

    def send_receive(self, call: Call, message: dict[str, Any]) -> bool:
        """Forward ``message`` to the replica running ``call``; False if it runs nowhere now."""
        conn = call.conn
        if conn is None or call.call_id not in conn.calls:
            return False
        conn.send_receive(call, message)
        return True

    def on_reply(self, conn: ReplicaConn, call: Call, reply: Reply) -> None:
        kind = reply.kind
        if kind == wire.Kind.REJECTED:
            call.conn = None
            if not call.cancelled:
                conn.skip_until = self._clock() + self._backoff_s
                self.queue.appendleft(call)
                self._schedule_retry(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)
        else:
            if kind == wire.Kind.RESULT:
                self._backoff_s = _INITIAL_BACKOFF_S
            call.deliver(reply)
        if kind in wire.TERMINAL_KINDS:
            self._pump()

    def on_death(self, conn: ReplicaConn) -> None:
        """The replica's socket closed: its calls fail now (none is re-sent: it may have run).
        Nothing is pumped: a dead connection takes no more calls, so no slot was freed."""

        def died(call: Call) -> BaseException:
            return ReplicaDiedError(
                f"Replica '{conn.replica_id}' of deployment '{self.deployment_name}' in app "
                f"'{self.app_name}' died while handling request {call.request_id}; the request "
                "did not complete and was not retried."
            )

        conn.fail_all(died)
        if conn in self._dropped:
            self._dropped.discard(conn)
            conn.close()

    def _choose(self) -> ReplicaConn | None:
        limit = self.entry.max_ongoing_requests
        now = 0.0
        candidates = []
        for conn in self.replicas.values():
            if conn.in_flight >= limit or conn.dead:
                continue
            if conn.skip_until:
                now = now or self._clock()
                if conn.skip_until > now:
                    continue
                conn.skip_until = 0.0
            candidates.append(conn)
        return p2c.choose(candidates, self._load_of, self._rng)

    def _load(self, conn: ReplicaConn) -> int:
        """This caller's requests on the replica, or the replica's own recent count if it said
        more (other callers' requests count too)."""
        if conn.reported_q > conn.in_flight and self._clock() - conn.reported_at < _REPORT_TTL_S:
            return conn.reported_q
        return conn.in_flight

    def _pump(self) -> None:
        while self.queue:
            conn = self._choose()
            if conn is None:
                if self.replicas and not self._retry:
                    self._schedule_retry(self._backoff_s)
                return
            call = self.queue.popleft()
            if not call.cancelled:
                conn.send(call)

    def _schedule_retry(self, delay_s: float) -> None:
        if self._retry is None:
            self._retry = self.loop.call_later(delay_s, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        self._pump()

    # -- replica sets ---------------------------------------------------------------------------

    def update(self, entry: wire.DeploymentEntry | None) -> None:
        """Apply this deployment's entry of a controller snapshot (None: it does not exist)."""
        if entry is None:
            self.unavailable_reason = "because it does not exist or was deleted"
            self._set_replicas((), ())
        else:
            self.entry = entry
            self.autoscaling = entry.autoscaling
            failed = entry.failed_reason
            self.unavailable_reason = f"because it failed to deploy: {failed}" if failed else None
            self._set_replicas(entry.replicas, entry.draining)
        if self.unavailable_reason is not None:
            queued, self.queue = self.queue, collections.deque()
            for call in queued:
                call.resolve(DeploymentUnavailableError(self.deployment_id, self.unavailable_reason))
        self._pump()

    def _set_replicas(
        self, running: tuple[wire.ReplicaAddress, ...], draining: tuple[wire.ReplicaAddress, ...]
    ) -> None:
        running_ids = {r.replica_id for r in running}
        draining_ids = {r.replica_id for r in draining}
        for rid in list(self.replicas):
            if rid not in running_ids:
                conn = self.replicas.pop(rid)
                if rid in draining_ids:
                    self.draining[rid] = conn
                else:
                    self._drop(conn)
        for rid in list(self.draining):
            if rid not in draining_ids and rid not in running_ids:
                self._drop(self.draining.pop(rid))
        for address in running:
            current = self.replicas.get(address.replica_id)
            if current is not None and current.incarnation != address.incarnation:
                self._drop(self.replicas.pop(address.replica_id))
                current = None
            if current is None:
                self.replicas[address.replica_id] = ReplicaConn(
                    self, address.replica_id, address.incarnation, address.endpoint, self.loop, self._clock
                )

    def _drop(self, conn: ReplicaConn) -> None:
        """Forget a replica the snapshot no longer lists: it has exited or is exiting. Replies it
        sent before exiting are delivered first; calls left then fail when its socket closes
        (at once if it is closed already or was never connected); none is ever re-sent."""
        conn.channel.drain_now()
        if conn.calls and not conn.dead and conn.channel.connected:
            self._dropped.add(conn)  # on_death fails the rest and closes it
            return
        if conn.calls:
            conn.dead = True
            self.on_death(conn)
        conn.close()

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for conn in [*self.replicas.values(), *self.draining.values(), *self._dropped]:
            conn.fail_all(lambda call: RequestCancelledError(call.request_id))
            conn.close()
        self.replicas.clear()
        self.draining.clear()
        self._dropped.clear()
        for call in self.queue:
            call.resolve(RequestCancelledError(call.request_id))
        self.queue.clear()

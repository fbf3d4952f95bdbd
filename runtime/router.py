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
  draining keeps its requests until they finish; one that is gone fails its requests at once
  with ``ReplicaDiedError``: a request that may have started is never re-executed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from shoal.runtime import p2c, transport, wire
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
    as_remote_error,
    RayServeException,
)

logger = logging.getLogger("shoal.router")

_INITIAL_BACKOFF_S = 0.025
_MAX_BACKOFF_S = 0.5
_REPORT_TTL_S = 1.0
_DEATH_GRACE_S = 0.2


class Sink(Protocol):
    """Where a call's outcome goes (see ``handle``); called on the loop thread."""

    def set_result(self, value: Any) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...
    def push(self, item: Any) -> None: ...
    def finish(self) -> None: ...


@dataclass(eq=False)
class Call:
    """One request from this process; ``payload`` holds the encoded arguments."""

    method: str
    request_id: str
    stream: bool
    enc: int
    payload: bytes
    sink: Sink
    meta: dict[str, Any] = field(default_factory=dict)
    call_id: int = 0
    conn: "ReplicaConn | None" = None
    cancelled: bool = False
    resolved: bool = False

    def resolve(self, exc: BaseException | None = None, value: Any = None) -> None:
        if self.resolved:
            return
        self.resolved = True
        if exc is not None:
            self.sink.set_exception(exc)
        else:
            self.sink.set_result(value)


def decode_error(meta: dict[str, Any], data: bytes) -> BaseException:
    cause, tb_text = wire.loads(meta.get("enc", 0), data)
    if cause is None:
        return RayServeException(tb_text)
    return as_remote_error(cause, tb_text)


class ReplicaConn:
    """One DEALER connection from this process to one replica incarnation."""

    def __init__(self, router: "Router", replica_id: str, incarnation: int, endpoint: str) -> None:
        self.router = router
        self.replica_id = replica_id
        self.incarnation = incarnation
        self.reported_q = 0  # the replica's ongoing count (all callers) at its last reply ...
        self.reported_at = 0.0  # ... and when it came; older than _REPORT_TTL_S it is ignored
        self.skip_until = 0.0
        self.calls: dict[int, Call] = {}  # sent, no terminal reply yet
        self._ids = itertools.count(1)
        sock = transport.make_socket(zmq.DEALER)
        sock.connect(endpoint)
        self.channel = transport.Channel(sock, self._on_message, router.loop)

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def send(self, call: Call) -> None:
        call.call_id = next(self._ids)
        call.conn = self
        self.calls[call.call_id] = call
        meta = {"m": call.method, "rid": call.request_id, "enc": call.enc, **call.meta}
        if call.stream:
            meta["s"] = True
        self.channel.send_message(
            wire.Message(wire.Kind.REQUEST, self.incarnation, call.call_id, meta, (call.payload,))
        )

    def send_cancel(self, call: Call) -> None:
        self.channel.send_message(wire.Message(wire.Kind.CANCEL, self.incarnation, call.call_id))

    def fail_all(self, exc_for: Any) -> None:
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
        if msg.kind in wire.TERMINAL_KINDS:
            del self.calls[msg.call_id]
            self.reported_q = msg.meta.get("q", 0)
            self.reported_at = time.monotonic()
        self.router.on_reply(self, call, msg)

    def send_receive(self, call: Call, message: dict[str, Any]) -> None:
        """Forward a later ASGI receive message to a request running on this replica."""
        self.channel.send_message(
            wire.Message(wire.Kind.RECEIVE, self.incarnation, call.call_id, {}, (wire.pack(message),))
        )


class Router:
    def __init__(
        self,
        app_name: str,
        deployment_name: str,
        loop: asyncio.AbstractEventLoop,
        on_queued: Any = None,
    ) -> None:
        self.app_name = app_name
        self._on_queued = on_queued  # called when a request waits here (autoscaling signal)
        self.autoscaling = False
        self.deployment_name = deployment_name
        self.loop = loop
        self.replicas: dict[str, ReplicaConn] = {}
        self.draining: dict[str, ReplicaConn] = {}
        self.queue: collections.deque[Call] = collections.deque()
        self.max_ongoing_requests = 5
        self.max_queued_requests = -1
        self.backpressure: dict[str, Any] = {}
        self.unavailable_reason: str | None = None
        self._rng = random.Random()
        self._backoff_s = _INITIAL_BACKOFF_S
        self._retry: asyncio.TimerHandle | None = None

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
        if self.max_queued_requests != -1 and len(self.queue) >= self.max_queued_requests:
            call.resolve(
                BackPressureError(
                    num_queued_requests=len(self.queue),
                    max_queued_requests=self.max_queued_requests,
                    status_code=self.backpressure.get("status_code", 503),
                    retry_after_s=self.backpressure.get("retry_after_s"),
                )
            )
            return
        self.queue.append(call)
        if self.autoscaling and self._on_queued is not None:
            self._on_queued(self)

    def cancel(self, call: Call) -> None:
        """Cancel ``call``: its outcome becomes RequestCancelledError at once."""
        if call.cancelled or call.resolved:
            return
        call.cancelled = True
        if call.conn is not None and call.call_id in call.conn.calls:
            call.conn.send_cancel(call)
        else:
            try:
                self.queue.remove(call)
            except ValueError:
                pass
        call.resolve(RequestCancelledError(call.request_id))

    def send_receive(self, call: Call, message: dict[str, Any]) -> bool:
        """Forward ``message`` to the replica running ``call``; False if it runs nowhere now."""
        conn = call.conn
        if conn is None or call.call_id not in conn.calls:
            return False
        conn.send_receive(call, message)
        return True

    def on_reply(self, conn: ReplicaConn, call: Call, msg: wire.Message) -> None:
        kind = msg.kind
        if kind == wire.Kind.RESULT:
            self._backoff_s = _INITIAL_BACKOFF_S
            call.resolve(value=wire.loads(msg.meta.get("enc", 0), msg.payload[0]) if msg.payload else None)
        elif kind == wire.Kind.STREAM_ITEM:
            if not call.resolved:
                call.sink.push(wire.loads(msg.meta.get("enc", 0), msg.payload[0]))
        elif kind == wire.Kind.STREAM_END:
            if not call.resolved:
                if msg.payload:  # a last item may ride on the end of the stream
                    call.sink.push(wire.loads(msg.meta.get("enc", 0), msg.payload[0]))
                call.resolved = True
                call.sink.finish()
        elif kind == wire.Kind.ERROR:
            call.resolve(decode_error(msg.meta, msg.payload[0]))
        elif kind == wire.Kind.CANCELLED:
            call.resolve(RequestCancelledError(call.request_id))
        elif kind == wire.Kind.REJECTED:
            call.conn = None
            if not call.cancelled:
                conn.skip_until = time.monotonic() + self._backoff_s
                self.queue.appendleft(call)
                self._schedule_retry(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)
        if kind in wire.TERMINAL_KINDS:
            self._pump()

    def _choose(self) -> ReplicaConn | None:
        limit = self.max_ongoing_requests
        now = 0.0
        candidates = []
        for conn in self.replicas.values():
            if conn.in_flight >= limit:
                continue
            if conn.skip_until:
                now = now or time.monotonic()
                if conn.skip_until > now:
                    continue
                conn.skip_until = 0.0
            candidates.append(conn)
        return p2c.choose(candidates, _load, self._rng)

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

    def update(self, entry: dict[str, Any] | None) -> None:
        """Apply this deployment's entry of a controller snapshot (None: it does not exist)."""
        if entry is None:
            self.unavailable_reason = "because it does not exist or was deleted"
            self._set_replicas([], [])
        else:
            self.max_ongoing_requests = entry["max_ongoing_requests"]
            self.max_queued_requests = entry["max_queued_requests"]
            self.backpressure = entry.get("backpressure") or {}
            self.autoscaling = bool(entry.get("autoscaling"))
            failed = entry.get("failed_reason")
            self.unavailable_reason = f"because it failed to deploy: {failed}" if failed else None
            self._set_replicas(entry["replicas"], entry.get("draining", []))
        if self.unavailable_reason is not None:
            queued, self.queue = self.queue, collections.deque()
            for call in queued:
                call.resolve(DeploymentUnavailableError(self.deployment_id, self.unavailable_reason))
        self._pump()

    def _set_replicas(self, running: list[list[Any]], draining: list[list[Any]]) -> None:
        running_ids = {r[0] for r in running}
        draining_ids = {r[0] for r in draining}
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
        for rid, incarnation, endpoint in running:
            conn = self.replicas.get(rid)
            if conn is not None and conn.incarnation != incarnation:
                self._drop(self.replicas.pop(rid))
                conn = None
            if conn is None:
                self.replicas[rid] = ReplicaConn(self, rid, incarnation, endpoint)

    def _drop(self, conn: ReplicaConn) -> None:
        """Forget a replica that is gone. Replies it sent before exiting may still be on their
        way (another socket than the snapshot's), so its remaining calls fail only after a
        short grace; none is ever re-sent."""
        conn.channel.drain_now()
        if not conn.calls:
            conn.close()
            return

        def died(call: Call) -> BaseException:
            return ReplicaDiedError(
                f"Replica '{conn.replica_id}' of deployment '{self.deployment_name}' in app "
                f"'{self.app_name}' died while handling request {call.request_id}; the request "
                "did not complete and was not retried."
            )

        def finish() -> None:
            conn.channel.drain_now()
            conn.fail_all(died)
            conn.close()
            self._pump()

        self.loop.call_later(_DEATH_GRACE_S, finish)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for conn in [*self.replicas.values(), *self.draining.values()]:
            conn.fail_all(lambda call: RequestCancelledError(call.request_id))
            conn.close()
        self.replicas.clear()
        self.draining.clear()
        for call in self.queue:
            call.resolve(RequestCancelledError(call.request_id))
        self.queue.clear()


def _load(conn: ReplicaConn) -> int:
    """This caller's requests on the replica, or the replica's own recent count if it said more
    (other callers' requests count too)."""
    if conn.reported_q > conn.in_flight and time.monotonic() - conn.reported_at < _REPORT_TTL_S:
        return conn.reported_q
    return conn.in_flight

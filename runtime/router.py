"""Router: sends one caller's requests for one deployment to its replicas.

Each process (driver, proxy, replica) has one Router per deployment it calls, living on that
process's runtime loop; every method runs on the loop thread.

- A request goes to a replica chosen by power of two choices among the replicas this caller has
  fewer than ``max_ongoing_requests`` requests on. If there is none, it waits in the caller's FIFO
  queue; over ``max_queued_requests`` waiting, it fails at once with ``BackPressureError``.
- The replica enforces the limit across callers: a replica already at its limit answers REJECTED
  (nothing ran), the request goes back to the head of the queue and that replica is skipped for
  a backoff period (``RequestRouterConfig``'s ``initial_backoff_s`` times ``backoff_multiplier``
  per rejection, at most ``max_backoff_s``: 25 ms doubling to 0.5 s by default, Ray's). The
  replica remembers whom it rejected and tells them when a slot frees (SLOT_FREE): that ends the
  skip at once and the queue is pumped, so the timer is only the fallback (a SLOT_FREE lost
  with a full set of remembered callers, or a replica of an older protocol).
- Messages to a replica are posted on its connection (``Channel.post``): those made in one loop
  iteration go out as one ZeroMQ message at its end.
- Which replicas a request may go to is the deployment's request router's choice
  (``RequestRouterConfig``; ``request_router``). The built-in power-of-two-choices router is
  applied synchronously, in the call to ``submit`` or when a slot frees up; a multiplexed
  request prefers the replicas holding its model (``PowerOfTwoChoicesRequestRouter.choose_now``).
  A custom router's ``choose_replicas`` runs in routing tasks (``request_router_tasks``); the
  REJECTED protocol, the queue bound, cancellation and deaths are the same for both.
- The multiplexed models each replica holds come from the snapshots, and from the replica's
  replies to multiplexed calls (newest version wins), so the caller that made a replica load a
  model sends the next request for it there without waiting for the controller.
- Metrics (``router_metrics``): each accepted request is counted per route; the queue and the
  requests at replicas are sampled into gauges (every 100 ms, with the counts).
- Replica sets come from the controller's snapshots. A replica that leaves the snapshot while
  draining keeps its requests until they finish. A replica whose socket closes (its process
  exited) fails the requests it has not answered with ``ReplicaDiedError`` as soon as the
  connection sees it, after the replies it sent before closing are delivered: a request that
  may have started is never re-executed, and a reply that was sent is never lost.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from shoal.runtime import p2c, router_metrics, shm, transport, wire
from shoal.runtime.context import ReplicaID
from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.runtime.reply import END, PULL, Reply, Sink, decode_reply
from shoal.runtime.request_router import (
    DeploymentHandleSource,
    PowerOfTwoChoicesRequestRouter,
    RequestRouter,
    RunningReplica,
    router_class,
)
from shoal.runtime.request_router_tasks import RoutingTasks

logger = logging.getLogger("shoal.router")

_REPORT_TTL_S = 1.0

Clock = Callable[[], float]


@dataclass(eq=False, slots=True)
class Call:
    """One request from this process; ``payload`` holds the encoded arguments, ``buffers``
    their out-of-band buffers (``wire.dumps_oob``) and ``segments`` the shared-memory segments
    among them, which this call removes when it ends (``shm``)."""

    header: wire.RequestHeader
    payload: bytes
    sink: Sink
    call_id: int = 0
    conn: ReplicaConn | None = None
    cancelled: bool = False
    resolved: bool = False
    pending: Any = None  # its PendingRequest, when a custom request router routes it
    buffers: tuple[Any, ...] = ()
    segments: tuple[str, ...] = ()

    @property
    def request_id(self) -> str:
        return self.header.request_id

    def resolve(self, exc: BaseException | None = None, value: Any = None) -> None:
        """End the call (first outcome wins): with ``exc`` if given, else with ``value``."""
        if self.resolved:
            return
        self.resolved = True
        if self.segments:
            self.release_segments()
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
            if self.segments:
                self.release_segments()
            self.sink.finish()
        elif kind == wire.Kind.ERROR:
            self.resolve(reply.value)
        elif kind == wire.Kind.CANCELLED:
            self.resolve(RequestCancelledError(self.request_id))
        elif kind == wire.Kind.PULL and self.header.http:
            self.sink.push(PULL)

    def release_segments(self) -> None:
        """Remove the call's shared-memory segments (it has ended: no replica will map them)."""
        segments, self.segments = self.segments, ()
        shm.release(segments)

    def ack(self, n: int) -> None:
        """Tell the replica running this HTTP call that its client took ``n`` more response
        batches (see ``wire.RESPONSE_WINDOW``); nothing if it runs nowhere now."""
        conn = self.conn
        if conn is not None and self.call_id in conn.calls:
            conn.channel.post(wire.Message(wire.Kind.ACK, conn.incarnation, self.call_id, {"n": n}))

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

    def on_model_ids(self, conn: ReplicaConn) -> None:
        """A reply told a newer ``conn.model_ids``."""


class ReplicaConn:
    """One DEALER connection from this process to one replica incarnation.

    The connection watches its socket: when the replica's end closes, the replies already
    received are delivered first, then ``owner.on_death`` is called (``dead`` is then True).
    ``on_slot_free(conn)`` is called when the replica says a slot freed after it rejected this
    caller (SLOT_FREE).
    """

    def __init__(
        self, owner: ConnOwner, replica_id: str, incarnation: int, endpoint: str,
        loop: asyncio.AbstractEventLoop, clock: Clock = time.monotonic,
        on_slot_free: Callable[[ReplicaConn], None] | None = None,
    ) -> None:
        self.owner = owner
        self.replica_id = replica_id
        self.incarnation = incarnation
        self.reported_q = 0  # the replica's ongoing count (all callers) at its last reply ...
        self.reported_at = 0.0  # ... and when it came; older than _REPORT_TTL_S it is ignored
        self.skip_until = 0.0
        self.calls: dict[int, Call] = {}  # sent, no terminal reply yet
        self.dead = False
        self.model_ids = _NO_MODELS  # the multiplexed models the replica holds, newest known
        self.running: RunningReplica | None = None  # how request routers see it
        self._clock = clock
        self._on_slot_free = on_slot_free
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
        self.channel.post(wire.request(self.incarnation, call.call_id, call.header, call.payload, call.buffers))

    def send_cancel(self, call: Call) -> None:
        self.channel.post(wire.Message(wire.Kind.CANCEL, self.incarnation, call.call_id))

    def send_receive(self, call: Call, message: dict[str, Any]) -> None:
        """Forward a later ASGI receive message to a request running on this replica."""
        self.channel.post(wire.Message(wire.Kind.RECEIVE, self.incarnation, call.call_id, {}, (wire.pack(message),)))

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
        if msg.kind == wire.Kind.SLOT_FREE:
            if self._on_slot_free is not None:
                self._on_slot_free(self)
            return
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
            if call.header.multiplexed_model_id:
                model_ids = wire.reply_model_ids(msg.meta)
                if model_ids is not None and model_ids.version > self.model_ids.version:
                    self.model_ids = model_ids
                    self.owner.on_model_ids(self)
        self.owner.on_reply(self, call, reply)

    def _on_disconnect(self) -> None:
        if not self.dead:
            self.dead = True
            self.owner.on_death(self)


_NO_MODELS = wire.ModelIds()


def _model_ids_of(conn: ReplicaConn) -> tuple[str, ...]:
    return conn.model_ids.ids


class Router:
    """The calls of this process to one deployment; every method runs on ``loop``'s thread.

    ``clock`` (seconds, monotonic) times REJECTED backoffs and replica reports, and ``sleep``
    a custom request router's backoffs; tests pass fake ones. ``handle_source`` tells request
    routers who routes (the proxy, a replica, a driver).
    """

    def __init__(
        self,
        app_name: str,
        deployment_name: str,
        loop: asyncio.AbstractEventLoop,
        on_queued: Callable[[Router], None] | None = None,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep,
        handle_source: DeploymentHandleSource = DeploymentHandleSource.UNKNOWN,
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
        self._sleep = sleep
        self._handle_source = handle_source
        self._spec = wire.RouterSpec()
        self._backoff_s = self._spec.initial_backoff_s
        self._retry: asyncio.TimerHandle | None = None
        self._load_of = self._load  # bound once: _choose runs per request
        self.routing: RoutingTasks | None = None  # routes the calls when the router is custom
        self.policy: RequestRouter | None = None
        self._router_error: str | None = None  # why the custom request router could not be made
        self.metrics = router_metrics.RouterMetrics(self)

    @property
    def handle_id(self) -> str:
        """This router's id in the ``handle`` label of its metrics."""
        return self.metrics.handle_id

    def at_replicas(self) -> int:
        """Requests sent to replicas (running, draining or dropped) and not finished."""
        conns = [*self.replicas.values(), *self.draining.values(), *self._dropped]
        return sum(len(conn.calls) for conn in conns)

    @property
    def deployment_id(self) -> str:
        return f"Deployment(name='{self.deployment_name}', app='{self.app_name}')"

    # -- requests -------------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        if call.cancelled:
            call.resolve(RequestCancelledError(call.request_id))
            return
        if self.unavailable_reason is not None:
            self.metrics.count(call.header.route)
            call.resolve(DeploymentUnavailableError(self.deployment_id, self.unavailable_reason))
            return
        if not self.queue and self.routing is None:
            conn = self._choose(call.header.multiplexed_model_id)
            if conn is not None:
                self.metrics.count(call.header.route)
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
        self.metrics.count(call.header.route)
        self.queue.append(call)
        if self.routing is not None:
            self.routing.add(call)
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
        routing = self.routing
        if kind == wire.Kind.REJECTED:
            call.conn = None
            if not call.cancelled:
                if routing is not None:
                    self.queue.appendleft(call)
                    routing.add(call, front=True)
                else:
                    spec = self._spec
                    conn.skip_until = self._clock() + self._backoff_s
                    self.queue.appendleft(call)
                    self._schedule_retry(self._backoff_s)
                    self._backoff_s = min(self._backoff_s * spec.backoff_multiplier, spec.max_backoff_s)
        else:
            if kind == wire.Kind.RESULT:
                self._backoff_s = self._spec.initial_backoff_s
            call.deliver(reply)
        if kind in wire.TERMINAL_KINDS:
            if routing is not None:
                self._tell_policy(conn, call, reply)
                routing.wake()
            else:
                self._pump()

    def on_slot_free(self, conn: ReplicaConn) -> None:
        """The replica ``conn`` rejected this caller and has a free slot now: end its skip and
        send what waits (a custom router's tasks stop their backoffs and look again)."""
        conn.skip_until = 0.0
        if self.routing is not None:
            self.routing.wake()
        elif self.queue:
            self._pump()

    def wake_routing(self) -> None:
        """End a custom request router's backoffs now (a slot may have freed up)."""
        if self.routing is not None:
            self.routing.wake()

    def _tell_policy(self, conn: ReplicaConn, call: Call, reply: Reply) -> None:
        policy, running = self.policy, conn.running
        if policy is None or running is None:
            return
        try:
            policy.on_new_queue_len_info(running.replica_id, reply.q)
            if reply.kind != wire.Kind.REJECTED and call.pending is not None:
                policy.on_request_completed(running.replica_id, call.pending.metadata.internal_request_id)
        except Exception:
            logger.exception("the request router of %s raised in a callback", self.deployment_id)

    def on_model_ids(self, conn: ReplicaConn) -> None:
        if self.routing is not None and conn.running is not None:
            conn.running._update(self.entry.max_ongoing_requests, conn.model_ids.ids, self.entry.routing_stats.get(conn.replica_id))
            self.routing.replicas_changed(list(self.replicas.values()))

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
        if self.policy is not None and conn.running is not None:
            try:
                self.policy.on_replica_actor_died(conn.running.replica_id)
            except Exception:
                logger.exception("the request router of %s raised in on_replica_actor_died", self.deployment_id)
        if conn in self._dropped:
            self._dropped.discard(conn)
            conn.close()

    def _choose(self, multiplexed_model_id: str = "") -> ReplicaConn | None:
        """The built-in router's choice among the replicas with room for one more request from
        this caller (not dead, not skipped after a REJECTED), or None."""
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
        if multiplexed_model_id:
            return PowerOfTwoChoicesRequestRouter.choose_now(
                candidates, multiplexed_model_id, _model_ids_of, self._load_of, self._rng
            )
        return p2c.choose(candidates, self._load_of, self._rng)

    def _load(self, conn: ReplicaConn) -> int:
        """This caller's requests on the replica, or the replica's own recent count if it said
        more (other callers' requests count too)."""
        if conn.reported_q > conn.in_flight and self._clock() - conn.reported_at < _REPORT_TTL_S:
            return conn.reported_q
        return conn.in_flight

    def _pump(self) -> None:
        queue = self.queue
        while queue:
            head = queue[0]
            if head.cancelled:
                queue.popleft()
                continue
            conn = self._choose(head.header.multiplexed_model_id)
            if conn is None:
                if self.replicas and not self._retry:
                    self._schedule_retry(self._backoff_s)
                return
            queue.popleft()
            conn.send(head)

    def _schedule_retry(self, delay_s: float) -> None:
        if self._retry is None:
            self._retry = self.loop.call_later(delay_s, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        if self.routing is None:
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
            self._set_replicas(entry.replicas, entry.draining)
            if entry.router != self._spec:
                self._set_router(entry.router)
            self.unavailable_reason = f"because it failed to deploy: {failed}" if failed else self._router_error
        if self.unavailable_reason is not None:
            queued, self.queue = self.queue, collections.deque()
            for call in queued:
                call.resolve(DeploymentUnavailableError(self.deployment_id, self.unavailable_reason))
        if self.routing is not None:
            self._update_running()
            self.routing.replicas_changed(list(self.replicas.values()))
        else:
            self._pump()

    def _set_router(self, spec: wire.RouterSpec) -> None:
        """Route with the request router ``spec`` names from now on: the built-in one in
        ``_choose``, a custom one in routing tasks. A class that cannot be loaded here makes the
        deployment's calls fail with the reason."""
        self._spec = spec
        self._backoff_s = spec.initial_backoff_s
        self._router_error = None
        if self.routing is not None:
            self.routing.close()
            self.routing, self.policy = None, None
        if spec.is_default:
            return
        try:
            from shoal.serve.config import DeploymentID

            cls = router_class(spec.request_router_class)
            policy = cls(
                deployment_id=DeploymentID(self.deployment_name, self.app_name),
                handle_source=self._handle_source,
                get_curr_time_s=time.time,
                initial_backoff_s=spec.initial_backoff_s,
                backoff_multiplier=spec.backoff_multiplier,
                max_backoff_s=spec.max_backoff_s,
            )
            policy.initialize_state(**spec.request_router_kwargs)
        except Exception as exc:
            logger.exception("the request router of %s could not be created", self.deployment_id)
            self._router_error = f"because its request router could not be created: {type(exc).__name__}: {exc}"
            return
        self.policy = policy
        self.routing = RoutingTasks(self, policy, self._sleep)
        self._update_running()
        for call in self.queue:
            self.routing.add(call)

    def _update_running(self) -> None:
        """Bring each replica's ``RunningReplica`` up to date with the entry."""
        entry = self.entry
        for conn in self.replicas.values():
            snapshot_ids = entry.model_ids.get(conn.replica_id)
            if snapshot_ids is not None and snapshot_ids.version > conn.model_ids.version:
                conn.model_ids = snapshot_ids
            if conn.running is None:
                unique_id = conn.replica_id.rsplit("#", 1)[-1]
                conn.running = RunningReplica(
                    ReplicaID(unique_id, self.deployment_name, self.app_name), entry.max_ongoing_requests,
                    functools.partial(self._load, conn), conn,
                )
            conn.running._update(entry.max_ongoing_requests, conn.model_ids.ids, entry.routing_stats.get(conn.replica_id))

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
        model_ids = self.entry.model_ids
        for address in running:
            current = self.replicas.get(address.replica_id)
            if current is not None and current.incarnation != address.incarnation:
                self._drop(self.replicas.pop(address.replica_id))
                current = None
            if current is None:
                current = self.replicas[address.replica_id] = ReplicaConn(
                    self, address.replica_id, address.incarnation, address.endpoint, self.loop, self._clock,
                    on_slot_free=self.on_slot_free,
                )
            if model_ids:
                known = model_ids.get(address.replica_id)
                if known is not None and known.version > current.model_ids.version:
                    current.model_ids = known

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
        self.metrics.close()
        if self._retry is not None:
            self._retry.cancel()
        if self.routing is not None:
            self.routing.close()
        for conn in [*self.replicas.values(), *self.draining.values(), *self._dropped]:
            conn.fail_all(lambda call: RequestCancelledError(call.request_id))
            conn.close()
        self.replicas.clear()
        self.draining.clear()
        self._dropped.clear()
        for call in self.queue:
            call.resolve(RequestCancelledError(call.request_id))
        self.queue.clear()

"""ReplicaWorker: one replica's request loop on its ROUTER socket.

Contract with callers (see ``wire``): every REQUEST gets exactly one terminal reply, even one
cancelled before its task first ran. A request that arrives while ``max_ongoing_requests`` are
running, or while the replica drains, is answered REJECTED at once and never runs, so the caller
may route it elsewhere. CANCEL cancels the request's task: the user coroutine sees
``asyncio.CancelledError`` and the caller gets CANCELLED. Terminal replies carry the replica's
current ongoing count (``ReplyHeader.q``). Replies to HTTP calls are msgpack only
(``wire.dumps_plain``).

HTTP request bodies stream: a first receive message with ``more_body`` is followed by RECEIVE
frames, one per PULL this replica sends when the app takes a chunk (at most one chunk is asked
for ahead of the app, so the caller holds the rest of the body back: backpressure). HTTP
responses are flow-controlled the other way: the app's ``send`` waits once
``wire.RESPONSE_WINDOW`` batches are unacknowledged by the caller (ACK), so a client that reads
slowly holds the app back instead of filling the caller's memory.

A caller REJECTED for want of a slot (not for draining) is remembered (at most
``_MAX_REJECTED_CALLERS`` of them); when a slot frees, each is sent one SLOT_FREE, after the
reply that freed it, and forgotten: its router ends its backoff on this replica and sends what
waits (the callers' timers stay as the fallback). Without it, callers in other processes, each
counting only its own requests, would overshoot, be rejected and sleep through their backoffs
while the replica idles.

Replies are posted (``Channel.post``): those made in one loop iteration for the same caller go
out together at its end.

Stopping: ``drain()`` makes new requests REJECTED and waits, up to a deadline, for the ongoing
ones to finish; ``cancel_all()`` then cancels the rest and answers each: an HTTP request whose
response has not started gets a 503 saying the replica shut down, any other request an error
(``ReplicaUnavailableError``), never a bare CANCELLED.

Metrics (``replica_metrics``): every request that is not the supervisor's own is counted when
it ends, by its route, with its latency and, if it raised (a user exception answered with a
500 over HTTP included) or was cancelled, the exception's class name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import functools
import logging
import os
import time
import traceback
from collections.abc import MutableMapping
from typing import Any

from shoal.runtime import request_router_report, shm, wire
from shoal.runtime.asgi import HTTP_METHOD, HttpHandler, normalize_message, scope_from_wire, to_messages
from shoal.runtime.context import RequestContext, get_replica_context, in_replica, reset_request, set_request
from shoal.runtime.errors import RemoteError, ReplicaUnavailableError
from shoal.runtime.logs import AccessLog
from shoal.runtime.replica_metrics import ReplicaMetrics
from shoal.runtime.reply import ReplySink
from shoal.runtime.transport import Channel
from shoal.runtime.user_code import UserCallable
from shoal.runtime.wire import GRPC_METHOD, HEALTH_METHOD, METRICS_METHOD, RECONFIGURE_METHOD, ROUTING_STATS_METHOD

logger = logging.getLogger("shoal.replica")

# The supervisor's calls, the only ones outside max_ongoing_requests (HTTP requests, whose method
# name is also reserved, count like any other).
_INTERNAL_METHODS = frozenset((HEALTH_METHOD, RECONFIGURE_METHOD, METRICS_METHOD, ROUTING_STATS_METHOD))
# The rejected callers remembered to be told of a free slot; past it, the others wait for their
# backoff timers (a caller is one process's connection: there are rarely more than a handful).
_MAX_REJECTED_CALLERS = 1024


_INTERNAL_DIRS = tuple(
    os.path.dirname(path) + os.sep for path in (__file__, asyncio.__file__, concurrent.futures.thread.__file__)
)


def format_user_traceback(exc: BaseException, where: str) -> str:
    """The traceback of a user exception without shoal's and asyncio's own frames."""
    tb = traceback.TracebackException.from_exception(exc)
    tb.stack = traceback.StackSummary.from_list(
        [frame for frame in tb.stack if not frame.filename.startswith(_INTERNAL_DIRS)]
    )
    return f"Raised in {where}:\n" + "".join(tb.format())


def encode_exception(exc: BaseException, where: str, plain: bool = False) -> tuple[wire.Encoding, bytes]:
    """Encode a user exception with its traceback text for an ERROR frame.

    An exception that cannot be pickled, or any exception when ``plain`` (the reply to an HTTP
    call, msgpack only), travels as its type name, message and traceback.
    """
    if isinstance(exc, RemoteError):
        tb_text = f"{exc.remote_traceback.rstrip()}\n\nwhich reached {where}."
        cause: BaseException = exc.cause
    else:
        tb_text = format_user_traceback(exc, where)
        cause = exc
    try:
        if plain:
            raise TypeError("msgpack only")
        enc, data = wire.dumps((cause, tb_text))
    except Exception:
        enc, data = wire.dumps((None, f"{type(cause).__qualname__}: {cause}\n\n{tb_text}"))
    return enc, data


class _Credit:
    """The response batches one HTTP request may still send before its caller ACKs more."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._more = asyncio.Event()

    async def take(self) -> None:
        while self.n <= 0:
            self._more.clear()
            await self._more.wait()
        self.n -= 1

    def give(self, n: int) -> None:
        self.n += n
        self._more.set()


class ReplicaWorker:
    def __init__(
        self,
        *,
        user: UserCallable,
        incarnation: int,
        max_ongoing_requests: int,
        app_name: str,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        """``metrics``: where this replica records (one is made for it if not given: the
        replica's process makes it before the constructor runs, to count the start as Ray)."""
        self.user = user
        self.incarnation = incarnation
        self.max_ongoing_requests = max_ongoing_requests
        self.app_name = app_name
        self.where = f"deployment '{user.deployment_name}' of app '{app_name}' (pid {os.getpid()})"
        self.channel: Channel | None = None
        self.http = HttpHandler(user)
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._receives: dict[tuple[bytes, int], ReplySink] = {}
        self._responding: set[tuple[bytes, int]] = set()  # HTTP requests whose response went out in part
        self._credits: dict[tuple[bytes, int], _Credit] = {}  # HTTP responses: batches they may still send
        self._rejected: dict[bytes, None] = {}  # callers REJECTED since the last free slot, in order
        self._draining = False
        self._stopping = False  # cancel_all: the requests still running are being given up
        self._idle = asyncio.Event()
        self._idle.set()
        if metrics is None:
            replica = get_replica_context().replica_tag if in_replica() else ""
            metrics = ReplicaMetrics(
                deployment=user.deployment_name, replica=replica, application=app_name,
                max_ongoing_requests=max_ongoing_requests,
            )
        self.metrics = metrics
        self._user_ongoing = 0  # requests running, the supervisor's own calls excluded

    @property
    def ongoing(self) -> int:
        return len(self._tasks)

    def attach(self, channel: Channel) -> None:
        self.channel = channel
        channel.on_unroutable = self._unroutable
        self.metrics.start_reporting()

    def on_message(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        msg = wire.decode(rest)
        if msg.incarnation != self.incarnation:
            # Addressed to a predecessor: it never runs here.
            self._send(identity, wire.reply(wire.Kind.REJECTED, self.incarnation, msg.call_id, q=self.ongoing))
            return
        if msg.kind == wire.Kind.REQUEST:
            self._on_request(identity, msg)
        elif msg.kind == wire.Kind.CANCEL:
            task = self._tasks.get((identity, msg.call_id))
            if task is not None:
                task.cancel()
        elif msg.kind == wire.Kind.ACK:
            credit = self._credits.get((identity, msg.call_id))
            if credit is not None:
                credit.give(int(msg.meta.get("n", 0)))
        elif msg.kind == wire.Kind.RECEIVE:
            inbox = self._receives.get((identity, msg.call_id))
            if inbox is not None:
                inbox.push(wire.unpack(msg.payload[0]))
        else:
            logger.warning("replica got an unexpected %s message", msg.kind.name)

    def _on_request(self, identity: bytes, msg: wire.Message) -> None:
        header = wire.RequestHeader.from_meta(msg.meta)
        internal = header.method in _INTERNAL_METHODS
        if not internal and (self._draining or self.ongoing >= self.max_ongoing_requests):
            self._send(identity, wire.reply(wire.Kind.REJECTED, self.incarnation, msg.call_id, q=self.ongoing))
            if not self._draining and len(self._rejected) < _MAX_REJECTED_CALLERS:
                self._rejected[identity] = None
            return
        key = (identity, msg.call_id)
        task = asyncio.get_running_loop().create_task(self._run(identity, msg, header, internal))
        self._tasks[key] = task
        self._idle.clear()
        if not internal:
            self._user_ongoing += 1
            self.metrics.set_ongoing(self._user_ongoing)
        task.add_done_callback(functools.partial(self._released, key, internal))

    def _released(self, key: tuple[bytes, int], internal: bool, _task: asyncio.Task[None]) -> None:
        if key in self._tasks:
            # ``_run`` releases its key before it replies; still here, the task was cancelled
            # before its first step and ``_run`` never ran: answer for it.
            self._release(key, internal)
            self._send(key[0], self._cancelled_reply(key, "", http=None))
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A request ended (its reply is sent): if that left a slot free, tell the callers
        rejected since the last time (one SLOT_FREE each) and forget them."""
        if self._rejected and not self._draining and self.ongoing < self.max_ongoing_requests:
            callers, self._rejected = self._rejected, {}
            for identity in callers:
                self._send(identity, wire.Message(wire.Kind.SLOT_FREE, self.incarnation))

    def _release(self, key: tuple[bytes, int], internal: bool) -> None:
        if self._tasks.pop(key, None) is None:
            return
        if not self._tasks:
            self._idle.set()
        if not internal:
            self._user_ongoing -= 1
            self.metrics.set_ongoing(self._user_ongoing)

    async def _run(self, identity: bytes, msg: wire.Message, header: wire.RequestHeader, internal: bool) -> None:
        method = header.method
        access = AccessLog(method, header.route, header.request_id, enabled=not internal)
        route = None if internal else self.metrics.route(header.route)
        started_s = time.perf_counter()
        error_type: str | None = None
        token = set_request(
            RequestContext(
                request_id=header.request_id,
                route=header.route,
                app_name=self.app_name,
                multiplexed_model_id=header.multiplexed_model_id,
                is_http_request=header.http,
            )
        )
        call_id = msg.call_id
        key = (identity, call_id)
        enc: wire.Encoding | None
        buffers: tuple[wire.Buffer, ...] = ()
        access_error = False  # a gRPC call answered with the user's exception's status
        try:
            if method == HTTP_METHOD:
                # msgpack only: this came from an HTTP client through the proxy.
                scope, first = wire.unpack(msg.payload[0])
                access.http(scope)
                final, answered = await self._serve_http(identity, call_id, key, scope_from_wire(scope), first)
                access.final = final
                if answered is not None:  # the user's exception, answered with a 500
                    error_type = type(answered).__name__
                kind = wire.Kind.STREAM_END
                enc, data = wire.dumps_plain(final) if final else (None, b"")
            elif method == GRPC_METHOD and header.http:
                grpc_final, grpc_error = await self._serve_grpc(identity, call_id, key, msg.payload[0],
                                                                 header.request_id)
                access.route = "gRPC"
                if grpc_error is not None:
                    error_type = type(grpc_error).__name__
                    access_error = True
                kind = wire.Kind.STREAM_END
                enc, data = wire.dumps_plain(grpc_final)
            else:
                kind, enc, data, buffers = await self._call(identity, msg, header)
        except asyncio.CancelledError:
            self._release(key, internal)
            if route is not None:
                self.metrics.finished(route, (time.perf_counter() - started_s) * 1000, "CancelledError")
            self._send(identity, self._cancelled_reply(key, header.request_id, http=header.http,
                                                       grpc=method == GRPC_METHOD))
            self._slot_freed()
            access.end("CANCELLED")
            raise
        except Exception as exc:
            logger.exception("request %s to method '%s' raised", header.request_id, method)
            kind = wire.Kind.ERROR
            enc, data = encode_exception(exc, self.where, plain=header.http)
            buffers = ()
            error_type = type(exc).__name__
        finally:
            reset_request(token)
            self._responding.discard(key)
        # Free the slot before replying, so the caller's next request is never rejected for it;
        # count the request before too, so a caller that got its reply sees it counted.
        self._release(key, internal)
        if route is not None:
            self.metrics.finished(route, (time.perf_counter() - started_s) * 1000, error_type)
        model_ids = request_router_report.current() if header.multiplexed_model_id else None
        self._send(identity, wire.reply(kind, self.incarnation, call_id, enc, data, self.ongoing, model_ids, buffers))
        self._slot_freed()
        access.end("ERROR" if access_error else kind.name)

    def _cancelled_reply(self, key: tuple[bytes, int], request_id: str, http: bool | None, grpc: bool = False) -> wire.Message:
        """CANCELLED; or, when the replica gives the request up at its shutdown deadline, an
        answer saying so: a 503 response if the request is HTTP and its response has not
        started, UNAVAILABLE if it is a gRPC call, else an error (msgpack only unless ``http``
        is False: None means unknown)."""
        call_id = key[1]
        if not self._stopping:
            return wire.reply(wire.Kind.CANCELLED, self.incarnation, call_id, q=self.ongoing)
        message = self._gave_up(request_id)
        if grpc:
            from shoal.runtime import grpc_call

            outcome = wire.GrpcOutcome(grpc_call.UNAVAILABLE, message, (), None)
            enc, data = wire.dumps_plain(grpc_call.final_reply(outcome, None))
            return wire.reply(wire.Kind.STREAM_END, self.incarnation, call_id, enc, data, self.ongoing)
        if http and key not in self._responding:
            enc, data = wire.dumps_plain(to_messages(message, status=503))
            return wire.reply(wire.Kind.STREAM_END, self.incarnation, call_id, enc, data, self.ongoing)
        enc, data = encode_exception(ReplicaUnavailableError(message), self.where, plain=http is not False)
        return wire.reply(wire.Kind.ERROR, self.incarnation, call_id, enc, data, self.ongoing)

    def _gave_up(self, request_id: str) -> str:
        return (
            f"The replica of deployment '{self.user.deployment_name}' shut down before request "
            f"{request_id or '(unknown)'} finished (graceful_shutdown_timeout_s passed)."
        )

    async def _call(
        self, identity: bytes, msg: wire.Message, header: wire.RequestHeader
    ) -> tuple[wire.Kind, wire.Encoding | None, bytes, tuple[wire.Buffer, ...]]:
        """Run a handle call; returns its terminal reply's kind and payload with its buffers
        (stream items are sent as they come)."""
        method = header.method
        args, kwargs = wire.loads_args(header.enc, msg.payload[0], msg.buffers) if msg.payload else ((), {})
        caller = wire.caller_pid(msg.meta)
        segments = tuple(b for b in msg.buffers if type(b) is wire.SegmentRef)  # may go back as they are
        if method == HEALTH_METHOD:
            await self.user.check_health()
            return wire.Kind.RESULT, *self._encode(None)
        if method == METRICS_METHOD:
            return wire.Kind.RESULT, *self._encode(self.ongoing - 1)
        if method == RECONFIGURE_METHOD:
            await self.reconfigure(args[0])
            return wire.Kind.RESULT, *self._encode(None)
        if method == ROUTING_STATS_METHOD:
            return wire.Kind.RESULT, *self._encode(await self.routing_stats())
        if header.stream:
            async for item in self.user.stream(method, args, kwargs):
                enc, data, buffers = self._encode(item, caller, segments)
                self._send(identity, wire.reply(wire.Kind.STREAM_ITEM, self.incarnation, msg.call_id, enc, data, buffers=buffers))
            return wire.Kind.STREAM_END, None, b"", ()
        value = await self.user.call(method, args, kwargs)
        return wire.Kind.RESULT, *self._encode(value, caller, segments)

    async def _serve_http(
        self, identity: bytes, call_id: int, key: tuple[bytes, int], scope: dict[str, Any], first: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], Exception | None]:
        """Run one HTTP or WebSocket request; returns the last batch of messages (maybe empty) to
        ride on the STREAM_END reply (a plain response is then a single frame), and the user's
        exception if the response is the 500 (or 503) that answered it."""
        inbox = ReplySink()
        inbox.push(first)
        receive = inbox.next
        credit: _Credit | None = None
        if scope["type"] == "websocket":
            self._receives[key] = inbox
        else:
            credit = self._credits[key] = _Credit(wire.RESPONSE_WINDOW)
            if first.get("more_body", False):
                self._receives[key] = inbox
                receive = functools.partial(self._pull_body, identity, call_id, inbox)
        held_start: dict[str, Any] | None = None
        final: list[dict[str, Any]] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal held_start
            message = normalize_message(message)
            if message["type"] == "http.response.start":
                held_start = message  # travels with the first body message
                return
            batch = [held_start, message] if held_start is not None else [message]
            held_start = None
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                final.extend(batch)
                return
            if credit is not None:
                await credit.take()  # a client reading slowly holds the app here, not in memory
            self._responding.add(key)
            self._send(identity, wire.reply(wire.Kind.STREAM_ITEM, self.incarnation, call_id, *wire.dumps_plain(batch)))

        try:
            answered = await self.http.handle(scope, receive, send)
        finally:
            self._receives.pop(key, None)
            self._credits.pop(key, None)
        if held_start is not None:
            final.insert(0, held_start)
        return final, answered

    async def _serve_grpc(
        self, identity: bytes, call_id: int, key: tuple[bytes, int], payload: bytes, request_id: str,
    ) -> tuple[dict[str, Any], BaseException | None]:
        """Run one gRPC call (``runtime/grpc_call.py``); a streamed response's items go out as
        they come, under the same window as HTTP responses (the proxy ACKs them as its client
        takes them); a streamed request's messages come one per PULL, as an HTTP body's chunks."""
        from shoal.runtime import grpc_call

        credit = self._credits[key] = _Credit(wire.RESPONSE_WINDOW)
        inbox = self._receives[key] = ReplySink()  # a client-streaming call's messages (RECEIVE)

        async def next_message() -> Any:
            self._send(identity, wire.reply(wire.Kind.PULL, self.incarnation, call_id))
            return await inbox.next()

        async def send_item(data: bytes) -> None:
            await credit.take()
            self._responding.add(key)
            self._send(identity, wire.reply(wire.Kind.STREAM_ITEM, self.incarnation, call_id, *wire.dumps_plain(data)))

        try:
            return await grpc_call.serve(self.user, payload, request_id, send_item, next_message)
        finally:
            self._credits.pop(key, None)
            self._receives.pop(key, None)

    async def _pull_body(self, identity: bytes, call_id: int, inbox: ReplySink) -> Any:
        """The app's ``receive`` while a request body streams in: each chunk handed to the app
        that says more follows asks the caller for the next one (PULL)."""
        message = await inbox.next()
        if message.get("type") == "http.request" and message.get("more_body", False):
            self._send(identity, wire.reply(wire.Kind.PULL, self.incarnation, call_id))
        return message

    def _encode(
        self, value: Any, caller_pid: int = 0, segments: tuple[wire.SegmentRef, ...] = ()
    ) -> tuple[wire.Encoding, bytes, tuple[wire.Buffer, ...]]:
        """``value`` encoded for a reply to process ``caller_pid``, with its out-of-band buffers
        (large ones in shared-memory segments that the caller removes, if its pid is known; the
        request's own ``segments`` again where a buffer is one of them); TypeError if it cannot
        be serialized."""
        try:
            enc, data, buffers = wire.dumps_oob(value)
        except Exception as exc:
            raise TypeError(
                f"The value returned by deployment '{self.user.deployment_name}' could not be "
                f"serialized: {exc!r}"
            ) from exc
        if not buffers:
            return enc, data, ()
        if not caller_pid:
            return enc, data, tuple(b.raw() for b in buffers)
        return enc, data, shm.place(buffers, caller_pid, segments)[0]

    def _send(self, identity: bytes, msg: wire.Message) -> None:
        """Post ``msg`` to the caller ``identity`` (it goes out at the end of the iteration)."""
        assert self.channel is not None
        self.channel.post(msg, identity)

    def _unroutable(self, msg: wire.Message, identity: bytes | None) -> None:
        """The channel could not send ``msg``: its caller is gone."""
        logger.debug("caller of call %d is gone; %s dropped", msg.call_id, msg.kind.name)
        if msg.buffers:
            shm.release_refs(msg.buffers)  # nobody else will remove its segments

    async def routing_stats(self) -> list[Any] | None:
        """The user's ``record_routing_stats()`` (sync or async), encoded for the supervisor to
        pass on without decoding it: ``[enc, data]``; None if the deployment has no such method.
        TypeError if it returns something other than a dict."""
        method = getattr(self.user.instance, "record_routing_stats", None)
        if method is None or not callable(method):
            return None
        stats = await self.user.invoke(method, (), {})
        if not isinstance(stats, dict):
            raise TypeError(f"record_routing_stats must return a dict, got {type(stats).__name__}.")
        enc, data = wire.dumps(stats)
        return [int(enc), data]

    async def reconfigure(self, update: dict[str, Any]) -> None:
        """Apply option changes that need no restart: ``max_ongoing_requests``, ``world_size``,
        ``rank`` and ``user_config`` (the last two through the user's ``reconfigure``; if it
        raises, the error goes back to the supervisor, which keeps the old config)."""
        if "max_ongoing_requests" in update:
            self.max_ongoing_requests = int(update["max_ongoing_requests"])
            self.metrics.max_ongoing_requests = self.max_ongoing_requests
            if in_replica():
                get_replica_context().max_ongoing_requests = self.max_ongoing_requests
            self.user.resize(self.max_ongoing_requests)
        rank: Any = 0
        if in_replica():
            ctx = get_replica_context()
            if "world_size" in update:
                ctx.world_size = int(update["world_size"])
            if update.get("rank") is not None:
                from shoal.serve.schema import ReplicaRank

                ctx.rank = ReplicaRank(rank=int(update["rank"]), node_rank=0, local_rank=int(update["rank"]))
            rank = ctx.rank
        if "user_config" in update:
            await self.user.reconfigure(update["user_config"], rank)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait for ongoing ones; True if all finished in time."""
        self._draining = True
        self.metrics.stop_reporting()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def cancel_all(self) -> None:
        """Give up every request still running (the shutdown deadline passed), answering each
        (see the module's docstring)."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

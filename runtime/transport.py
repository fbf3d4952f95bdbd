"""ZeroMQ sockets driven by an asyncio loop through callbacks, without a future per message.

``Channel`` wraps one socket. Incoming multipart messages are handed to ``on_message`` from the
loop's reader callback; ``send`` never blocks (sockets are created with no high-water mark, and
every queue in shoal is bounded by ``max_ongoing_requests``/``max_queued_requests`` instead).

ZeroMQ's notification descriptor is edge-triggered: any operation on the socket, a send included,
may consume the edge that announces pending input. So after every send and after every drain
batch the channel re-checks ``EVENTS`` and schedules another drain if input is waiting.

A channel built with ``on_disconnect`` watches its socket's connection through a ZeroMQ socket
monitor: when the peer's end closes, it first handles every message already received, then calls
``on_disconnect()``, so a peer's last replies always come before the news of its death. Connect
such a socket after building its channel: a connection made before the monitor starts is missed.

A channel built with ``key`` signs every message it sends with ``send_message`` (see
``wire.sign``); checking what arrives is the receiver's business (``wire.verify``), since only it
knows whom to tell. ``read_key`` reads the instance's key from its run directory.

A message's out-of-band buffers (``wire.Message.buffers``: arrays and large bytes) travel as
frames after the message frame, sent and received without a copy (``copy=False``): ZeroMQ holds
a reference to each sent buffer until libzmq has written it out, so a sender must not change a
buffer it passed until the message is sent (a caller knows it is once the reply came); on
receipt, ``on_message`` gets those frames as read-only memoryviews of ZeroMQ's own message,
which stays alive as long as they (and the arrays built on them) do. The message frame itself,
and every frame of a message without buffers, is copied into ``bytes`` (cheaper when small).

Coalescing (``post``): the first message posted in a loop iteration is sent at once, as
``send_message`` would send it; the messages posted after it in the same iteration are queued and
sent at its end (``loop.call_soon``), those for the same peer (the ROUTER identity; a DEALER has
one) as one ZeroMQ message (a ``wire`` BATCH). Every ZeroMQ send drops the GIL and may wake
libzmq's I/O thread with an eventfd write, and under load many messages for one peer are made in
one iteration: they cost two sends instead of one each. The first goes at once because holding
it until the iteration ends adds that iteration's remaining work to every round trip: with few
requests in flight (``max_ongoing_requests``), the peer would idle meanwhile (measured: up to
30-40% fewer HTTP requests/s at 64 connections with everything held). Order per peer is kept (``send`` and ``send_message`` send what was posted before them first);
a message whose peer is unreachable is given to ``on_unroutable``. A receiving channel hands
each message of a BATCH to ``on_message`` as if it had come alone, all in the same wake-up.

All methods must be called from the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from shoal.runtime import wire
from shoal.runtime.errors import ShoalConnectionError

logger = logging.getLogger("shoal.transport")

_DRAIN_BATCH = 256
# A BATCH holds at most this many messages and about this many bytes (the receiver handles a
# batch in one go); a message this large or larger is sent on its own.
_BATCH_MAX_MESSAGES = 256
_BATCH_MAX_BYTES = 256 * 1024
_ALONE_BYTES = 64 * 1024

KEY_FILE = "instance.key"  # in the run directory, beside the control socket

_context: zmq.Context[zmq.Socket[bytes]] | None = None
_context_pid: int | None = None


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """The process's ZeroMQ context, created on first use in this process (never inherited)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context()
        _context_pid = os.getpid()
    return _context


def terminate_context() -> None:
    """Terminate the process's context; every socket must be closed (they use linger 0)."""
    global _context
    if _context is not None and _context_pid == os.getpid():
        _context.term()
    _context = None


def key_path(control_endpoint: str) -> str:
    """The key file of the instance whose control socket is ``control_endpoint``
    (``ipc://<run dir>/control.sock``): ``KEY_FILE`` in the same run directory."""
    return os.path.join(os.path.dirname(control_endpoint.removeprefix("ipc://")), KEY_FILE)


def read_key(control_endpoint: str) -> bytes:
    """The secret key of the instance whose control socket is ``control_endpoint``: the
    ``key_path`` file its supervisor created. ShoalConnectionError if the file is missing (no
    supervisor runs there), is not a regular file of this user closed to everyone else, or does
    not hold a key."""
    path = key_path(control_endpoint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ShoalConnectionError(
            f"cannot read the shoal instance key {path} ({exc.strerror}); is the supervisor running?"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ShoalConnectionError(
                f"the shoal instance key {path} must be a file of yours with mode 600 "
                f"(it has mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}); refusing to use it"
            )
        key = os.read(fd, wire.KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != wire.KEY_BYTES:
        raise ShoalConnectionError(f"the shoal instance key {path} holds {len(key)} bytes, not {wire.KEY_BYTES}")
    return key


def make_socket(kind: int) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


class Channel:
    """One socket, its reader callback and non-blocking sends.

    ``on_message(frames)`` receives each multipart message as a list of bytes (ROUTER sockets
    include the peer identity as frame 0). Exceptions from it are logged, not propagated, so
    one bad message never stops the socket.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_message: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop | None = None,
        on_disconnect: Callable[[], None] | None = None,
        key: bytes | None = None,
    ) -> None:
        self.sock = sock
        self.key = key  # what ``send_message`` signs with (None: nothing is signed); may change
        self._on_message = on_message
        self._loop = loop or asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        # Frames copied on receipt (ROUTER identity, message); the rest are buffers, uncopied.
        self._copied = {int(zmq.ROUTER): 2, int(zmq.DEALER): 1}.get(cast(int, sock.getsockopt(zmq.TYPE)), 0)
        self._drain_scheduled = False
        self._check_scheduled = False
        # Posted, not yet sent: by peer identity (None on a DEALER), the encoded frames and the
        # message; sent by _flush at the end of the iteration.
        self._outbox: dict[bytes | None, list[tuple[list[Any], wire.Message]]] = {}
        self._flush_scheduled = False
        # Told of each posted message whose peer is unreachable (ROUTER): (message, identity).
        self.on_unroutable: Callable[[wire.Message, bytes | None], None] | None = None
        self._closed = False
        self.connected = False  # with on_disconnect: a connection is up (or was, until it closed)
        self._on_disconnect = on_disconnect
        self._monitor: Channel | None = None
        if on_disconnect is not None:
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            monitor.setsockopt(zmq.LINGER, 0)
            self._monitor = Channel(monitor, self._on_event, self._loop)
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, frames: list[Any], copy: bool = True) -> bool:
        """Queue a multipart message. Returns False if the peer is unreachable (ROUTER).

        ``copy=False``: frames of ``zmq.COPY_THRESHOLD`` bytes or more are sent from the
        buffers themselves, which must stay unchanged until sent (see the module docstring)."""
        if self._closed:
            return False
        if self._outbox:
            self._flush()  # what was posted before goes first
        try:
            # Copying is cheaper than zero-copy tracking for the small frames shoal sends.
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        finally:
            self._schedule_check()
        return True

    def send_message(self, msg: wire.Message, identity: bytes | None = None) -> bool:
        """Encode ``msg`` (signed if the channel has a key) and ``send`` it."""
        frames = wire.encode(msg)
        if self.key is not None:
            if msg.buffers:
                raise ValueError("a signed message carries no out-of-band buffers")
            frames = [wire.sign(frames[0], self.key)]
        if identity is not None:
            frames.insert(0, identity)
        return self.send(frames, copy=not msg.buffers)

    def post(self, msg: wire.Message, identity: bytes | None = None) -> None:
        """Send ``msg`` (to peer ``identity`` on a ROUTER) now if it is the first posted in this
        loop iteration, else at the iteration's end with the others posted for that peer (see the
        module docstring). Encoding errors are raised here; an unreachable peer is reported to
        ``on_unroutable``. Not for a channel that signs (its messages are few: ``send_message``)."""
        if self._closed:
            self._unroutable([(msg, identity)])
            return
        frames = wire.encode(msg)
        if not self._flush_scheduled:
            # The first of this iteration goes now; the flush ends the iteration (and checks
            # the input edge the send may have taken).
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
            self._send_posted(identity, frames, [msg])
            return
        queued = self._outbox.get(identity)
        if queued is None:
            self._outbox[identity] = [(frames, msg)]
        else:
            queued.append((frames, msg))

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        if self._closed:
            for identity, queued in outbox.items():
                self._unroutable([(msg, identity) for _, msg in queued])
            return
        for identity, queued in outbox.items():
            self._send_queued(identity, queued)
        self._check_pending()  # the sends may have taken the edge that announces input

    def _send_queued(self, identity: bytes | None, queued: list[tuple[list[Any], wire.Message]]) -> None:
        """Send one peer's posted messages in order: in BATCHes, or alone when single or large."""
        if len(queued) == 1:
            frames, msg = queued[0]
            self._send_posted(identity, frames, [msg])
            return
        batch: list[list[Any]] = []
        msgs: list[wire.Message] = []
        size = 0
        for frames, msg in queued:
            n = len(frames[0])
            if batch and (n >= _ALONE_BYTES or size + n > _BATCH_MAX_BYTES or len(batch) == _BATCH_MAX_MESSAGES):
                self._send_batch(identity, batch, msgs)
                batch, msgs, size = [], [], 0
            batch.append(frames)
            msgs.append(msg)
            size += n
        self._send_batch(identity, batch, msgs)

    def _send_batch(self, identity: bytes | None, batch: list[list[Any]], msgs: list[wire.Message]) -> None:
        if len(batch) == 1:
            self._send_posted(identity, batch[0], msgs)
        else:
            self._send_posted(identity, wire.encode_batch(batch), msgs)

    def _send_posted(self, identity: bytes | None, frames: list[Any], msgs: list[wire.Message]) -> None:
        if self._closed:
            self._unroutable([(msg, identity) for msg in msgs])
            return
        copy = len(frames) == 1
        if identity is not None:
            frames = [identity, *frames]
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM:
                self.close()
            elif exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                logger.exception("could not send %d message(s)", len(msgs))
            self._unroutable([(msg, identity) for msg in msgs])

    def _unroutable(self, lost: list[tuple[wire.Message, bytes | None]]) -> None:
        report = self.on_unroutable
        if report is None:
            return
        for msg, identity in lost:
            try:
                report(msg, identity)
            except Exception:
                logger.exception("error while reporting an unsent message")

    def drain_now(self) -> None:
        """Handle every connection event and message already waiting on the socket, now."""
        if self._monitor is not None:
            self._monitor.drain_now()
        while not self._closed and self._drain():
            pass

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; with ``linger_ms``, queued outgoing messages get that long to go."""
        if self._closed:
            return
        if self._outbox:
            self._flush()  # what was posted goes out first (within the linger)
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close()
        self.sock.close(linger=linger_ms)

    def _on_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED and not self._closed:
            self.connected = False
            while not self._closed and self._drain():  # the peer's last messages first
                pass
            if self._on_disconnect is not None and not self._closed:
                self._on_disconnect()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _schedule_check(self) -> None:
        # One EVENTS check per loop iteration covers every send made in it.
        if not self._check_scheduled and not self._closed:
            self._check_scheduled = True
            self._loop.call_soon(self._check_pending)

    def _check_pending(self) -> None:
        self._check_scheduled = False
        if not self._closed and cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._schedule_drain()

    def _drain(self) -> bool:
        """Handle up to a batch of waiting messages; True if the batch was full (more may wait)."""
        self._drain_scheduled = False
        for _ in range(_DRAIN_BATCH):
            if self._closed:
                return False
            try:
                frames = self._recv()
            except zmq.Again:
                return False
            except zmq.ContextTerminated:
                self.close()
                return False
            if self._copied and len(frames) >= self._copied and wire.is_batch(frames[self._copied - 1]):
                self._on_batch(frames)
                continue
            try:
                self._on_message(frames)
            except Exception:
                logger.exception("error while handling a message")
        self._check_pending()
        return True

    def _on_batch(self, frames: list[Any]) -> None:
        """Hand each message of a BATCH to ``on_message`` (with the ROUTER identity, if any)."""
        envelope = frames[:self._copied - 1]
        try:
            messages = wire.decode_batch(frames[self._copied - 1:])
        except wire.ProtocolError:
            logger.exception("dropped a malformed batch")
            return
        for message in messages:
            if self._closed:
                return
            try:
                self._on_message(envelope + message if envelope else message)
            except Exception:
                logger.exception("error while handling a message")

    def _recv(self) -> list[Any]:
        """One multipart message: the first ``_copied`` frames as bytes, the rest (buffers) as
        read-only views of ZeroMQ's messages; zmq.Again if none waits."""
        sock = self.sock
        if not self._copied:
            return sock.recv_multipart(zmq.NOBLOCK)
        frames: list[Any] = [sock.recv(zmq.NOBLOCK)]
        while sock.getsockopt(zmq.RCVMORE):
            if len(frames) < self._copied:
                frames.append(sock.recv(zmq.NOBLOCK))
            else:
                frames.append(memoryview(cast(Any, sock.recv(zmq.NOBLOCK, copy=False))).toreadonly())
        return frames

"""The reply path: decoding a replica's reply once, and the mailbox a call's outcome goes to.

``decode_reply(msg)`` turns a reply frame into a ``Reply`` (kind, value, ongoing count). Every
caller (handles, the proxy, the supervisor's ``ReplicaControl``, local testing mode) hands
outcomes to a sink through the four methods of ``Sink``:

- a unary call ends with ``set_result(value)`` or ``set_exception(exc)``;
- a streaming call gets ``push(item)`` per item, then ``finish()`` or ``set_exception(exc)``.

The first terminal outcome wins; later ones are ignored. ``ReplySink`` is fed and read on one
event loop (no lock); ``ThreadSafeSink`` is fed on the runtime loop and read from any thread
(``result_sync``/``next_sync``) or any loop (``result``/``next``).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Protocol

from shoal.runtime import wire
from shoal.runtime.errors import RayServeException, as_remote_error

END: Any = object()  # what ``next`` returns after the last item of a stream
PULL: Any = object()  # an item of an HTTP call's stream: its replica wants the next body chunk


class Sink(Protocol):
    """Where a call's outcome goes; every method is called on the runtime loop's thread."""

    def set_result(self, value: Any) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...
    def push(self, item: Any) -> None: ...
    def finish(self) -> None: ...


class Reply:
    """A decoded reply: ``value`` is the result, the stream item (``END`` if none rides on a
    STREAM_END) or, for ERROR, the exception to raise in the caller."""

    __slots__ = ("kind", "q", "value")

    def __init__(self, kind: wire.Kind, value: Any, q: int) -> None:
        self.kind = kind
        self.value = value
        self.q = q


def decode_reply(msg: wire.Message, plain_only: bool = False) -> Reply:
    """Decode a replica's reply. ``plain_only`` (replies to HTTP calls): ProtocolError unless
    the payload is msgpack, so nothing on the HTTP path is ever unpickled."""
    header = wire.ReplyHeader.from_meta(msg.meta, plain_only)
    if not msg.payload:
        return Reply(msg.kind, None if msg.kind != wire.Kind.STREAM_END else END, header.q)
    if msg.buffers and plain_only:
        raise wire.ProtocolError("a reply to an HTTP call carries no out-of-band buffers")
    value = wire.loads(header.enc, msg.payload[0], msg.buffers)
    if msg.kind == wire.Kind.ERROR:
        cause, tb_text = value
        value = RayServeException(tb_text) if cause is None else as_remote_error(cause, tb_text)
    return Reply(msg.kind, value, header.q)


class _Mailbox:
    """The state both sinks share: stream items, the value or error, done."""

    __slots__ = ("_done", "_error", "_items", "_value")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = False

    def _take(self) -> Any:
        """The next item, or END, or raise the error; only once an item is there or done."""
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            raise self._error
        return END

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class ReplySink(_Mailbox):
    """A call's outcome on one event loop: fed and read on that loop's thread only."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[None]] | None = None  # one per awaiting task

    def done(self) -> bool:
        return self._done

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def set_result(self, value: Any) -> None:
        if not self._done:
            self._value, self._done = value, True
            self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._error, self._done = exc, True
            self._wake()

    def push(self, item: Any) -> None:
        if not self._done:
            self._items.append(item)
            self._wake()

    def finish(self) -> None:
        self.set_result(None)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        await waiter

    async def result(self) -> Any:
        """The call's value, or raise its exception."""
        while not self._done:
            await self._wait()
        return self._outcome()

    async def next(self) -> Any:
        """The next stream item, END after the last, or raise the call's exception."""
        while not self._items and not self._done:
            await self._wait()
        return self._take()


class ThreadSafeSink(_Mailbox):
    """A call's outcome fed on the runtime loop, read from any thread or event loop.

    A reader thread that must wait sleeps on a lock of its own, released by the feeding loop
    (what ``threading.Condition`` does, without building a condition per call: a driver makes
    one of these per ``remote()``). ``result_sync`` on a finished call takes no lock at all.
    """

    __slots__ = ("_lock", "_sleepers", "_waiters")

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sleepers: list[threading.Lock] | None = None  # one held lock per blocked thread
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = None

    def done(self) -> bool:
        return self._done

    def _wake_locked(self) -> None:
        sleepers = self._sleepers
        if sleepers is not None:
            self._sleepers = None
            for sleeper in sleepers:
                sleeper.release()
        waiters = self._waiters
        if waiters is None:
            return
        self._waiters = None
        here = _running_loop()
        for loop, fut in waiters:
            if loop is here:  # a reader on the feeding loop itself: no wakeup through the pipe
                _set_if_pending(fut)
                continue
            try:
                loop.call_soon_threadsafe(_set_if_pending, fut)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def set_result(self, value: Any) -> None:
        with self._lock:
            if not self._done:
                # _value before _done: a reader that sees _done without the lock sees the value.
                self._value = value
                self._done = True
                self._wake_locked()

    def set_exception(self, exc: BaseException) -> None:
        with self._lock:
            if not self._done:
                self._error = exc
                self._done = True
                self._wake_locked()

    def push(self, item: Any) -> None:
        with self._lock:
            if not self._done:
                self._items.append(item)
                self._wake_locked()

    def finish(self) -> None:
        self.set_result(None)

    def _ready(self, stream: bool) -> bool:
        return self._done or (stream and bool(self._items))

    def _block(self, stream: bool, timeout_s: float | None) -> bool:
        """Sleep until the call is done (or, with ``stream``, an item is there); False after
        ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._ready(stream):
                    return True
                sleeper = threading.Lock()
                sleeper.acquire()
                if self._sleepers is None:
                    self._sleepers = [sleeper]
                else:
                    self._sleepers.append(sleeper)
            if deadline is None:
                sleeper.acquire()
                continue
            remaining_s = deadline - time.monotonic()
            if remaining_s > 0 and sleeper.acquire(timeout=remaining_s):
                continue
            with self._lock:
                if self._sleepers is not None and sleeper in self._sleepers:
                    self._sleepers.remove(sleeper)
                return self._ready(stream)

    def result_sync(self, timeout_s: float | None) -> Any:
        """The call's value, or raise its exception; TimeoutError after ``timeout_s``."""
        if not self._done and not self._block(False, timeout_s):
            raise TimeoutError
        return self._outcome()

    def next_sync(self, timeout_s: float | None) -> Any:
        """The next stream item, END after the last; TimeoutError after ``timeout_s``."""
        if not self._block(True, timeout_s):
            raise TimeoutError("Timed out waiting for the next item of the stream.")
        with self._lock:
            return self._take()

    async def result(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._done:
                    return self._outcome()
                fut = self._waiter_on(loop)
            await fut

    async def next(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._items or self._done:
                    return self._take()
                fut = self._waiter_on(loop)
            await fut

    def _waiter_on(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        fut = loop.create_future()
        if self._waiters is None:
            self._waiters = [(loop, fut)]
        else:
            self._waiters.append((loop, fut))
        return fut


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

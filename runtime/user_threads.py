"""UserThreads: the thread pool a replica runs its deployment's sync methods on.

Ray Serve 2.60 runs sync methods in a thread pool sized ``max_ongoing_requests`` by default
(``RAY_SERVE_RUN_SYNC_IN_THREADPOOL=1``), so that a blocking method never blocks the replica's
event loop; shoal keeps that contract. What it changes is the cost of a hand-off: a replica
hands every sync call to a thread, and ``ThreadPoolExecutor.submit`` builds a ``Future`` and a
work item and goes through a ``threading.Semaphore`` (a condition variable written in Python)
per call. ``post(fn)`` puts ``fn`` on a queue for the threads and does no more; the caller's
``fn`` reports its own outcome (``UserCallable.invoke`` posts it back to the loop's inbox).

Threads start on demand, up to ``max_workers``, when no started thread is idle (the rule
``ThreadPoolExecutor`` follows). ``submit`` (what ``loop.run_in_executor`` calls, for sync
generators) is the ``Executor`` API on top of ``post``. ``shutdown(wait=False)`` lets the calls
already queued run and then ends the threads; with ``cancel_futures`` the queued calls are dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("shoal.user_threads")

_STOP: Any = None  # a thread that takes this from the queue ends


class UserThreads(Executor):
    """Up to ``max_workers`` threads named ``thread_name_prefix``-N running posted callables."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "shoal-user") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # started threads waiting for work (an upper bound, as in ThreadPoolExecutor)
        self._shutdown = False

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on one of the threads; what it returns or raises is dropped (it reports
        its outcome itself). RuntimeError after ``shutdown``."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put(fn)
            if self._idle > 0:
                self._idle -= 1
                return
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        call = _FutureCall(fn, args, kwargs)
        self.post(call)
        return call.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        dropped = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(dropped, _FutureCall):
                        dropped.future.cancel()
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()

    def _work(self) -> None:
        take = self._queue.get
        while True:
            fn = take()
            if fn is None:  # _STOP
                return
            try:
                fn()
            except Exception:  # posted callables report their own outcome; this is a bug
                logger.exception("a call posted to the user threads raised")
            del fn
            with self._lock:
                self._idle += 1


class _FutureCall:
    """A ``submit`` call: runs ``fn`` and settles ``future`` (unless it was cancelled first)."""

    __slots__ = ("_args", "_fn", "_kwargs", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self.future: Future[Any] = Future()

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # delivered to whoever waits on the future
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

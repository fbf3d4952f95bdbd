"""WorkerProcess: every multiprocessing, os and signal call the supervisor makes on a child.

A worker is started with the spawn method (a fresh interpreter, never a fork of the supervisor)
running ``target`` (a replica: ``shoal.runtime.worker_main.main``; the proxy:
``shoal.proxy.main.main``); ``extra_fds`` are inherited too (the proxy's listening socket). It gets two inherited pipes: its stdout/stderr, which
this class reads, splits into lines and hands to ``on_output``; and a lifeline whose write end
only the supervisor holds, so the worker sees EOF if the supervisor dies, however it dies.
With ``on_last_words``, a third pipe follows the lifeline: what the worker writes there before
it exits (a replica: its constructor's error) is handed to ``on_last_words(data)``.
Exit is noticed through the process sentinel on the loop (no polling) and reported once to
``on_exit(exitcode)``, after the worker's output and last words were read to the end: the
order is explicit, so the error a worker leaves is always known when its exit is reported.

``stop(grace_s)`` is SIGTERM, wait up to ``grace_s``, SIGKILL, reap; it never waits unbounded.

With ``fork_from`` (a replica of a deployment that has a warm template, ``controller/template.py``)
the worker is forked by the template instead of spawned: the same three pipes are made here and
passed to the template with the order, so output, lifeline and last words work as above. The
template answers with the pid and a pidfd (signals go through it: never to a reused pid), and
reports the exit code when it reaped the worker; that report stands for the sentinel. If the
template is gone before it forked, the worker is spawned after all (``start_method`` says which
happened); if it dies after, its replicas die with it (parent-death signal) and each is
reported exited with -SIGKILL once its pidfd says so.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

from shoal.runtime import worker_main

logger = logging.getLogger("shoal.process")

_SPAWN = multiprocessing.get_context("spawn")


class _PipeReader:
    """The read end of a pipe a worker writes to, read on the loop until EOF."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_data: Callable[[bytes], None]) -> None:
        self._loop = loop
        self._fd = fd
        self._on_data = on_data
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read)

    def _read(self) -> bool:
        """Read one chunk; False once nothing is left to read now."""
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return False
        self._on_data(chunk)
        return True

    def drain(self) -> None:
        """Read everything written so far (the writer exited), then close."""
        while self._fd >= 0 and self._read():
            pass
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class ForkedWorker(Protocol):
    """What a template tells the worker it forks (or could not fork)."""

    def forked(self, pid: int, pidfd: int) -> None: ...

    def fork_failed(self, error: str) -> None: ...

    def child_exited(self, code: int) -> None: ...

    def template_gone(self) -> None: ...


class Forker(Protocol):
    @property
    def usable(self) -> bool: ...

    def fork(self, spec: bytes, fds: tuple[int, int, int], worker: ForkedWorker) -> None: ...


@dataclass(frozen=True)
class ForkFrom:
    """Start by a fork of ``template``, with ``spec``: the worker's spec without what the
    template already holds (the definition)."""

    template: Forker
    spec: bytes


class WorkerProcess:
    def __init__(
        self,
        spec: bytes,
        *,
        on_output: Callable[[str], None],
        on_exit: Callable[[int], None],
        on_last_words: Callable[[bytes], None] | None = None,
        name: str = "shoal-worker",
        target: Callable[..., None] = worker_main.main,
        extra_fds: tuple[int, ...] = (),
        fork_from: ForkFrom | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> None:
        """``on_started(pid)``: once the pid is known (at once when spawned, when the template
        answers when forked)."""
        self._spec = spec
        self._fork_from = fork_from
        self._on_started = on_started
        self._pidfd = -1
        self._pending_signal: int | None = None  # asked before a forked worker's pid was known
        self._started = False
        self.start_method = ""
        self._target = target
        self._extra_fds = extra_fds
        self._on_output = on_output
        self._on_exit = on_exit
        self._on_last_words = on_last_words
        self._name = name
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._pid: int | None = None  # kept: the process object is closed once reaped
        self._output: _PipeReader | None = None
        self._last_words: _PipeReader | None = None
        self._lifeline_fd = -1
        self._line = b""
        self._words = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited = asyncio.Event()
        self.exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        """The worker's pid once started, still known after it exited."""
        return self._pid

    def start(self) -> None:
        """Spawn the worker, or order its fork (``fork_from``). Must run on the loop thread (the
        parent-death signal follows it)."""
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self._fork_from is not None and self._fork_from.template.usable and self._on_last_words is not None:
            self._order_fork(self._fork_from)
        else:
            self._spawn()

    def _order_fork(self, fork_from: ForkFrom) -> None:
        assert self._loop is not None
        out_r, out_w = os.pipe()
        life_r, life_w = os.pipe()
        words_r, words_w = os.pipe()
        try:
            fork_from.template.fork(fork_from.spec, (out_w, life_r, words_w), self)
        except BaseException:
            for fd in (out_r, life_w, words_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, life_r, words_w):
                os.close(fd)
        self.start_method = "fork"
        self._lifeline_fd = life_w
        self._output = _PipeReader(self._loop, out_r, self._read_output)
        self._last_words = _PipeReader(self._loop, words_r, self._read_words)

    # -- what the template reports (ForkedWorker) ----------------------------------------------

    def forked(self, pid: int, pidfd: int) -> None:
        self._pid, self._pidfd = pid, pidfd
        if self._on_started is not None:
            self._on_started(pid)
        if self._pending_signal is not None:
            self.signal(self._pending_signal)

    def fork_failed(self, error: str) -> None:
        """The template could not fork this worker (it died, or fork failed): spawn it."""
        logger.warning("%s: the warm template could not fork it (%s); spawning it instead", self._name, error)
        for reader in (self._output, self._last_words):
            if reader is not None:
                reader.close()
        self._output = self._last_words = None
        if self._lifeline_fd >= 0:
            os.close(self._lifeline_fd)
            self._lifeline_fd = -1
        if self._pending_signal == signal.SIGKILL or self._pending_signal == signal.SIGTERM:
            self._finish(-self._pending_signal)  # it was stopped before it ever ran
            return
        self._spawn()

    def child_exited(self, code: int) -> None:
        self._finish(code)

    def template_gone(self) -> None:
        """The template died: this worker got SIGKILL (its parent-death signal)."""
        assert self._loop is not None
        if self._pidfd >= 0 and self.exitcode is None:
            self._loop.add_reader(self._pidfd, self._pidfd_readable)

    def _pidfd_readable(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._pidfd)
        self._finish(-signal.SIGKILL)

    # -- spawned ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._loop is not None
        out_r, out_w = os.pipe()
        life_r, life_w = os.pipe()
        words_r, words_w = os.pipe() if self._on_last_words is not None else (-1, -1)
        child_fds = (words_w, *self._extra_fds) if words_w >= 0 else self._extra_fds
        try:
            self._proc = _SPAWN.Process(
                target=self._target,
                args=(
                    self._spec,
                    worker_main.PassFd(out_w),
                    worker_main.PassFd(life_r),
                    *(worker_main.PassFd(fd) for fd in child_fds),
                ),
                name=self._name,
                daemon=False,
            )
            self._proc.start()
            self._pid = self._proc.pid
            self.start_method = "spawn"
        except BaseException:
            for fd in (out_r, life_w, words_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, life_r, words_w):
                if fd >= 0:
                    os.close(fd)
        self._lifeline_fd = life_w
        self._output = _PipeReader(self._loop, out_r, self._read_output)
        if words_r >= 0:
            self._last_words = _PipeReader(self._loop, words_r, self._read_words)
        self._loop.add_reader(self._proc.sentinel, self._on_sentinel)
        if self._on_started is not None and self._pid is not None:
            self._on_started(self._pid)

    def _read_output(self, chunk: bytes) -> None:
        *lines, self._line = (self._line + chunk).split(b"\n")
        for line in lines:
            self._on_output(line.decode("utf-8", "replace"))

    def _read_words(self, chunk: bytes) -> None:
        self._words += chunk

    def _on_sentinel(self) -> None:
        assert self._loop is not None and self._proc is not None
        self._loop.remove_reader(self._proc.sentinel)
        # The sentinel closes as the child exits, a moment before it can be reaped.
        self._proc.join(timeout=1.0)
        code = self._proc.exitcode if self._proc.exitcode is not None else -1
        if self._proc.exitcode is not None:
            self._proc.close()
        self._finish(code)

    def _finish(self, code: int) -> None:
        """The worker exited with ``code``: read what it left, then report (once)."""
        if self.exitcode is not None:
            return
        # What the worker wrote last is read before its exit is reported.
        for reader in (self._output, self._last_words):
            if reader is not None:
                reader.drain()
        if self._line:
            self._on_output(self._line.decode("utf-8", "replace"))
            self._line = b""
        if self._words and self._on_last_words is not None:
            self._on_last_words(self._words)
        if self._lifeline_fd >= 0:
            os.close(self._lifeline_fd)
            self._lifeline_fd = -1
        if self._pidfd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.exitcode = code
        self.exited.set()
        self._on_exit(code)

    def signal(self, signum: int) -> None:
        if self.exitcode is not None:
            return
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif self._pid is not None:
                os.kill(self._pid, signum)
            elif self._started:  # a fork ordered, not answered yet
                self._pending_signal = signum if self._pending_signal != signal.SIGKILL else signal.SIGKILL
        except ProcessLookupError:
            pass

    async def stop(self, grace_s: float, signum: int | None = None) -> None:
        """``signum`` (default SIGTERM), wait up to ``grace_s``, then SIGKILL the worker and
        anything it started."""
        if self.exitcode is not None or not self._started:
            return
        self.signal(signum if signum is not None else signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await self.exited.wait()
            return
        except TimeoutError:
            logger.warning("%s (pid %s) did not stop within %.1fs; killing it", self._name, self.pid, grace_s)
        self.kill()
        async with asyncio.timeout(5):
            await self.exited.wait()

    def kill(self) -> None:
        """SIGKILL the worker and its descendants."""
        if self.exitcode is not None:
            return
        if self._pid is None:
            self.signal(signal.SIGKILL)  # remembered until the fork is answered
            return
        try:
            children = psutil.Process(self._pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        self.signal(signal.SIGKILL)


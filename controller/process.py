"""WorkerProcess: every multiprocessing, os and signal call the supervisor makes on a child.

A worker is started with the spawn method (a fresh interpreter, never a fork of the supervisor)
running ``target`` (a replica: ``shoal.runtime.worker_main.main``; the proxy:
``shoal.proxy.main.main``); ``extra_fds`` are inherited too (the proxy's listening socket). It gets two inherited pipes: its stdout/stderr, which
this class reads, splits into lines and hands to ``on_output``; and a lifeline whose write end
only the supervisor holds, so the worker sees EOF if the supervisor dies, however it dies.
Exit is noticed through the process sentinel on the loop (no polling) and reported once to
``on_exit(exitcode)``.

``stop(grace_s)`` is SIGTERM, wait up to ``grace_s``, SIGKILL, reap; it never waits unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from typing import Callable

import psutil

from shoal.runtime import worker_main

logger = logging.getLogger("shoal.process")

_SPAWN = multiprocessing.get_context("spawn")


class WorkerProcess:
    def __init__(
        self,
        spec: bytes,
        *,
        on_output: Callable[[str], None],
        on_exit: Callable[[int], None],
        name: str = "shoal-worker",
        target: Callable[..., None] = worker_main.main,
        extra_fds: tuple[int, ...] = (),
    ) -> None:
        self._spec = spec
        self._target = target
        self._extra_fds = extra_fds
        self._on_output = on_output
        self._on_exit = on_exit
        self._name = name
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._out_fd = -1
        self._lifeline_fd = -1
        self._buffer = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited = asyncio.Event()
        self.exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawn the worker. Must run on the loop thread (the parent-death signal follows it)."""
        self._loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        life_r, life_w = os.pipe()
        try:
            self._proc = _SPAWN.Process(
                target=self._target,
                args=(
                    self._spec,
                    worker_main.PassFd(out_w),
                    worker_main.PassFd(life_r),
                    *(worker_main.PassFd(fd) for fd in self._extra_fds),
                ),
                name=self._name,
                daemon=False,
            )
            self._proc.start()
        finally:
            os.close(out_w)
            os.close(life_r)
        self._out_fd = out_r
        self._lifeline_fd = life_w
        os.set_blocking(out_r, False)
        self._loop.add_reader(out_r, self._read_output)
        self._loop.add_reader(self._proc.sentinel, self._on_sentinel)

    def _read_output(self) -> None:
        try:
            chunk = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_output()
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._on_output(line.decode("utf-8", "replace"))

    def _close_output(self) -> None:
        if self._out_fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(self._out_fd)
            if self._buffer:
                self._on_output(self._buffer.decode("utf-8", "replace"))
                self._buffer = b""
            os.close(self._out_fd)
            self._out_fd = -1

    def _on_sentinel(self) -> None:
        assert self._loop is not None and self._proc is not None
        self._loop.remove_reader(self._proc.sentinel)
        # The sentinel closes as the child exits, a moment before it can be reaped.
        self._proc.join(timeout=1.0)
        # Read what the worker wrote last before reporting its exit.
        while self._out_fd >= 0:
            before = self._out_fd
            self._read_output()
            if self._out_fd == before and not _readable(before):
                break
        self._close_output()
        if self._lifeline_fd >= 0:
            os.close(self._lifeline_fd)
            self._lifeline_fd = -1
        code = self._proc.exitcode if self._proc.exitcode is not None else -1
        self.exitcode = code
        if self._proc.exitcode is not None:
            self._proc.close()
        self.exited.set()
        self._on_exit(code)

    def signal(self, signum: int) -> None:
        if self._proc is not None and self.exitcode is None and self._proc.pid:
            try:
                os.kill(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    async def stop(self, grace_s: float, signum: int | None = None) -> None:
        """``signum`` (default SIGTERM), wait up to ``grace_s``, then SIGKILL the worker and
        anything it started."""
        if self.exitcode is not None or self._proc is None:
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
        if self._proc is None or self.exitcode is not None or not self._proc.pid:
            return
        try:
            children = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        self.signal(signal.SIGKILL)


def _readable(fd: int) -> bool:
    import select

    try:
        ready, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready)

"""ProxySupervisor: one HTTP proxy process, supervised like a replica (``ProxyPool`` in
``controller/proxies.py`` runs ``http_options.num_proxies`` of them on one listener).

The proxy serves from the supervisor's ``HTTPListener`` (inherited at each start), so a
restarted proxy keeps the port; over TLS when ``http_options`` name a certificate and key
(``proxy.tls``; ``check_tls_options`` refuses bad ones before the first start). A proxy that exits unexpectedly is restarted with backoff
(doubling from ``_BACKOFF_INITIAL_S`` to ``_BACKOFF_MAX_S``, starting over once a proxy served
for ``_BACKOFF_RESET_AFTER_S``); one that is not ready within ``_STARTUP_TIMEOUT_S`` is killed,
and so restarted. It tells the listener when it serves and when it stopped, so that while no
proxy serves, connections get a 503 from the supervisor instead of waiting in the backlog.
Several ``ProxySupervisor`` may share one listener: one dying leaves the others serving.
The proxy's long-poll tells which snapshot version it has applied; ``wait_applied`` lets
``serve.run`` return only once the proxy routes to the new app.

The proxy logs as the instance's global ``logging_config`` says (serve.start's, or a config
file's top level, as the controller learns it with each deployed application): its log file is
``<logs dir>/proxy_<host>.log`` (see ``runtime/logs.install_proxy_logging``), rotating with the
instance's limits. A process reads its logging configuration once, at start, so
``set_logging_config`` with a different configuration marks the proxy ``stale`` and ``replace``
replaces it: the running one finishes its requests in flight (no 503 window on
``/-/healthz``), then a new one starts with the new configuration; meanwhile the other proxies
serve, or with none the supervisor answers new connections 503 (``ProxyPool`` replaces its
proxies one at a time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from shoal.controller.listener import HTTPListener
from shoal.controller.process import WorkerProcess
from shoal.proxy import main as proxy_main
from shoal.proxy import tls
from shoal.runtime import wire
from shoal.runtime.rotation import RotationLimits
from shoal.serve.config import HTTPOptions
from shoal.serve.schema import ProxyStatus

logger = logging.getLogger("shoal.controller")

_BACKOFF_INITIAL_S = 0.1
_BACKOFF_MAX_S = 5.0
_BACKOFF_RESET_AFTER_S = 10.0
_STARTUP_TIMEOUT_S = 30.0


def check_tls_options(http_options: dict[str, Any]) -> None:
    """ValueError, naming the option, if the ``ssl_*`` options cannot serve HTTPS (a missing
    file, a key that does not match or does not decrypt): checked before the proxy starts, so
    that a bad certificate stops ``serve.start`` instead of making the proxy fail at every restart."""
    tls.server_context(HTTPOptions(**http_options).model_dump())


class ProxySupervisor:
    def __init__(
        self,
        http_options: dict[str, Any],
        control_endpoint: str,
        listener: HTTPListener,
        *,
        echo: Callable[[str], None],
        on_process_exit: Callable[[int], None] = lambda pid: None,
        logs_dir: str | None = None,
        log_rotation: RotationLimits | None = None,
        logging_config: dict[str, Any] | None = None,
        index: int = 0,
        grpc: dict[str, Any] | None = None,
    ) -> None:
        """``index``: which of the instance's proxies this is (its log file's name).
        ``grpc``: the gRPC server it runs too (``GrpcListen.spec()``), None for none.
        ``on_process_exit(pid)``: a proxy process was reaped (the metrics files).
        ``logs_dir``: where the proxy's log file goes unless ``logging_config`` names a
        ``logs_dir`` (the run directory's ``logs``); ``log_rotation``: that file's limits."""
        self.options = http_options
        self.logs_dir = logs_dir
        self.log_rotation = log_rotation or RotationLimits()
        self.logging_config = logging_config
        self.listener = listener
        # The listener's URL, with the scheme the proxy serves (https with ssl_keyfile/ssl_certfile).
        self.url = listener.url.replace("http://", "https://", 1) if tls.is_https(http_options) else listener.url
        self._control_endpoint = control_endpoint
        self._echo = echo
        self._on_process_exit = on_process_exit
        self.index = index
        self.grpc = grpc
        self.identity: bytes | None = None  # its control connection, once it said it is ready
        self.process: WorkerProcess | None = None
        self.status = ProxyStatus.STARTING
        self.restarts = 0
        self.applied_version = 0
        self._applied = asyncio.Event()
        self._stopping = False
        self._backoff_s = _BACKOFF_INITIAL_S
        self._ready_at: float | None = None
        self._startup_timer: asyncio.TimerHandle | None = None
        self._replacing: asyncio.Task[None] | None = None
        self.stale = False  # runs with an older logging configuration: to be replaced
        self._healthy = asyncio.Event()  # set while the current process serves

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        spec = wire.pack(
            {
                "control_endpoint": self._control_endpoint,
                "http_options": HTTPOptions(**self.options).model_dump(mode="json"),  # every default filled in
                "parent_pid": os.getpid(),
                "process_name": "shoal-proxy",
                "proxy_index": self.index,
                "log_level": "INFO",
                "logging_config": self.logging_config,
                "logs_dir": self.logs_dir,
                "log_rotation": self.log_rotation.to_spec(),
                "grpc": self.grpc,
            }
        )
        prefix = "(ProxyActor)"
        self.process = WorkerProcess(
            spec,
            on_output=lambda line: self._echo(f"{prefix} {line}"),
            on_exit=self._on_exit,
            name="shoal:proxy" if self.index == 0 else f"shoal:proxy-{self.index}",
            target=proxy_main.main,
            extra_fds=(self.listener.socket.fileno(),),
        )
        self.status = ProxyStatus.STARTING
        self._ready_at = None
        self.identity = None
        self.stale = False  # it starts with the latest logging configuration
        self._healthy.clear()
        self.process.start()
        self._startup_timer = asyncio.get_running_loop().call_later(_STARTUP_TIMEOUT_S, self._startup_timed_out)

    def _startup_timed_out(self) -> None:
        self._startup_timer = None
        if self.process is not None and self.status == ProxyStatus.STARTING:
            logger.warning("the proxy (pid %s) was not ready within %.0fs; killing it", self.pid, _STARTUP_TIMEOUT_S)
            self.process.kill()

    def on_ready(self) -> None:
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None
        self.status = ProxyStatus.HEALTHY
        self._ready_at = time.monotonic()
        self._healthy.set()
        self.listener.proxy_up(self)

    def on_listen(self, version: int) -> None:
        """The proxy asked for snapshots newer than ``version``: it has applied ``version``
        (unless it is being replaced: then only its successor counts)."""
        if self._replacing is None and not self.stale and version > self.applied_version:
            self.applied_version = version
            self._applied.set()
            self._applied = asyncio.Event()

    async def wait_applied(self, version: int, timeout_s: float) -> None:
        """Wait until the proxy routes with snapshot ``version`` or newer (bounded)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.applied_version < version and not self._stopping:
                    await self._applied.wait()
        except TimeoutError:
            logger.warning("the proxy did not apply routes version %d within %.0fs", version, timeout_s)

    def set_logging_config(self, logging_config: dict[str, Any] | None) -> bool:
        """Log as ``logging_config`` says from now on. True if the running proxy must be
        replaced for it (``replace``; module docstring): it is marked ``stale`` until then, and
        its applied routes no longer count (serve.run waits for its successor). The same
        configuration changes nothing; a proxy not running takes it at its next start."""
        if logging_config == self.logging_config:
            return False
        self.logging_config = logging_config
        if self.process is None or self._stopping or self._replacing is not None:
            return False  # the next start (or the replacement under way, once it stops) takes it
        self.stale = True
        self.applied_version = 0  # serve.run waits for the successor (wait_applied)
        return True

    async def replace(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """If ``stale``: stop the running proxy (it finishes its requests in flight), start
        another with the latest logging configuration, and wait (bounded) until it serves."""
        if not self.stale or self._replacing is not None or self._stopping:
            return
        self._replacing = asyncio.get_running_loop().create_task(self._replace())
        await asyncio.shield(self._replacing)  # a caller cancelled (shutdown) leaves it to finish
        try:
            async with asyncio.timeout(timeout_s):
                await self._healthy.wait()
        except TimeoutError:
            logger.warning("the replaced proxy %d was not serving within %.0fs", self.index, timeout_s)

    async def _replace(self) -> None:
        """Stop the running proxy (it finishes its requests in flight), then start another."""
        try:
            process = self.process
            if process is None:
                return
            # One still starting may not handle SIGINT yet; SIGTERM drains with a 503 window.
            quiet = self.status != ProxyStatus.STARTING
            self.status = ProxyStatus.DRAINING
            grace_s = float(self.options.get("graceful_shutdown_timeout_s") or 20.0) + 2.0
            await process.stop(grace_s, signum=signal.SIGINT if quiet else signal.SIGTERM)
            if not self._stopping and self.process is process:
                self.listener.proxy_down(self)  # until the next one serves: 503 from the supervisor
                self.start()  # with the latest logging_config
        finally:
            self._replacing = None

    def _on_exit(self, code: int) -> None:
        if self.pid is not None:
            self._on_process_exit(self.pid)
        self.applied_version = 0
        self.identity = None
        self._healthy.clear()
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None
        if self._stopping:
            self.status = ProxyStatus.DRAINED
            return
        if self._replacing is not None:
            return  # replaced on purpose (replace): _replace starts the next one
        self.listener.proxy_down(self)
        self.status = ProxyStatus.UNHEALTHY
        self.restarts += 1
        if self._ready_at is not None and time.monotonic() - self._ready_at > _BACKOFF_RESET_AFTER_S:
            self._backoff_s = _BACKOFF_INITIAL_S  # it served a while: start the backoff over
        logger.warning("the proxy (pid %s) exited with code %s; restarting it in %.1fs", self.pid, code, self._backoff_s)
        delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2, _BACKOFF_MAX_S)
        asyncio.get_running_loop().call_later(delay, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self.start()

    async def stop(self, announce: bool = True) -> None:
        """Drain (``/-/healthz`` answers 503, in-flight requests finish), then stop. Without
        ``announce`` the proxy skips its minimum 503 window (SIGINT instead of SIGTERM)."""
        self._stopping = True
        if self.process is not None:
            grace_s = float(self.options.get("graceful_shutdown_timeout_s") or 20.0) + 2.0
            # A proxy still starting has nothing to drain, and may not handle SIGINT yet.
            quiet = not announce and self.status != ProxyStatus.STARTING
            self.status = ProxyStatus.DRAINING
            await self.process.stop(grace_s, signum=signal.SIGINT if quiet else signal.SIGTERM)

"""ProxySupervisor: the HTTP proxy process, its listening socket, and its restarts.

The supervisor binds the listening socket itself (``http_options`` host and port; port 0 picks a
free one, reported in ``url``) and hands it to each proxy incarnation, so a restarted proxy keeps
the port and connections queue in the kernel during the gap instead of being refused. A proxy
that dies is restarted with backoff. The proxy's long-poll tells which snapshot version it has
applied; ``wait_applied`` lets ``serve.run`` return only once the proxy routes to the new app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from shoal.controller.process import WorkerProcess
from shoal.proxy import main as proxy_main
from shoal.runtime import wire
from shoal.serve.config import HTTPOptions
from shoal.serve.schema import ProxyStatus

logger = logging.getLogger("shoal.controller")

_BACKOFF_INITIAL_S = 0.1
_BACKOFF_MAX_S = 5.0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; OSError with a clear message if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror}. Pick another port with "
            "serve.start(http_options={'port': ...}) or `shoal start --http-port`."
        ) from exc
    sock.listen(2048)
    return sock


class ProxySupervisor:
    def __init__(
        self, http_options: dict[str, Any], control_endpoint: str, *, echo: Callable[[str], None]
    ) -> None:
        self.options = http_options
        self.listener = bind_listener(http_options["host"], int(http_options["port"]))
        host, port = self.listener.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self._control_endpoint = control_endpoint
        self._echo = echo
        self.process: WorkerProcess | None = None
        self.status = ProxyStatus.STARTING
        self.restarts = 0
        self.applied_version = 0
        self._applied = asyncio.Event()
        self._stopping = False
        self._backoff_s = _BACKOFF_INITIAL_S
        self._started_at = 0.0

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
                "log_level": "INFO",
            }
        )
        prefix = "(ProxyActor)"
        self.process = WorkerProcess(
            spec,
            on_output=lambda line: self._echo(f"{prefix} {line}"),
            on_exit=self._on_exit,
            name="shoal:proxy",
            target=proxy_main.main,
            extra_fds=(self.listener.fileno(),),
        )
        self.status = ProxyStatus.STARTING
        self._started_at = time.monotonic()
        self.process.start()

    def on_ready(self) -> None:
        self.status = ProxyStatus.HEALTHY
        if time.monotonic() - self._started_at > 1.0:
            self._backoff_s = _BACKOFF_INITIAL_S

    def on_listen(self, version: int) -> None:
        """The proxy asked for snapshots newer than ``version``: it has applied ``version``."""
        if version > self.applied_version:
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

    def _on_exit(self, code: int) -> None:
        self.applied_version = 0
        if self._stopping:
            self.status = ProxyStatus.DRAINED
            return
        self.status = ProxyStatus.UNHEALTHY
        self.restarts += 1
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
        self.listener.close()

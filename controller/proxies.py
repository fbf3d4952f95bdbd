"""ProxyPool: the instance's HTTP proxies, ``http_options.num_proxies`` processes on one port.

Every proxy serves from the supervisor's one listening socket (``HTTPListener``), which each
inherits: the kernel queues connections on it and whichever proxy is free accepts them. That
choice over ``SO_REUSEPORT`` (one socket per proxy, the kernel hashing connections across them)
is about failure: a proxy that dies leaves its share of connections to the others at once,
nothing queued for it is lost (with ``SO_REUSEPORT`` the dead proxy's socket would hold the
connections hashed to it until its successor serves, or reset them when closed), and when no
proxy serves the supervisor answers 503 from the same socket. Measured here (two processes,
wrk with 64 connections) both spread requests within a few percent of each other and reach
the same rate; the shared socket can spread connections less evenly (50/14 in one run), which
matters less because a busy proxy stops accepting.

Each proxy is a ``ProxySupervisor`` (restarted with backoff when it dies, while the others
serve), with its own routers: each long-polls the controller for every routing snapshot, so
``wait_applied`` waits until every live proxy routes with a version. Draining (``stop``) drains
them all at once: each answers 503 on ``/-/healthz`` and finishes its requests in flight. A
proxy is recognised on the control socket by its connection: it says ``proxy_ready`` with its
pid (``on_ready``), and its later ``listen`` calls come from the same connection
(``on_listen``).

``resize(n)`` changes the number of proxies on a running instance: new ones start, the ones
beyond ``n`` (the highest indices) finish their requests in flight and stop while the others
serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shoal.controller.listener import HTTPListener
from shoal.controller.proxy import ProxySupervisor
from shoal.runtime.rotation import RotationLimits
from shoal.serve.config import HTTPOptions, check_num_proxies
from shoal.serve.schema import ProxyStatus

logger = logging.getLogger("shoal.controller")

_MAX_EARLY = 64  # proxies that listened and were not ready yet (more: one died starting)


class ProxyPool:
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
        grpc: dict[str, Any] | None = None,
    ) -> None:
        """``http_options``: the instance's (``num_proxies`` of them start); the other arguments
        are every proxy's, see ``ProxySupervisor`` (``grpc``: every proxy serves gRPC on the
        same port, ``SO_REUSEPORT``; see ``controller/grpc_listen.py``)."""
        self.options = http_options
        self.listener = listener
        self._make: Callable[[int], ProxySupervisor] = lambda index: ProxySupervisor(
            self.options, control_endpoint, listener, echo=echo, on_process_exit=on_process_exit,
            logs_dir=logs_dir, log_rotation=log_rotation, logging_config=self.logging_config, index=index,
            grpc=grpc,
        )
        self.logging_config = logging_config
        count = HTTPOptions(**http_options).num_proxies  # unset: the default for this machine
        self.proxies: list[ProxySupervisor] = [self._make(index) for index in range(count)]
        self.url = self.proxies[0].url
        self._early: dict[bytes, int] = {}  # versions asked for by proxies not yet ready, by connection
        self._stopping = False
        self._resizing: asyncio.Lock | None = None
        self._rolling: asyncio.Task[None] | None = None

    @property
    def num_proxies(self) -> int:
        return len(self.proxies)

    @property
    def status(self) -> ProxyStatus:
        """The instance's HTTP status (Ray's one proxy per node): HEALTHY while any proxy
        serves (one being replaced leaves the others serving), else the first proxy's."""
        statuses = [p.status for p in self.proxies]
        if ProxyStatus.HEALTHY in statuses and not self._stopping:
            return ProxyStatus.HEALTHY
        return statuses[0]

    def details(self) -> list[dict[str, Any]]:
        """Each proxy's index, pid, status and restarts (``shoal status``)."""
        return [
            {"index": p.index, "pid": p.pid, "status": p.status.value, "restarts": p.restarts}
            for p in self.proxies
        ]

    def start(self) -> None:
        for proxy in self.proxies:
            proxy.start()

    def on_ready(self, identity: bytes, pid: int | None) -> bool:
        """The proxy with ``pid`` said it is ready on the connection ``identity``; False if no
        proxy of this pool has that pid (one replaced meanwhile)."""
        early = self._early.pop(identity, None)
        for proxy in self.proxies:
            if proxy.pid is not None and proxy.pid == pid:
                proxy.identity = identity
                proxy.on_ready()
                if early is not None:
                    proxy.on_listen(early)
                return True
        return False

    def on_listen(self, identity: bytes, version: int) -> None:
        """The proxy on connection ``identity`` asked for snapshots newer than ``version``."""
        for proxy in self.proxies:
            if proxy.identity == identity:
                proxy.on_listen(version)
                return
        # Its router may listen before it says it is ready: remember for ``on_ready``.
        if len(self._early) >= _MAX_EARLY and identity not in self._early:
            self._early.pop(next(iter(self._early)))
        self._early[identity] = max(version, self._early.get(identity, 0))

    async def wait_applied(self, version: int, timeout_s: float) -> None:
        """Wait until every proxy that runs routes with snapshot ``version`` or newer (each
        bounded by ``timeout_s``). One that crashed and waits for its restart is not waited
        for: its successor asks for the newest snapshot first."""
        waiting = [
            p.wait_applied(version, timeout_s)
            for p in self.proxies
            if p.status in (ProxyStatus.STARTING, ProxyStatus.HEALTHY, ProxyStatus.DRAINING)
        ]
        await asyncio.gather(*waiting)

    def set_logging_config(self, logging_config: dict[str, Any] | None) -> None:
        """Every proxy logs as ``logging_config`` says from now on: a different one replaces
        them one at a time (``ProxySupervisor.replace``), each successor serving before the next
        one stops, so the others serve meanwhile. ``wait_applied`` waits for every successor."""
        self.logging_config = logging_config
        stale = [proxy.set_logging_config(logging_config) for proxy in self.proxies]
        if any(stale) and self._rolling is None:
            self._rolling = asyncio.get_running_loop().create_task(self._roll())

    async def _roll(self) -> None:
        """Replace the stale proxies one at a time, until none is stale (a configuration that
        changes again meanwhile makes more of them stale)."""
        try:
            while not self._stopping:
                proxy = next((p for p in self.proxies if p.stale), None)
                if proxy is None:
                    return
                await proxy.replace()
        except Exception:
            logger.exception("replacing the proxies for a new logging configuration failed")
        finally:
            self._rolling = None

    async def resize(self, num_proxies: int) -> None:
        """Run ``num_proxies`` proxies from now on (ValueError naming ``num_proxies`` if it is
        not a whole number of at least 1): start the missing ones, or stop those beyond it
        (they finish their requests in flight; the others serve meanwhile)."""
        check_num_proxies(num_proxies)
        if self._resizing is None:
            self._resizing = asyncio.Lock()
        async with self._resizing:
            if self._stopping or num_proxies == len(self.proxies):
                return
            logger.info("HTTP proxies: %d -> %d", len(self.proxies), num_proxies)
            self.options = {**self.options, "num_proxies": num_proxies}
            while len(self.proxies) < num_proxies:
                proxy = self._make(len(self.proxies))
                self.proxies.append(proxy)
                proxy.start()
            extra, self.proxies = self.proxies[num_proxies:], self.proxies[:num_proxies]
            await asyncio.gather(*(self._retire(proxy) for proxy in extra))

    async def _retire(self, proxy: ProxySupervisor) -> None:
        await proxy.stop(announce=False)  # nobody routes to one proxy: the others serve
        self.listener.proxy_down(proxy)

    async def stop(self, announce: bool = True) -> None:
        """Drain every proxy at once (see ``ProxySupervisor.stop``), then return."""
        self._stopping = True
        if self._rolling is not None:
            self._rolling.cancel()
            await asyncio.gather(self._rolling, return_exceptions=True)
        await asyncio.gather(*(proxy.stop(announce) for proxy in self.proxies))

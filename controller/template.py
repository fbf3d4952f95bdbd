"""Warm templates: one process per application that imported it once and forks its replicas.

A replica is started in one of two ways (``SHOAL_WORKER_START``, read once by the executor;
a deployment can set it for itself in ``ray_actor_options.runtime_env.env_vars``):

- ``fork`` (the default): from the application's warm template
  (``runtime/template_main.py``), when all of these hold: the platform has ``os.fork`` and
  pidfds (Linux >= 5.3); the deployment asks for no GPU (CUDA state cannot cross a fork, and
  each replica gets its own ``CUDA_VISIBLE_DEVICES`` before its imports); the template is
  starting or ready (orders sent while it still imports wait for it: the import is paid once,
  not once per replica). Otherwise, and whenever the template cannot fork, by spawn;
- ``spawn``: every replica is a fresh interpreter, as before templates existed.

Lifecycle (``Templates``, owned by the executor):
- ``sync(deployments)`` runs at the start of every reconcile pass: the deployments of one
  application that may fork (grouped by ``group_key``: same application, same ``sys_path`` and
  ``runtime_env`` variables) share one template that holds each one's current version (made at
  deploy time, so a deployment scaled to zero already has one when its first request comes).
  When one of them changes version (new code: the template's imported modules are the old
  ones), a new template is made for the new set and the old one is retired: it takes no more
  orders and is stopped once the last replica it forked exited (a replica dies with its
  template, so one is never stopped under them; replicas of unchanged deployments keep it
  until they are replaced, which costs that template's private memory meanwhile). A deleted
  application's template is retired the same way.
- A template that refused (a module started a thread at import time, CUDA was initialised) or
  failed to import is not made again for that set of versions: its replicas are spawned, and a spawned
  replica reports the import error as its constructor's error, as before. A template that died
  after it was ready is made again, up to ``_MAX_RESTARTS`` times per set of versions; its replicas
  died with it and are replaced as any crashed replica.
- Templates are children of the supervisor and forked replicas are their children: the
  instance's process tree (what ``shoal status`` memory figures and metrics sweep over) holds
  them, and the forked replicas share the template's memory copy-on-write.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from shoal.controller.process import ForkedWorker, WorkerProcess
from shoal.controller.state import DeploymentState
from shoal.runtime import template_main, wire

logger = logging.getLogger("shoal.template")

START_ENV = "SHOAL_WORKER_START"
START_METHODS = ("fork", "spawn")
_MAX_RESTARTS = 3
_STOP_GRACE_S = 2.0
_MAX_PACKET = 1 << 20


def start_method_from(env: dict[str, str], default: str = "fork") -> str:
    """The start method ``env`` asks for (``SHOAL_WORKER_START``), else ``default``; ValueError
    naming the variable for any other value."""
    raw = env.get(START_ENV)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in START_METHODS:
        raise ValueError(f"{START_ENV}={raw!r}: must be one of {', '.join(START_METHODS)}")
    return value


def platform_can_fork() -> bool:
    """fork, pidfds and SCM_RIGHTS are all there (Linux >= 5.3)."""
    return (
        sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(os, "pidfd_open")
        and hasattr(signal, "pidfd_send_signal") and hasattr(socket, "send_fds")
    )


class Template:
    """One template process and its order socket. ``state``: ``starting`` (importing; orders
    wait), ``ready``, ``refused`` (not fork-safe: ``reason`` says why) or ``gone``."""

    def __init__(
        self, key: str, versions: dict[str, str], spec: bytes, *, echo: Callable[[str], None],
        on_gone: Callable[[Template], None],
    ) -> None:
        self.key = key
        self.versions = versions  # deployment name -> the version it holds
        self.state = "starting"
        self.reason = ""
        self.retiring = False
        self.was_ready = False
        self._stopping: asyncio.Task[None] | None = None
        self._spec = spec
        self._echo = echo
        self._on_gone = on_gone
        self._orders: dict[int, ForkedWorker] = {}  # sent, not answered yet
        self._children: dict[int, ForkedWorker] = {}  # forked, not reaped yet
        self._next_order = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.process: WorkerProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def usable(self) -> bool:
        return self.state in ("starting", "ready") and not self.retiring

    @property
    def children(self) -> int:
        return len(self._children) + len(self._orders)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        self._sock = mine
        self.process = WorkerProcess(
            self._spec, on_output=self._output, on_exit=self._exited, name=f"shoal-template:{self.key}",
            target=template_main.main, extra_fds=(theirs.fileno(),),
        )
        try:
            self.process.start()
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._loop.add_reader(mine.fileno(), self._readable)

    def _output(self, line: str) -> None:
        self._echo(f"(template {self.key} pid={self.pid}) {line}")

    def fork(self, spec: bytes, fds: tuple[int, int, int], worker: ForkedWorker) -> None:
        """Order a fork of a replica with ``spec`` and its pipes ``fds``; ``worker`` is told what
        became of it. Must be ``usable``."""
        assert self._sock is not None and self._loop is not None and self.usable
        order = self._next_order
        self._next_order += 1
        message = wire.pack({"order": order, "spec": wire.unpack(spec)})
        try:
            socket.send_fds(self._sock, [message], list(fds))
        except OSError as exc:
            self._loop.call_soon(worker.fork_failed, f"sending the order failed: {exc}")
            return
        self._orders[order] = worker

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _MAX_PACKET, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost()
                return
            self._dispatch(wire.unpack(data), fds)

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        if "ready" in message:
            self.state = "ready"
            self.was_ready = True
        elif "refused" in message:
            self.state, self.reason = "refused", str(message["refused"])
            logger.warning("template for %s is not used: %s; its replicas are spawned", self.key, self.reason)
        elif "forked" in message:
            worker = self._orders.pop(message["forked"], None)
            if worker is None or not fds:
                for fd in fds:
                    os.close(fd)
                return
            self._children[message["pid"]] = worker
            worker.forked(int(message["pid"]), fds[0])
        elif "failed" in message:
            worker = self._orders.pop(message["failed"], None)
            if worker is not None:
                worker.fork_failed(str(message.get("error", "")))
        elif "exited" in message:
            worker = self._children.pop(message["exited"], None)
            if worker is not None:
                worker.child_exited(int(message["code"]))

    def _lost(self) -> None:
        """The order socket closed: the template is gone (or going)."""
        assert self._sock is not None and self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self.state in ("starting", "ready"):
            self.state = "gone"
        orders, self._orders = self._orders, {}
        children, self._children = self._children, {}
        for worker in orders.values():
            worker.fork_failed("the template exited")
        for worker in children.values():
            worker.template_gone()

    def _exited(self, code: int) -> None:
        if self._sock is not None and self._sock.fileno() >= 0:
            self._readable()  # what it said last (refused, exit codes) comes before its exit
            if self._sock.fileno() >= 0:
                self._lost()
        if code != 0 and not self.retiring and self.state != "refused":
            logger.warning("template for %s (pid %s) exited with code %s", self.key, self.pid, code)
        self._on_gone(self)

    def retire(self) -> None:
        """Take no more orders; stop once no replica it forked runs."""
        self.retiring = True
        if not self.children and self.process is not None and self.process.exitcode is None and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.process.stop(_STOP_GRACE_S))

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state, "reason": self.reason, "versions": self.versions, "replicas": len(self._children)}


def group_key(state: DeploymentState) -> str:
    """Deployments that may share a template: one application, one import environment (its
    ``sys_path`` and ``runtime_env`` variables, which an import can depend on)."""
    options = state.config.get("ray_actor_options") or {}
    env = (options.get("runtime_env") or {}).get("env_vars") or {}
    digest = hashlib.sha256(repr((sorted(env.items()), state.sys_path)).encode()).hexdigest()[:8]
    return f"{state.app}/{digest}"


class Templates:
    """The executor's templates: one per application (and import environment) holding the
    current version of each of its deployments that may fork."""

    def __init__(
        self, make_spec: Callable[[list[DeploymentState]], bytes], *, echo: Callable[[str], None], start_method: str,
    ) -> None:
        self._make_spec = make_spec
        self._echo = echo
        self.start_method = start_method
        self._current: dict[str, Template] = {}
        self._retired: set[Template] = set()
        self._restarts: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
        self._failed: set[tuple[str, frozenset[tuple[str, str]]]] = set()  # refused, or never got ready

    def may_fork(self, state: DeploymentState) -> bool:
        """Whether replicas of ``state`` may be forked from a template at all."""
        options = state.config.get("ray_actor_options") or {}
        env = (options.get("runtime_env") or {}).get("env_vars") or {}
        try:
            method = start_method_from(env, self.start_method)
        except ValueError:
            method = self.start_method  # refused when deployed (``actor_options.check``)
        return method == "fork" and state.num_gpus == 0 and platform_can_fork()

    def for_replica(self, state: DeploymentState) -> Template | None:
        """The usable template holding ``state``'s current version; None: spawn the replica."""
        template = self._current.get(group_key(state))
        if template is None or not template.usable or template.versions.get(state.name) != state.version:
            return None
        return template

    def sync(self, states: Iterable[DeploymentState]) -> None:
        """Warm a template for every application's deployments that may fork, at their current
        versions; retire templates no deployment needs (stopped once their replicas exited)."""
        groups: dict[str, list[DeploymentState]] = {}
        for state in states:
            if not state.deleting and self.may_fork(state):
                groups.setdefault(group_key(state), []).append(state)
        for key in [k for k in self._current if k not in groups]:
            self._retire(self._current[key])
        for key, members in groups.items():
            versions = {s.name: s.version for s in members}
            template = self._current.get(key)
            if template is not None and all(template.versions.get(n) == v for n, v in versions.items()):
                continue
            wanted = (key, frozenset(versions.items()))
            if wanted in self._failed or self._restarts.get(wanted, 0) > _MAX_RESTARTS:
                continue
            if template is not None:
                self._retire(template)
            self._start(key, versions, members)
        self.child_exited()

    def _start(self, key: str, versions: dict[str, str], members: list[DeploymentState]) -> None:
        template = Template(key, versions, self._make_spec(members), echo=self._echo, on_gone=self._gone)
        try:
            template.start()
        except Exception:
            logger.exception("starting the template for %s failed; spawning its replicas", key)
            self._failed.add((key, frozenset(versions.items())))
            return
        self._current[key] = template

    def _retire(self, template: Template) -> None:
        if self._current.get(template.key) is template:
            del self._current[template.key]
        self._retired.add(template)
        template.retire()

    def _gone(self, template: Template) -> None:
        self._retired.discard(template)
        wanted = (template.key, frozenset(template.versions.items()))
        if template.state == "refused" or not template.was_ready:
            self._failed.add(wanted)  # it could not import the deployments, or is not fork-safe
        elif not template.retiring:
            self._restarts[wanted] = self._restarts.get(wanted, 0) + 1
        if self._current.get(template.key) is template:
            del self._current[template.key]

    def describe_all(self) -> dict[str, list[dict[str, Any]]]:
        """Every template process alive, by application (a retired one until it stopped)."""
        described: dict[str, list[dict[str, Any]]] = {}
        for template in [*self._current.values(), *self._retired]:
            if template.process is not None and template.process.exitcode is None:
                described.setdefault(template.key, []).append({**template.describe(), "retiring": template.retiring})
        return described

    def child_exited(self) -> None:
        """A replica exited: a retired template with none left may stop now."""
        for template in list(self._retired):
            if not template.children:
                template.retire()

    async def close(self) -> None:
        """Stop every template (the replicas have exited)."""
        templates = [*self._current.values(), *self._retired]
        self._current.clear()
        for template in templates:
            template.retiring = True
        await asyncio.gather(
            *(t.process.stop(_STOP_GRACE_S) for t in templates if t.process is not None), return_exceptions=True,
        )

"""Entry point of a warm template: a process that imports a deployment once and forks replicas.

Why: a replica spawned fresh pays every import again (shoal's runtime, and the user's modules,
which can take seconds: numpy, torch, a model library). A template pays them once; a replica
forked from it starts with all of that in memory, shared copy-on-write with the template and its
siblings, and only runs the constructor.

``main(spec, output, lifeline, orders)`` is started by the supervisor with the spawn method, one
per application (per import environment) and set of its deployments' versions
(``controller/template.py``); ``spec["definitions"]`` holds each deployment's definition:

1. ``bootstrap`` as any worker (output pipe, own process group, SIGKILL when the supervisor dies,
   the deployer's ``sys.path``, the metrics directory: prometheus-client's value class only,
   no value is made here, so no metrics file is named by this pid), then the deployment's
   ``runtime_env`` variables, which the version carries;
2. imports what a replica needs: shoal's runtime modules, and the user's modules by unpickling
   every deployment definition (cloudpickle imports the modules it references by name). It makes
   NO thread, no ZeroMQ context, no event loop: nothing that cannot cross a fork. If a Python
   thread exists anyway (started by a user module at import time) or CUDA was initialised, the
   template is not fork-safe: it says ``refused`` with the reason and exits, and the supervisor
   spawns this deployment's replicas instead;
3. says ``ready`` on ``orders`` (a SOCK_SEQPACKET unix socket: one msgpack message per packet,
   file descriptors beside it with SCM_RIGHTS) and waits, in a ``select`` loop, for:
   - a fork order: the replica's own spec (everything but the definitions, which the template
     holds: the child takes its deployment's) and its three pipes (stdout/stderr, lifeline, last words). The template forks and
     answers ``forked`` with the child's pid and a pidfd for it (opened before the child can be
     reaped, so it can never name another process: the supervisor signals through it);
   - SIGCHLD (through the wakeup fd): it reaps its children and reports each ``exited`` with
     the exit code (negative: killed by that signal, as ``multiprocessing`` reports it);
   - EOF on its lifeline or on ``orders``: the supervisor is gone, or retired this template
     (only once its last replica exited). It exits.

Memory: the template imports with the garbage collector off and freezes every object it holds
before each fork (``gc.freeze``), so a replica's collections never write to the pages it shares
with the template and its siblings; the child turns the collector back on.

The forked child re-seeds ``random`` (and numpy's global generator, if ``numpy.random`` is
imported: two replicas must not draw the same numbers; one imported later seeds itself), closes the template's descriptors, points stdout and
stderr at its own pipe, takes its own process group, and asks for SIGKILL when its parent (the
template) dies: the template itself dies with the supervisor, and is never retired while a
replica it forked runs. Then it runs ``worker_main.serve_replica`` exactly as a spawned replica
does (memory limit, logging, ZeroMQ, constructor, READY), and never returns into the template.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from shoal.runtime import worker_main

_MAX_PACKET = 1 << 20
_PIPES_PER_ORDER = 3  # stdout/stderr, lifeline, last words


def warm_imports() -> None:
    """Import every module a replica's ``_serve`` imports, without starting anything."""
    import uvloop  # noqa: F401
    import zmq  # noqa: F401

    from shoal.runtime import (  # noqa: F401
        client,
        context,
        logs,
        replica,
        replica_metrics,
        request_router_report,
        transport,
        user_code,
        wire,
    )
    from shoal.serve import schema  # noqa: F401


def fork_unsafe_reason() -> str:
    """Why forking this process would be unsafe now ("" if it is not)."""
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"a module started Python threads at import time ({names})"
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
        return "CUDA was initialised at import time"
    return ""


def main(spec_bytes: bytes, output: worker_main.PassFd, lifeline: worker_main.PassFd, orders: worker_main.PassFd) -> None:
    gc.disable()  # no collections while importing: no freed holes in pages the replicas share
    spec = worker_main.bootstrap(spec_bytes, output)
    os.environ.update(spec.get("env") or {})
    sock = socket.socket(fileno=orders.detach())
    sock.setblocking(True)
    from shoal.runtime import wire

    try:
        warm_imports()
        for definition in spec["definitions"].values():
            wire.loads(wire.Encoding.PICKLE, definition)
        reason = fork_unsafe_reason()
    except Exception as exc:
        reason = "importing the deployment failed: " + "".join(traceback.format_exception_only(exc)).strip()
    if reason:
        _send(sock, {"refused": reason})
        os._exit(0)
    _serve_orders(sock, lifeline.detach(), spec)


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    from shoal.runtime import wire

    try:
        socket.send_fds(sock, [wire.pack(message)], fds or [])
    except OSError:
        os._exit(0)  # the supervisor closed its end: nobody to serve


def _serve_orders(sock: socket.socket, lifeline_fd: int, base: dict[str, Any]) -> None:
    from shoal.runtime import wire

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd is written
    signal.set_wakeup_fd(wake_w)
    sock_fd = sock.fileno()
    own_fds = [sock_fd, lifeline_fd, wake_r, wake_w]
    _send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock_fd, lifeline_fd, wake_r], [], [])
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(sock)
        if lifeline_fd in readable and not os.read(lifeline_fd, 1):
            os._exit(0)  # the supervisor is gone
        if sock_fd in readable:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_PACKET, _PIPES_PER_ORDER)
            if not data:
                os._exit(0)  # retired
            order = wire.unpack(data)
            if len(fds) != _PIPES_PER_ORDER:
                for fd in fds:
                    os.close(fd)
                _send(sock, {"failed": order["order"], "error": "the order came without its pipes"})
                continue
            _fork(sock, order, fds, base, own_fds)


def _fork(sock: socket.socket, order: dict[str, Any], fds: list[int], base: dict[str, Any], own_fds: list[int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the child's collections leave the template's objects (and their pages) alone
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        _send(sock, {"failed": order["order"], "error": f"fork failed: {exc}"})
        return
    if pid == 0:
        _run_child(order["spec"], fds, base, own_fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)  # not reaped yet: only this process reaps it, after this
    try:
        _send(sock, {"forked": order["order"], "pid": pid}, [pidfd])
    finally:
        os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _run_child(order_spec: dict[str, Any], fds: list[int], base: dict[str, Any], own_fds: list[int]) -> None:
    """The forked replica: never returns."""
    try:
        template_pid = os.getppid()
        gc.enable()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in own_fds:
            os.close(fd)
        out_fd, lifeline_fd, last_words_fd = fds
        worker_main.redirect_output(out_fd)
        os.setpgid(0, 0)
        _reseed()
        spec = {**base, **order_spec}
        spec["definition"] = spec.pop("definitions")[spec["deployment"]]
        worker_main.set_process_name(spec.get("process_name", "shoal-replica"))
        worker_main.die_with_parent(template_pid)
        worker_main.serve_replica(spec, lifeline_fd, last_words_fd)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def _reseed() -> None:
    """Fresh random state: a fork copies the template's, and siblings must not share it."""
    import random

    random.seed()
    numpy_random = sys.modules.get("numpy.random")  # not imported yet: it will seed itself
    if numpy_random is not None:
        numpy_random.seed()

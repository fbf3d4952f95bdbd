"""Entry point of a replica worker process (spawned by the supervisor, or forked from a warm
template: ``runtime/template_main.py``, which calls ``serve_replica`` in the forked child).

``main(spec, output, lifeline, last_words)``:
1. points stdout/stderr at ``output`` (a pipe the supervisor reads, prefixes and logs), leaves
   the terminal's process group (Ctrl-C is the supervisor's to handle) and asks the kernel for
   SIGKILL when the supervisor dies; ``lifeline`` reaching EOF is the backstop for the same;
2. binds its ROUTER socket, builds the user object, and sends READY (pid, protocol version,
   endpoint) to the supervisor; or, if that fails, writes ``{"error": traceback}`` (msgpack) to
   the ``last_words`` pipe and exits 1. The supervisor reads that pipe to its end before it
   reports the exit, so the constructor's error is known when the failed start is counted;
3. serves until SIGTERM, then drains within ``graceful_shutdown_timeout_s``, runs the user's
   ``__del__`` and exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Name the process (what ``ps -o comm`` and ``psutil.Process.name()`` show; 15 bytes)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def redirect_output(out_fd: int) -> None:
    """Point stdout and stderr (fds 1 and 2, line-buffered) at ``out_fd``, which is closed."""
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exit at once if ``parent_pid`` is gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def bootstrap(spec_bytes: bytes, output: Any) -> dict[str, Any]:
    """The start of every shoal child process; returns its decoded spec.

    Points stdout/stderr at ``output``, leaves the terminal's process group, ignores SIGINT
    (the supervisor owns Ctrl-C), dies with the supervisor, and puts the spec's ``sys_path``
    first on ``sys.path``.
    """
    redirect_output(output.detach())
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from shoal.runtime import wire

    spec: dict[str, Any] = wire.unpack(spec_bytes)
    set_process_name(spec.get("process_name", "shoal-worker"))
    die_with_parent(spec["parent_pid"])
    sys.path[:] = merged_sys_path(spec.get("sys_path", []), sys.path)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the instance exports metrics: record into its files
        from shoal.runtime import metrics

        metrics.enable_from_env()
    return spec


def merged_sys_path(deployer: list[str], own: list[str]) -> list[str]:
    """The deploying process's path in its own order, then this process's entries it lacks: an
    entry the deployer had after the standard library stays after it here, so a directory
    holding, say, an ``http.py`` cannot shadow a standard module in the worker."""
    return list(dict.fromkeys([*deployer, *own]))


def watch_lifeline(loop: asyncio.AbstractEventLoop, lifeline_fd: int, on_eof: Any = None) -> None:
    """Call ``on_eof`` (default: exit at once) when the other end of the lifeline closes: the
    process holding it died, however it died."""

    def on_readable() -> None:
        try:
            if os.read(lifeline_fd, 1):
                return
        except OSError:
            pass
        loop.remove_reader(lifeline_fd)
        if on_eof is None:
            os._exit(1)  # the supervisor is gone: nobody can route to us or stop us cleanly
        on_eof()

    loop.add_reader(lifeline_fd, on_readable)


def run_until_complete(coro: Any) -> None:
    """Run ``coro`` on uvloop, flush output and exit with the code it returns."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(coro)
    logging.shutdown()  # log files written once per loop iteration keep nothing back
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(spec_bytes: bytes, output: PassFd, lifeline: PassFd, last_words: PassFd) -> None:
    spec = bootstrap(spec_bytes, output)
    serve_replica(spec, lifeline.detach(), last_words.detach())


def serve_replica(spec: dict[str, Any], lifeline_fd: int, last_words_fd: int) -> None:
    """Run the replica ``spec`` describes until it stops, then exit (never returns). Shared by a
    spawned replica (after ``bootstrap``) and one forked from a warm template
    (``runtime/template_main.py``)."""
    apply_environment(spec)
    _configure_logging(spec)
    run_until_complete(_serve(spec, lifeline_fd, last_words_fd))


def apply_environment(spec: dict[str, Any]) -> None:
    """Before any user code is imported: set the replica's environment variables
    (``runtime_env.env_vars``, ``CUDA_VISIBLE_DEVICES``) and its memory limit (``memory``, as
    RLIMIT_DATA: an allocation past it raises MemoryError)."""
    os.environ.update(spec.get("env") or {})
    limit = spec.get("memory_limit_bytes")
    if limit:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _leave_last_words(fd: int, error: str) -> None:
    """Write ``{"error": error}`` to the last-words pipe and close it (blocking: the supervisor
    reads the pipe while this process runs and after it exits)."""
    from shoal.runtime import wire

    data = wire.pack({"error": error})
    os.set_blocking(fd, True)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the supervisor is gone: nobody to tell
    finally:
        os.close(fd)


def _configure_logging(spec: dict[str, Any]) -> None:
    from shoal.runtime.logs import install_replica_logging

    install_replica_logging(
        deployment=spec["deployment"], replica=spec["replica_id"], app=spec.get("app", ""),
        logging_config=spec.get("logging_config"), default_logs_dir=spec.get("logs_dir"),
        log_rotation=spec.get("log_rotation"),
    )


async def _serve(spec: dict[str, Any], lifeline_fd: int, last_words_fd: int) -> int:
    import zmq

    from shoal.runtime import client, transport, wire
    from shoal.runtime.context import ReplicaContext, ReplicaID, set_replica_context
    from shoal.runtime.logs import bind_log_files
    from shoal.runtime.replica import ReplicaWorker
    from shoal.runtime.replica_metrics import ReplicaMetrics
    from shoal.runtime.user_code import UserCallable
    from shoal.serve.schema import ReplicaRank

    loop = asyncio.get_running_loop()
    bind_log_files(loop)  # the replica's log files: one write per loop iteration
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    watch_lifeline(loop, lifeline_fd)

    incarnation = spec["incarnation"]
    control_sock = transport.make_socket(zmq.DEALER)
    control_sock.connect(spec["control_endpoint"])
    control = transport.Channel(control_sock, lambda frames: None)

    def report(kind: wire.Kind, meta: dict[str, Any]) -> None:
        """Send ``kind`` to the supervisor, signed with the instance's key (it drops unsigned frames)."""
        meta.update(replica_id=spec["replica_id"], pid=os.getpid(), protocol=wire.PROTOCOL_VERSION)
        [frame] = wire.encode(wire.Message(kind, incarnation, 0, meta))
        control.send([wire.sign(frame, transport.read_key(spec["control_endpoint"]))])

    _report_model_ids(loop, report)

    config = spec["config"]
    replica_sock = transport.make_socket(zmq.ROUTER)
    worker: ReplicaWorker | None = None
    try:
        replica_sock.bind(spec["endpoint"])
        client.init_replica_runtime(spec["control_endpoint"], spec["app"])
        func_or_class, init_args, init_kwargs = wire.loads(wire.Encoding.PICKLE, spec["definition"])
        user = UserCallable(
            deployment_name=spec["deployment"],
            func_or_class=func_or_class,
            init_args=init_args,
            init_kwargs=init_kwargs,
            max_ongoing_requests=config["max_ongoing_requests"],
        )
        replica_context = ReplicaContext(
            replica_id=ReplicaID(spec["replica_id"].rsplit("#", 1)[-1], spec["deployment"], spec["app"]),
            world_size=spec.get("world_size", 1),
            code_version=spec.get("version", ""),
            max_ongoing_requests=config["max_ongoing_requests"],
            rank=ReplicaRank(rank=spec.get("rank", 0), node_rank=0, local_rank=spec.get("rank", 0)),
        )
        set_replica_context(replica_context)
        metrics = ReplicaMetrics(
            deployment=spec["deployment"], replica=replica_context.replica_tag, application=spec["app"],
            max_ongoing_requests=config["max_ongoing_requests"],
        )
        metrics.count_start()  # before the constructor, as Ray counts it
        constructing = time.monotonic()
        await user.construct(config.get("user_config"), rank=replica_context.rank)
        replica_context.servable_object = user.instance
        worker = ReplicaWorker(
            user=user,
            incarnation=incarnation,
            max_ongoing_requests=config["max_ongoing_requests"],
            app_name=spec["app"],
            metrics=metrics,
        )
        await worker.http.startup()
        initialization_s = time.monotonic() - constructing  # constructor, user_config, ASGI startup
        worker.attach(transport.Channel(replica_sock, worker.on_message))
    except Exception as exc:
        _leave_last_words(last_words_fd, "".join(traceback.format_exception(exc)))
        await client.shutdown_runtime()
        control.close()
        replica_sock.close()
        transport.terminate_context()
        return 1

    os.close(last_words_fd)
    report(wire.Kind.READY, {"endpoint": spec["endpoint"], "initialization_s": initialization_s})
    await stop.wait()

    timeout_s = float(config.get("graceful_shutdown_timeout_s", 20.0))
    if not await worker.drain(timeout_s):
        logging.getLogger("shoal.replica").warning(
            "graceful_shutdown_timeout_s=%s passed with %d request(s) still running; cancelling them",
            timeout_s, worker.ongoing,
        )
        await worker.cancel_all()
    try:
        await worker.http.shutdown()
        from shoal.runtime import request_router_report

        await request_router_report.shutdown()  # unloads multiplexed models
        await worker.user.destroy()
    except Exception:
        logging.getLogger("shoal.replica").exception("__del__ raised during shutdown")
    await client.shutdown_runtime()
    if worker.channel is not None:
        worker.channel.close(linger_ms=2000)  # the last replies must reach their callers
    control.close()
    transport.terminate_context()
    return 0


def _report_model_ids(loop: asyncio.AbstractEventLoop, report: Any) -> None:
    """Push the multiplexed models this replica holds to the supervisor (ROUTING_INFO, signed
    like READY) whenever they change: once per loop iteration however many changes it saw."""
    from shoal.runtime import request_router_report, wire

    scheduled = False

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        model_ids = request_router_report.current()
        if model_ids is not None:
            report(wire.Kind.ROUTING_INFO, wire.routing_info(model_ids))

    def changed(_model_ids: wire.ModelIds) -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            loop.call_soon_threadsafe(flush)

    request_router_report.set_listener(changed)


class PassFd:
    """A file descriptor handed to a child started with the spawn method.

    Pickling it (which happens inside ``Process.start()``) registers the descriptor with the
    spawning Popen, so the child inherits it under the same number; ``detach()`` returns it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        from multiprocessing import context

        popen = context.get_spawning_popen()
        if popen is None:
            raise RuntimeError("PassFd can only be pickled while a process is being spawned")
        return (PassFd, (popen.duplicate_for_child(self.fd),))

    def detach(self) -> int:
        return self.fd

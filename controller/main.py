"""The supervisor process: control socket, controller, signals, and an orderly stop.

Started on a run directory whose previous supervisor died without shutting down, it deploys
again the applications that one ran (saved by the controller, see ``applied``).

Stops on SIGTERM or SIGINT (a second one exits at once, code 1, cleaning the run directory the
same way), on the ``shutdown`` operation, or when
the lifeline pipe from the process that started it reaches EOF (that process died, however it
died). Stopping drains and stops every replica (bounded by their ``graceful_shutdown_timeout_s``),
then forgets the saved applications and removes the sockets and the pid file; logs stay in the
run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.controller import applied, gpus, rundir
from shoal.controller.control import ControlServer
from shoal.controller.controller import Controller
from shoal.controller.listener import HTTPListener
from shoal.controller.metrics_endpoint import MetricsEndpoint, MetricsFiles, instance_pids, retention_from_env
from shoal.controller.proxies import ProxyPool
from shoal.controller.proxy import check_tls_options
from shoal.controller.supervisor_log import OutputCapture
from shoal.controller.tasks import supervise
from shoal.runtime import metrics, shm, transport
from shoal.runtime.rotation import LogRotationConfigError, RotationLimits, limits_from_env
from shoal.runtime.worker_main import set_process_name, watch_lifeline
from shoal.serve.config import DEFAULT_METRICS_PORT

logger = logging.getLogger("shoal.supervisor")
_LOG_DRAIN_TIMEOUT_S = 5.0  # at exit, bound on writing the last lines to supervisor.log


@dataclass(frozen=True)
class SupervisorConfig:
    run_dir: Path
    lifeline_fd: int | None = None
    ready_fd: int | None = None
    http_options: dict[str, Any] | None = None  # None: no HTTP proxy
    gpus: tuple[str, ...] | None = None  # declared GPU device ids; None: detect them
    log_rotation: RotationLimits = field(default_factory=RotationLimits)  # every log file's size limits (Ray's RAY_ROTATION_*)
    logging_config: dict[str, Any] | None = None  # the instance's (serve.start's, a config file's top level)
    grpc_options: dict[str, Any] | None = None  # gRPCOptions; with servicer functions, the proxies serve gRPC


def _echo(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


async def serve(config: SupervisorConfig) -> int:
    run_dir = config.run_dir
    rundir.check_private_dir(run_dir)
    if rundir.supervisor_pid(run_dir) not in (None, os.getpid()):
        raise rundir.UnsafeRunDirError(f"a shoal supervisor already runs in {run_dir}")
    rundir.remove_sockets(run_dir)
    rundir.create_key(run_dir)  # before the pid file: whoever finds this supervisor finds its key
    (run_dir / rundir.PID_FILE).write_text(str(os.getpid()))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signalled = asyncio.Event()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            logger.warning("second signal: exiting at once")
            _abandon(run_dir)
            os._exit(1)
        signalled.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    if config.lifeline_fd is not None:
        watch_lifeline(loop, config.lifeline_fd, stop.set)

    devices = gpus.detect_gpus(config.gpus)
    controller = Controller(run_dir, echo=_echo, gpus=devices, log_rotation=config.log_rotation)
    endpoint = rundir.control_endpoint(run_dir)
    info: dict[str, Any] = {
        "pid": os.getpid(), "control": endpoint, "run_dir": str(run_dir), "http_url": None, "gpus": list(devices),
    }
    try:
        grpc_listen = _prepare_grpc(config)
    except (OSError, ValueError) as exc:  # a servicer function that cannot serve, a port taken
        _report_ready(config.ready_fd, {"error": str(exc)})
        rundir.remove_sockets(run_dir)
        return 2
    if grpc_listen is not None:
        info["grpc_url"] = grpc_listen.url
    try:
        metrics_endpoint = _start_metrics(run_dir, config.http_options, info, controller)
    except (OSError, ValueError) as exc:
        _report_ready(config.ready_fd, {"error": str(exc)})
        rundir.remove_sockets(run_dir)
        return 2
    listener: HTTPListener | None = None
    if config.http_options is not None and config.http_options.get("host") is not None:
        try:
            check_tls_options(config.http_options)  # a bad certificate is an error at start
        except ValueError as exc:
            _report_ready(config.ready_fd, {"error": str(exc)})
            rundir.remove_sockets(run_dir)
            return 2
        try:
            listener = HTTPListener.bind(config.http_options["host"], int(config.http_options["port"]))
        except OSError as exc:
            _report_ready(config.ready_fd, {"error": str(exc), "http_bind_failed": True})
            rundir.remove_sockets(run_dir)
            return 2
        controller.proxies = ProxyPool(
            config.http_options, endpoint, listener, echo=_echo,
            on_process_exit=lambda pid: controller.process_exited(pid),
            logs_dir=str(run_dir / rundir.LOGS), log_rotation=config.log_rotation,
            logging_config=config.logging_config,  # the first deploy carries the same: no proxy restart
            grpc=grpc_listen.spec() if grpc_listen is not None else None,
        )
        info["http_url"] = controller.proxies.url
    server = ControlServer(endpoint, controller, on_shutdown=stop.set, info=info)
    # Large arrays of handle calls travel in shared-memory segments there (runtime/shm.py):
    # the sweep removes those of dead processes, and the directory goes when we stop.
    segments_dir = shm.create_directory(str(run_dir))
    sweeper = supervise("shared-memory sweep", lambda: shm.sweep_forever(segments_dir))
    shm.configure(str(run_dir))  # for the results of its own calls to replicas
    if controller.proxies is not None:
        controller.proxies.start()
    _restore(controller, run_dir)
    _report_ready(config.ready_fd, info)
    try:
        await stop.wait()
        # Signalled (an orchestrator stopping us): let load balancers see /-/healthz fail first.
        # Asked by our driver, or the driver is gone: nobody is routing here, stop at once.
        await controller.shutdown(announce=signalled.is_set())
        applied.clear(run_dir)
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        shm.remove_directory(str(run_dir))
        if listener is not None:
            listener.close()
        if grpc_listen is not None:
            grpc_listen.close()
        await server.aclose()
        if metrics_endpoint is not None:
            metrics_endpoint.close()
        rundir.remove_sockets(run_dir)
        transport.terminate_context()
    return 0


def _prepare_grpc(config: SupervisorConfig) -> Any:
    """The gRPC port and RPCs (``controller.grpc_listen``), or None without servicer functions;
    ValueError if gRPC is asked for without the proxy that would serve it."""
    options = config.grpc_options
    if not options or not options.get("grpc_servicer_functions"):
        return None
    http = config.http_options
    if http is None or http.get("host") is None:
        raise ValueError(
            "grpc_options.grpc_servicer_functions needs the proxy, which serves gRPC beside HTTP: "
            "do not disable HTTP (proxy_location='Disabled' or http_options.host=None) to serve gRPC."
        )
    from shoal.controller import grpc_listen

    return grpc_listen.prepare(options, str(http["host"]))


def _start_metrics(
    run_dir: Path, http_options: dict[str, Any] | None, info: dict[str, Any], controller: Controller,
) -> MetricsEndpoint | None:
    """Record this process's metrics, and its children's, into the run directory's files, and
    serve them merged with the controller's gauges (``info["metrics_url"]``). None if metrics
    are off. If the default port is taken (another instance has it, or this one's HTTP proxy),
    a free port is used; any other port that cannot be bound is an OSError, and the HTTP port
    is a ValueError."""
    options = http_options or {}
    port = options.get("metrics_port", DEFAULT_METRICS_PORT)
    info["metrics_url"] = None
    if port is None:
        metrics.disable()  # not even into a PROMETHEUS_MULTIPROC_DIR the supervisor inherited
        return None
    http_port = options.get("port") if options.get("host") is not None else None
    if port == http_port and port != 0:
        if port != DEFAULT_METRICS_PORT:
            raise ValueError(f"http_options.metrics_port and http_options.port are both {port}; give metrics another port")
        port = 0  # the HTTP proxy asked for the default metrics port: metrics take a free one
    directory = run_dir / rundir.METRICS
    shutil.rmtree(directory, ignore_errors=True)  # a new instance's counters start at zero
    metrics.enable(directory)
    files = MetricsFiles(directory, retention_s=retention_from_env(), live_pids=instance_pids)
    host = options.get("host") or "127.0.0.1"
    collectors = (controller.gauges,)
    try:
        endpoint = MetricsEndpoint(files, host, int(port), collectors=collectors)
    except OSError as exc:
        if port != DEFAULT_METRICS_PORT:
            raise OSError(f"cannot serve metrics on {host}:{port} (http_options.metrics_port): {exc}") from exc
        endpoint = MetricsEndpoint(files, host, 0, collectors=collectors)
        logger.debug("the default metrics port %d is taken; serving metrics on %s", port, endpoint.url)
    controller.gauges.retention_s = files.retention_s
    controller.gauges.enabled = True
    controller.process_exited = files.process_exited
    info["metrics_url"] = endpoint.url
    return endpoint


def _abandon(run_dir: Path) -> None:
    """Before exiting at once (a second signal): the stop was asked for, so leave the run
    directory as an orderly stop would (no saved applications to bring back, no sockets, pid
    file or key); the children die with this process (their parent-death signal)."""
    try:
        applied.clear(run_dir)
        rundir.remove_sockets(run_dir)
        shm.remove_directory(str(run_dir))
    except OSError:
        logger.exception("could not clean %s", run_dir)


def _restore(controller: Controller, run_dir: Path) -> None:
    """Deploy again what a previous supervisor of ``run_dir`` was running when it died."""
    try:
        specs = applied.load(run_dir)
        if specs:
            controller.deploy_apps(specs, declarative=True)
            logger.warning(
                "a previous supervisor of %s stopped without shutting down; brought back %s",
                run_dir, ", ".join(f"'{s['name']}'" for s in specs),
            )
    except Exception:
        logger.exception("could not bring back the applications saved in %s", run_dir)


def _report_ready(fd: int | None, info: dict[str, Any]) -> None:
    if fd is not None:
        with os.fdopen(fd, "w") as ready:
            ready.write(json.dumps(info) + "\n")


def _gpu_ids(value: str) -> tuple[str, ...]:
    return gpus.parse_gpus(json.loads(value) if value.lstrip().startswith("[") else value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.controller", description="Run a shoal supervisor.")
    parser.add_argument("--run-dir", required=True, type=Path, help="the instance's run directory (0700)")
    parser.add_argument("--lifeline-fd", type=int, help="stop when this pipe reaches EOF")
    parser.add_argument("--ready-fd", type=int, help="write one JSON readiness line to this fd")
    parser.add_argument("--http-options", type=json.loads, help="HTTPOptions as JSON; omit for no proxy")
    parser.add_argument("--gpus", type=_gpu_ids, help="GPUs: a count, device ids (0,2) or a JSON list of ids; omit to detect")
    parser.add_argument("--log-file", type=Path, help="write stdout and stderr to this size-rotating file")
    parser.add_argument("--logging-config", type=json.loads, help="the instance's LoggingConfig as JSON (the proxy's)")
    parser.add_argument("--grpc-options", type=json.loads, help="gRPCOptions as JSON; omit for no gRPC")
    args = parser.parse_args(argv)
    try:
        rotation = limits_from_env()  # read once here; replicas get them in their spec
    except LogRotationConfigError as exc:
        _report_ready(args.ready_fd, {"error": str(exc)})
        return 2
    capture = OutputCapture(args.log_file, rotation) if args.log_file is not None else None
    logging.basicConfig(level=logging.INFO, format="(shoal supervisor) %(levelname)s %(message)s")
    set_process_name("shoal")
    import uvloop

    config = SupervisorConfig(
        args.run_dir, args.lifeline_fd, args.ready_fd, args.http_options, args.gpus, rotation, args.logging_config,
        args.grpc_options,
    )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(config))
    except rundir.UnsafeRunDirError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 2
    finally:
        if capture is not None:
            capture.close(_LOG_DRAIN_TIMEOUT_S)

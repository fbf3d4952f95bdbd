"""Entry point of the proxy process (started with the spawn method by the supervisor).

``main(spec, output, lifeline, listener)``: ``listener`` is the listening TCP socket, bound by the
supervisor (so a restarted proxy keeps the same port and clients queue instead of being refused).
Runs uvicorn with uvloop and httptools (with the limits of ``protocol``, a connection cap and a
keep-alive deadline from ``http_options``) on it, over TLS when ``http_options`` set
``ssl_keyfile`` and ``ssl_certfile`` (``proxy.tls``), until SIGTERM, then drains: ``/-/healthz``
answers 503 while the requests in flight finish; at ``graceful_shutdown_timeout_s`` those left
are answered 503 (``ProxyApp.drain``).

With ``spec["grpc"]`` (servicer functions configured) the proxy also runs a gRPC server
(``proxy.grpc_server``) on the gRPC port, bound with ``SO_REUSEPORT`` beside the other proxies';
it drains with the HTTP server (new calls UNAVAILABLE, calls in flight finish within
``graceful_shutdown_timeout_s``). Without it, grpc is not even imported.

Several proxies may serve from the same listener (``http_options.num_proxies``): each is one
such process with its own routers, told its ``proxy_index`` by the spec.

Logging follows the instance's global ``logging_config`` from the spec (``_configure_logging``):
stderr (echoed by the supervisor) and ``<logs dir>/proxy_<host>.log`` (``proxy_<host>_<index>.log``
for the proxies after the first), written once per loop
turn; with access lines on, the app writes them (``proxy.access``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import socket
import ssl
from collections.abc import Iterator
from typing import Any

from shoal.runtime import worker_main

_MIN_DRAIN_S = 0.5  # /-/healthz answers 503 at least this long before the proxy stops
_GRPC_STOP_GRACE_S = 1.0  # after the drain, how long the gRPC calls left get to end
_RESERVED_FDS = 256  # descriptors kept for ZeroMQ sockets, pipes and logs, beyond client connections


def main(spec_bytes: bytes, output: Any, lifeline: Any, listener: Any) -> None:
    spec = worker_main.bootstrap(spec_bytes, output)
    access_handlers = _configure_logging(spec)
    worker_main.run_until_complete(_serve(spec, lifeline.detach(), listener.detach(), access_handlers))


def _configure_logging(spec: dict[str, Any]) -> list[logging.Handler]:
    """The proxy's logging as the instance's ``logging_config`` says (``install_proxy_logging``;
    its file is written once per loop turn, see ``runtime/buffered_log.py``); returns the
    handlers access lines go to (none: access lines are off)."""
    from shoal.runtime.buffered_log import LoopBufferedHandler
    from shoal.runtime.logs import install_proxy_logging

    return install_proxy_logging(
        host=str(spec["http_options"]["host"]),
        logging_config=_logging_config(spec),
        default_logs_dir=spec.get("logs_dir"),
        log_rotation=spec.get("log_rotation"),
        file_factory=LoopBufferedHandler,
        index=int(spec.get("proxy_index", 0)),
    )


def _logging_config(spec: dict[str, Any]) -> dict[str, Any]:
    return spec.get("logging_config") or {"log_level": spec.get("log_level", "INFO")}


def _bind_log_files(loop: asyncio.AbstractEventLoop) -> list[logging.Handler]:
    """Let the proxy's buffered log files batch the lines logged on ``loop``; returns them."""
    from shoal.runtime.buffered_log import LoopBufferedHandler

    files: list[logging.Handler] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LoopBufferedHandler):
            handler.bind(loop)
            files.append(handler)
    return files


def _server_class() -> Any:
    """uvicorn's server without its signal handling: SIGTERM is the proxy's to handle (drain).
    (Built on first use: the supervisor imports this module, and need not import uvicorn.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _connection_cap(max_connections: int) -> int:
    """``max_connections``, with the open-files limit raised to fit it (up to the hard limit);
    lowered, with a warning, if that limit leaves too few descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        cap = max(1, soft - _RESERVED_FDS)
        logging.getLogger("shoal.proxy").warning(
            "http_options.max_connections=%d does not fit the open-files limit (%d); using %d",
            max_connections, soft, cap,
        )
        return cap
    return max_connections


async def _start_grpc(spec: dict[str, Any], runtime: Any, access_handlers: list[logging.Handler]) -> tuple[Any, Any]:
    """Start the gRPC server ``spec["grpc"]`` describes; returns the ingress and the server."""
    from shoal.proxy.access import access_line
    from shoal.proxy.grpc_server import GrpcIngress, GrpcOptions, build_server
    from shoal.proxy.metrics import IngressMetrics
    from shoal.runtime import metrics_batch

    options = GrpcOptions.from_spec(spec["grpc"])
    metrics = IngressMetrics(node_id=socket.gethostname(), node_ip_address=options.host, protocol="gRPC")
    metrics_batch.register(asyncio.get_running_loop(), metrics.flush)
    access = access_line(access_handlers, _logging_config(spec), options.host) if access_handlers else None
    ingress = GrpcIngress(runtime, options, metrics, access)
    server, _port = build_server(ingress)
    await server.start()
    return ingress, server


def _listening_address(sock: socket.socket) -> str:
    """The address the proxy listens on (the ``node_ip_address`` of its metrics)."""
    try:
        return str(sock.getsockname()[0])
    except OSError:
        return ""


async def _serve(spec: dict[str, Any], lifeline_fd: int, listener_fd: int, access_handlers: list[logging.Handler]) -> int:
    import uvicorn

    from shoal.proxy import tls
    from shoal.proxy.access import access_line
    from shoal.proxy.app import ProxyApp, ProxyOptions
    from shoal.proxy.metrics import IngressMetrics
    from shoal.proxy.protocol import HeadLimits, LimitedHttpProtocol
    from shoal.runtime import client, metrics_batch, router_metrics, transport, wire

    loop = asyncio.get_running_loop()
    log_files = _bind_log_files(loop)
    worker_main.watch_lifeline(loop, lifeline_fd)
    sock = socket.socket(fileno=listener_fd)
    options = spec["http_options"]  # every HTTPOptions field, validated (see ProxySupervisor)
    router_metrics.set_actor_id(router_metrics.PROXY_ACTOR_ID)
    runtime = client.init_replica_runtime(spec["control_endpoint"], "", role="proxy")
    metrics = IngressMetrics(node_id=socket.gethostname(), node_ip_address=_listening_address(sock))
    metrics_batch.register(loop, metrics.flush)
    app = ProxyApp(
        runtime,
        ProxyOptions(
            root_path=options["root_path"],
            request_timeout_s=options["request_timeout_s"],
            max_request_body_bytes=options["max_request_body_bytes"],
        ),
        metrics,
        access_line(access_handlers, _logging_config(spec), options["host"]) if access_handlers else None,
    )
    tls_kwargs: dict[str, Any] = {}
    if tls.server_context(options) is not None:  # checked by the supervisor already; raises if not
        tls_kwargs = {
            "ssl_keyfile": options["ssl_keyfile"],
            "ssl_certfile": options["ssl_certfile"],
            "ssl_keyfile_password": options["ssl_keyfile_password"],
            "ssl_ca_certs": options["ssl_ca_certs"],
            "ssl_cert_reqs": ssl.CERT_REQUIRED if options["ssl_ca_certs"] else ssl.CERT_NONE,
        }
    limits = HeadLimits(
        options["max_header_bytes"], options["max_header_count"], options["request_header_timeout_s"],
        on_refused=metrics.refused,
    )
    config = uvicorn.Config(
        app,
        http=LimitedHttpProtocol.with_limits(limits),
        ws="websockets-sansio",
        lifespan="off",
        log_config=None,  # uvicorn's loggers go through the proxy's (a dictConfig would close its files)
        access_log=False,
        log_level="warning",
        timeout_keep_alive=options["keep_alive_timeout_s"],
        timeout_graceful_shutdown=math.ceil(options["graceful_shutdown_timeout_s"]),
        limit_concurrency=_connection_cap(options["max_connections"]),
        server_header=False,
        **tls_kwargs,
    )
    server = _server_class()(config)

    grace_s = float(options["graceful_shutdown_timeout_s"])
    drain: list[asyncio.Task[None]] = []
    grpc_ingress, grpc_server = None, None
    if spec.get("grpc"):
        grpc_ingress, grpc_server = await _start_grpc(spec, runtime, access_handlers)

    async def drain_then_exit(min_s: float) -> None:
        # SIGTERM (min_s > 0) stops the instance: new connections get 503. SIGINT replaces this
        # proxy, or nobody routes here any more: what still arrives is served.
        http_drain = app.drain(min_s=min_s, timeout_s=grace_s, refuse_new=min_s > 0)
        if grpc_ingress is None:
            await http_drain
        else:
            await asyncio.gather(http_drain, grpc_ingress.drain(grace_s))
        server.should_exit = True

    def on_signal(min_s: float) -> None:
        if not drain:  # a second signal changes nothing; the supervisor escalates to SIGKILL
            drain.append(loop.create_task(drain_then_exit(min_s)))

    # SIGTERM: announce the drain on /-/healthz first; SIGINT (from the supervisor only; the
    # proxy is not in the terminal's process group): nobody routes here any more, just finish.
    loop.add_signal_handler(signal.SIGTERM, on_signal, _MIN_DRAIN_S)
    loop.add_signal_handler(signal.SIGINT, on_signal, 0.0)
    await runtime.call("proxy_ready", {"pid": os.getpid(), "protocol": wire.PROTOCOL_VERSION})
    try:
        await server.serve(sockets=[sock])
    finally:
        if grpc_ingress is not None:
            grpc_ingress.close()
        if grpc_server is not None:
            await grpc_server.stop(_GRPC_STOP_GRACE_S)  # what is left after the drain is cut
        metrics_batch.flush_now(loop)  # what the last interval recorded
        await client.shutdown_runtime()
        transport.terminate_context()
        for handler in log_files:
            handler.flush()  # the process ends with os._exit
    return 0

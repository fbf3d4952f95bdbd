"""The ``serve.*`` functions: start, run, delete, status, shutdown and handle lookups.

Every function talks to one instance (see ``shoal.controller.launch``): the one named by
``SHOAL_ADDRESS``, this user's default instance, or a private one started on first use that
dies with this process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.controller import launch, rundir
from shoal.runtime import client, context, wire
from shoal.runtime.errors import RayServeException, ShoalConnectionError
from shoal.runtime.handle import DeploymentHandle
from shoal.runtime.local import LocalRuntime
from shoal.runtime.logs import install_local_logging
from shoal.runtime.user_code import UserCallable
from shoal.serve import _build
from shoal.serve._instance_options import app_options, instance_options
from shoal.serve._progress_writer import Emit, Watch, display_for
from shoal.serve.config import HTTPOptions
from shoal.serve.deployment import Application
from shoal.serve.schema import ServeStatus, validate_route_prefix

logger = logging.getLogger("shoal.serve")

_WAIT_ROUND_S = 2.0  # one wait_app call waits at most this long in the supervisor
_WAIT_REPLY_GRACE_S = 5.0  # ... and its answer must arrive this much later, or the driver looks
_ROUTED_WAIT_S = 30.0  # run_many: how long the driver waits to learn the new apps' routes
_STATUS_CALL_TIMEOUT_S = 5.0  # the progress line's status calls
_SLOW_STARTUP_WARNING_S = 30.0  # Ray's RAY_SERVE_SLOW_STARTUP_WARNING_S default
_lock = threading.RLock()
_instance: launch.Instance | None = None
_local: LocalRuntime | None = None
_instance_logging_config: dict[str, Any] | None = None  # serve.start's, as plain values


def _runtime(
    start: bool = True, http_options: Any = None, gpus: tuple[str, ...] | None = None,
    grpc_options: dict[str, Any] | None = None,
) -> client.Runtime | None:
    """The driver's runtime, connecting to (or starting) an instance when ``start``
    (``grpc_options``: plain gRPCOptions with servicer functions, for an instance started now)."""
    global _instance
    with _lock:
        current = client.current_runtime()
        if current is not None:
            if http_options is not None or gpus is not None or grpc_options is not None:
                logger.info("shoal is already running; the new http_options (but num_proxies), grpc_options "
                            "and gpus are not applied.")
            return current
        if context.in_replica():
            raise RayServeException("this replica has no connection to its supervisor")
        if not start:
            instance = launch.find_running()
        else:
            # serve.run alone starts HTTP on the default port if it can; serve.start insists.
            instance = launch.connect_or_start(
                _http_options(http_options), http_required=http_options is not None, gpus=gpus,
                logging_config=_instance_logging_config, grpc_options=grpc_options,
            )
        if instance is None:
            return None
        _instance = instance
        return client.connect_driver(instance.control_endpoint)


def _http_options(http_options: Any) -> dict[str, Any] | None:
    if http_options is None:
        options = HTTPOptions()
    elif isinstance(http_options, HTTPOptions):
        options = http_options
    else:
        options = HTTPOptions(**dict(http_options))
    return options.model_dump() if options.host is not None else None


def start(
    proxy_location: Any = None,
    http_options: Any = None,
    grpc_options: Any = None,
    logging_config: Any = None,
    tracing_config: Any = None,
    controller_options: Any = None,
    gpus: int | str | list[str] | None = None,
    **kwargs: Any,
) -> None:
    """Connect to a running instance or start one with ``http_options`` (Ray's ``serve.start``).

    If an instance already runs, its HTTP options and GPUs stay as they are (as in Ray Serve),
    except ``http_options.num_proxies`` when given: the instance then runs that many proxies
    (``set_num_proxies``).
    ``logging_config`` becomes the default of every application this process deploys that sets
    none, and the supervisor's log level. ``gpus`` (a shoal extension, as ``shoal start
    --gpus``): the GPUs its replicas may use, a count N (devices ``"0"`` to ``"N-1"``) or a list
    of device ids; None detects them. Options shoal cannot honour are refused (ValueError or
    TypeError naming them; see docs/options.md).
    """
    from shoal.controller.gpus import parse_gpus

    global _instance_logging_config
    options = instance_options(
        proxy_location=proxy_location, http_options=http_options, grpc_options=grpc_options,
        logging_config=logging_config, tracing_config=tracing_config,
        controller_options=controller_options, extra=kwargs,
    )
    if options.logging_config is not None:
        _instance_logging_config = options.logging_config
    _runtime(http_options=options.http_options, gpus=None if gpus is None else parse_gpus(gpus),
             grpc_options=options.grpc_options)
    if options.http_options is not None and "num_proxies" in options.http_options.model_fields_set:
        set_num_proxies(options.http_options.num_proxies)  # an instance that already ran changes too


def set_num_proxies(num_proxies: int) -> None:
    """Run ``num_proxies`` HTTP proxy processes from now on (``http_options.num_proxies``; a
    shoal extension): more start, or those beyond it finish their requests and stop. Returns once
    those stopped; the new ones serve once started (``serve.status().proxy_processes``).
    RayServeException naming ``num_proxies`` if the instance serves no HTTP or the number is not
    a whole number of at least 1."""
    from shoal.serve.config import check_num_proxies

    check_num_proxies(num_proxies)
    rt = _runtime(start=False)
    if rt is None:
        raise RayServeException("No shoal instance is running; start one with `shoal start`.")
    rt.call_sync("set_num_proxies", {"num_proxies": num_proxies}, timeout_s=None)


def get_http_url() -> str | None:
    """The base URL the instance's HTTP proxy listens on (a shoal extension: useful with port 0)."""
    rt = _runtime(start=False)
    if rt is None:
        return None
    return rt.call_sync("ping")[0].get("http_url")


def get_grpc_url() -> str | None:
    """Where the instance's proxies serve gRPC (``host:port``, as a client dials it; a shoal
    extension: useful with ``gRPCOptions(port=0)``), or None if they serve none."""
    rt = _runtime(start=False)
    if rt is None:
        return None
    return rt.call_sync("ping")[0].get("grpc_url")


def get_metrics_url() -> str | None:
    """Where the instance serves Prometheus metrics (``http_options.metrics_port``; a shoal
    extension), or None if it serves none."""
    rt = _runtime(start=False)
    if rt is None:
        return None
    return rt.call_sync("ping")[0].get("metrics_url")


def run(
    target: Application,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: Any = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
    controller_options: Any = None,
) -> DeploymentHandle[Any]:
    """Deploy ``target`` as app ``name`` (replacing one of that name) and wait until it runs.

    Returns a handle to the ingress deployment. RuntimeError, with the constructor's traceback,
    if the app becomes DEPLOY_FAILED. ``blocking=True`` then waits until Ctrl-C. While it waits,
    a terminal on stderr shows one line of progress (which deployments still start, what they
    wait on); off a terminal the ``shoal.serve`` logger says it (INFO; WARNING after 30 s).
    ``logging_config`` applies to every deployment of the app that sets none itself (default:
    ``serve.start``'s).
    """
    handle = _run_many(
        [RunTarget(target, name, route_prefix, logging_config, external_scaler_enabled)],
        _local_testing_mode=_local_testing_mode,
        controller_options=controller_options,
    )[0]
    if blocking:
        _block_until_interrupted()
    return handle


@dataclass(frozen=True)
class RunTarget:
    """One application for ``serve.run_many`` (Ray's ``RunTarget``)."""

    target: Application
    name: str = "default"
    route_prefix: str | None = "/"
    logging_config: Any = None
    external_scaler_enabled: bool = False


def run_many(
    targets: Sequence[RunTarget],
    blocking: bool = False,
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
    controller_options: Any = None,
) -> list[DeploymentHandle[Any]]:
    """Deploy several applications in one step and return handles to their ingress deployments
    (Ray's ``serve.run_many``). Every target is validated and built before anything is deployed;
    the supervisor checks them all (route prefixes included) before it changes anything, so
    either every application is deployed or none is. ``wait_for_applications_running``: wait
    until each is RUNNING (RuntimeError naming those that failed); otherwise return once the
    supervisor holds them and, with ``wait_for_ingress_deployment_creation``, this process knows
    their ingress deployments (calls through the handles then queue until replicas run).
    ``blocking`` then waits for Ctrl-C.
    """
    handles = _run_many(
        targets,
        wait_for_ingress_deployment_creation=wait_for_ingress_deployment_creation,
        wait_for_applications_running=wait_for_applications_running,
        _local_testing_mode=_local_testing_mode,
        controller_options=controller_options,
    )
    if blocking:
        _block_until_interrupted()
    return handles


def _run_many(
    targets: Sequence[RunTarget],
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
    controller_options: Any = None,
) -> list[DeploymentHandle[Any]]:
    """``run_many`` without ``blocking`` (Ray's internal entry, also behind ``_run``)."""
    if not targets:
        raise ValueError("No applications provided.")
    app_logging: dict[str, dict[str, Any] | None] = {}
    for t in targets:
        if not t.name:
            raise RayServeException("Application name must a non-empty string.")
        if not isinstance(t.target, Application):
            raise TypeError("`serve.run` expects an `Application` returned by `Deployment.bind()`.")
        validate_route_prefix(t.route_prefix)
        app_logging[t.name] = app_options(t.logging_config, t.external_scaler_enabled, controller_options)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise RayServeException(f"Application names must be unique; got {names}.")
    if _local_testing_mode:
        handles = []
        for t in targets:
            local_logging = app_logging[t.name] or _instance_logging_config
            if local_logging:
                install_local_logging(t.name, local_logging)
            handles.append(_run_local(t.target, t.name))
        return handles
    built = [(t, *_build.build(t.target, t.name)) for t in targets]
    specs = []
    for t, deployments, ingress in built:
        spec = _build.to_spec(deployments, ingress, t.name, t.route_prefix)
        # A deployment's own logging_config wins over the app's, which wins over serve.start's.
        spec["logging_config"] = app_logging[t.name] or _instance_logging_config
        if _instance_logging_config is not None:
            spec["instance_logging_config"] = _instance_logging_config
        specs.append(spec)
    rt = _runtime()
    assert rt is not None
    rt.call_sync("deploy_many", {"declarative": False}, (wire.pack(specs),))
    with _progress(rt, names, _log_progress) if wait_for_applications_running else contextlib.nullcontext():
        _wait_running(rt, built, wait_for_ingress_deployment_creation, wait_for_applications_running)
    if wait_for_applications_running:
        _log_ready(rt, targets)
    return [DeploymentHandle(ingress, t.name) for t, _, ingress in built]


def _wait_running(
    rt: client.Runtime, built: list[tuple[RunTarget, Any, str]], wait_for_ingress_deployment_creation: bool,
    wait_for_applications_running: bool,
) -> None:
    """``_run_many``'s waits, once the supervisor holds the apps ``built``."""
    targets = [t for t, _, _ in built]
    if wait_for_ingress_deployment_creation or wait_for_applications_running:
        # The supervisor holds the apps now; wait until this process routes to them too, so the
        # handles returned work at once (a call to a deployment unknown to the router fails).
        ingresses = [(t.name, ingress) for t, _, ingress in built]

        def routed(snapshot: wire.Snapshot) -> bool:
            return all(snapshot.deployment(app, name) is not None for app, name in ingresses)

        asyncio.run_coroutine_threadsafe(rt.wait_snapshot(routed, _ROUTED_WAIT_S), rt.loop).result()
    if wait_for_applications_running:
        failures = []
        for t in targets:
            reply = _wait_app(rt, t.name)
            if not reply.get("exists"):
                failures.append(f"Application '{t.name}' was deleted while it was being deployed.")
            elif reply["status"] == "DEPLOY_FAILED":
                failures.append(f"Deploying application '{t.name}' failed:\n{reply['message']}")
        if failures:
            raise RuntimeError("\n".join(failures))


def _run(
    target: Application,
    *,
    _blocking: bool = True,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: Any = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
    controller_options: Any = None,
) -> DeploymentHandle[Any]:
    """Ray's internal ``serve._run``: ``_blocking=False`` returns once the application is
    deployed, without waiting for it to be RUNNING."""
    return _run_many(
        [RunTarget(target, name, route_prefix, logging_config, external_scaler_enabled)],
        wait_for_applications_running=_blocking,
        _local_testing_mode=_local_testing_mode,
        controller_options=controller_options,
    )[0]


def deploy_specs(
    specs: list[dict[str, Any]], *, declarative: bool, wait: bool, start: bool = False,
    progress_lines: Emit | None = None,
) -> None:
    """Deploy config-file applications (built by ``config_file.build_specs``) in one step.

    ``declarative``: applications not in ``specs`` are deleted. ``wait``: return once every app is
    RUNNING (RuntimeError naming the ones that failed), showing the progress on stderr if it is a
    terminal, else through ``progress_lines`` (default: the ``shoal.serve`` logger).
    ``start``: start an instance if none runs.
    """
    rt = _runtime(start=start)
    if rt is None:
        raise RayServeException("No shoal instance is running; start one with `shoal start`.")
    rt.call_sync("deploy_many", {"declarative": declarative}, (wire.pack(specs),))
    if not wait:
        return
    failures = []
    with _progress(rt, [spec["name"] for spec in specs], progress_lines or _log_progress):
        for spec in specs:
            reply = _wait_app(rt, spec["name"])
            if reply.get("exists") and reply["status"] == "DEPLOY_FAILED":
                failures.append(f"Application '{spec['name']}':\n{reply['message']}")
    if failures:
        raise RuntimeError("Deploying failed:\n" + "\n".join(failures))


def _progress(rt: client.Runtime, apps: list[str], plain: Emit) -> Watch:
    """Progress of deploying ``apps`` while the caller waits: one line rewritten in place when
    stderr is a terminal, else lines through ``plain`` (see ``_progress_writer``)."""

    def fetch() -> dict[str, Any]:
        status: dict[str, Any] = rt.call_sync("status", timeout_s=_STATUS_CALL_TIMEOUT_S)[0]["status"]
        return status

    return Watch(fetch, apps, display_for(sys.stderr, plain))


def _log_progress(text: str, elapsed_s: float) -> None:
    """Progress off a terminal, from ``serve.run``: INFO lines of the ``shoal.serve`` logger
    (silent unless the program configured logging), WARNING once the deploy has taken Ray's
    slow-startup threshold (30 s), as Ray's controller warns of slow replicas."""
    logger.log(logging.WARNING if elapsed_s >= _SLOW_STARTUP_WARNING_S else logging.INFO, "%s", text)


def _log_ready(rt: client.Runtime, targets: Sequence[RunTarget]) -> None:
    """Ray's INFO line per application deployed: "Application 'x' is ready at URL." (no extra
    call unless the logger shows INFO)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    try:
        url = (rt.call_sync("ping")[0].get("http_url") or "").rstrip("/")
    except RayServeException:  # the deploy succeeded: only the URL is missing from the line
        url = ""
    for t in targets:
        at = f" at {url}{t.route_prefix}" if url and t.route_prefix is not None else ""
        logger.info("Application '%s' is ready%s.", t.name, at)


def _wait_app(rt: client.Runtime, name: str) -> dict[str, Any]:
    """Wait until app ``name`` is RUNNING, DEPLOY_FAILED or gone (the supervisor's answer).

    Every call has a deadline: the supervisor waits ``_WAIT_ROUND_S`` at most, and the driver
    another ``_WAIT_REPLY_GRACE_S`` for the answer. Between calls it checks that the supervisor
    still runs: RayServeException, naming what happened, if it died mid-deploy.
    """
    while True:
        try:
            reply, _ = rt.call_sync(
                "wait_app", {"name": name, "timeout_s": _WAIT_ROUND_S}, timeout_s=_WAIT_ROUND_S + _WAIT_REPLY_GRACE_S
            )
            return reply
        except TimeoutError:
            pass  # the supervisor answered: not yet
        except ShoalConnectionError:
            pass  # no answer in time: is the supervisor still there?
        gone = _supervisor_gone()
        if gone is not None:
            raise RayServeException(f"{gone} while application '{name}' was being deployed.")


def _supervisor_gone() -> str | None:
    """What happened to this driver's supervisor, if it no longer runs; else None."""
    instance = _instance
    if instance is None:
        return None
    if instance.process is not None:  # a private instance: this process's child
        code = instance.process.poll()
        return None if code is None else f"The shoal supervisor (pid {instance.process.pid}) exited with code {code}"
    if rundir.supervisor_pid(instance.run_dir) is None:
        return f"The shoal supervisor of {instance.run_dir} is no longer running"
    return None


def configs() -> dict[str, Any]:
    """The config-file entry each running application was last deployed from."""
    rt = _runtime(start=False)
    if rt is None:
        return {}
    configs: dict[str, Any] = rt.call_sync("configs")[0]["configs"]
    return configs


def _run_local(target: Application, name: str) -> DeploymentHandle[Any]:
    global _local
    with _lock:
        if _local is None:
            _local = LocalRuntime()
        local = _local
    deployments, ingress = _build.build(target, name, runtime=local)
    for d in deployments:
        _warn_local_actor_options(d.name, d.config.ray_actor_options or {})
        user = UserCallable(
            deployment_name=d.name,
            func_or_class=d.func_or_class,
            init_args=d.init_args,
            init_kwargs=d.init_kwargs,
            max_ongoing_requests=d.config.max_ongoing_requests,
        )
        local.add(name, d.name, user, d.config.user_config, d.config.max_ongoing_requests)
    return DeploymentHandle(ingress, name, _runtime=local)


def _warn_local_actor_options(deployment_name: str, options: dict[str, Any]) -> None:
    """Local testing mode runs a deployment in this process: no devices, environment or memory
    limit can be given to it, so the ``ray_actor_options`` that would are named in a warning."""
    ignored = sorted(key for key, value in options.items() if key != "num_cpus" and value)
    if ignored:
        logger.warning(
            "Deployment '%s': ray_actor_options %s have no effect in local testing mode (the "
            "deployment runs in this process).", deployment_name, ignored,
        )


def _block_until_interrupted() -> None:
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete app ``name`` and its deployments; waits until they are gone when blocking."""
    rt = _runtime(start=False)
    if rt is None:
        return
    rt.call_sync("delete", {"name": name, "wait": _blocking}, timeout_s=None)


def status() -> ServeStatus:
    """A snapshot of applications, deployments and replica states (empty if nothing runs)."""
    rt = _runtime(start=False)
    if rt is None:
        return ServeStatus()
    reply, _ = rt.call_sync("status")
    return ServeStatus.from_dict(reply["status"])


def shutdown() -> None:
    """Delete every app and stop the instance. A no-op (with a log line) if nothing runs."""
    global _instance, _local, _instance_logging_config
    with _lock:
        _instance_logging_config = None
        if _local is not None:
            _local.close()
            _local = None
        rt = client.current_runtime()
        if rt is None:
            try:
                instance = launch.find_running()
            except RayServeException:
                instance = None
            if instance is None:
                logger.info("Nothing to shut down. There's no shoal application running.")
                return
            rt = client.connect_driver(instance.control_endpoint)
            _instance = instance
        gone = _instance is not None and rundir.supervisor_pid(_instance.run_dir) is None
        if not gone:
            try:
                rt.call_sync("shutdown")
            except RayServeException:
                logger.debug("the supervisor did not answer shutdown", exc_info=True)
        client.close_driver()
        if _instance is not None:
            _instance.wait_stopped(timeout_s=90)
        _instance = None


async def shutdown_async() -> None:
    """``shutdown``, awaitable (Ray's alpha ``serve.shutdown_async``): it runs in a worker
    thread, so the caller's event loop keeps running while the instance drains."""
    await asyncio.to_thread(shutdown)


def _stop_private_instance_at_exit() -> None:
    """A private instance stops with its driver: at a normal exit, drain and wait for it here,
    so no process outlives the script (the lifeline covers a driver that is killed)."""
    if _instance is not None and _instance.private:
        try:
            shutdown()
        except Exception:
            logger.debug("stopping the private instance at exit failed", exc_info=True)


atexit.register(_stop_private_instance_at_exit)


def get_app_handle(name: str) -> DeploymentHandle[Any]:
    """A handle to the ingress deployment of app ``name``."""
    rt = _runtime(start=False)
    apps = rt.call_sync("status")[0]["status"]["applications"] if rt is not None else {}
    if name not in apps:
        raise RayServeException(f"Application '{name}' does not exist.")
    return DeploymentHandle(apps[name]["ingress"], name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None, _check_exists: bool = True,
                          _record_telemetry: bool = True) -> DeploymentHandle[Any]:
    """A handle to any deployment; inside a replica ``app_name`` defaults to the replica's app."""
    if app_name is None:
        if not context.in_replica():
            raise RayServeException(
                "Please specify an application name when getting a deployment handle outside of "
                "a shoal application."
            )
        app_name = context.get_replica_context().app_name
    if _check_exists and not context.in_replica():
        apps = status().applications
        if app_name not in apps or deployment_name not in apps[app_name].deployments:
            raise RayServeException(
                f"Deployment '{deployment_name}' in application '{app_name}' does not exist."
            )
    return DeploymentHandle(deployment_name, app_name)


def get_replica_context() -> context.ReplicaContext:
    """The context of the replica this code runs in; RayServeException outside a replica."""
    return context.get_replica_context()

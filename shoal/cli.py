"""The ``shoal`` command: run, start, deploy, status, config, build, logs, shutdown.

Every command has ``--help``; errors print one ``shoal: ...`` line saying what was wrong and
exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

_INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells use
_DEFAULT_ADDRESS_HELP = "run directory of the instance (default: $SHOAL_ADDRESS, then your default instance)"


def _stop_on_signals() -> threading.Event:
    """An Event that SIGINT (Ctrl-C) and SIGTERM set from now on (instead of raising)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _wait_for_signal(
    stop: threading.Event, reload_dir: Path | None = None, on_change: Any = None, process: Any = None
) -> None:
    """Block until ``stop`` is set (``_stop_on_signals``) or ``process`` (a Popen) exits; with
    ``reload_dir``, call ``on_change`` whenever a Python file under it changes."""
    if process is not None:
        def watch() -> None:
            process.wait()
            stop.set()

        threading.Thread(target=watch, daemon=True).start()
    if reload_dir is None:
        stop.wait()
        return
    import watchfiles

    for _changes in watchfiles.watch(reload_dir, watch_filter=watchfiles.PythonFilter(), stop_event=stop):
        on_change()


def _key_values(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid application argument '{pair}', must be of the form '<key>=<val>'.")
        out[key] = value
    return out


def _is_config_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def _specs_for(target: str, arguments: list[str], name: str, route_prefix: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """App specs for ``shoal run``/``deploy`` and the http_options a config file sets."""
    from shoal.serve import config_file
    from shoal.serve.schema import ServeApplicationSchema

    if _is_config_file(target):
        if arguments:
            raise ValueError("key=value arguments go in the config file's `args`, not on the command line.")
        schema = config_file.load(target)
        return config_file.build_specs(schema), schema.http_options.model_dump()
    app = ServeApplicationSchema(name=name, route_prefix=route_prefix, import_path=target, args=_key_values(arguments))
    return [config_file.app_spec(app, "application")], None


def _say_progress(text: str, elapsed_s: float) -> None:
    """A deploy's progress when stderr is not a terminal: a ``shoal: ...`` line per change (on a
    terminal it is one line rewritten in place; see ``shoal.serve._progress_writer``)."""
    print(f"shoal: {text}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from shoal.controller import launch, rundir

    app_dir = os.path.abspath(args.app_dir)
    sys.path.insert(0, app_dir)
    config_path = args.target if _is_config_file(args.target) else None
    http: dict[str, Any] = {}
    logging_config: dict[str, Any] | None = None  # the file's top level: the proxy starts with it
    file_grpc: dict[str, Any] | None = None
    if config_path is not None:
        import yaml

        from shoal.serve._instance_options import logging_config_dict

        raw = yaml.safe_load(Path(config_path).read_text()) or {}
        http = dict(raw.get("http_options") or {})
        file_grpc = raw.get("grpc_options") if isinstance(raw.get("grpc_options"), dict) else None
        try:
            logging_config = logging_config_dict(raw.get("logging_config"))
        except (ValueError, TypeError):
            pass  # the file's validation below says what is wrong, naming the key
        if raw.get("proxy_location") == "Disabled":  # no HTTP proxy, as in Ray
            http["host"] = None
    if args.host is not None or "host" not in http:
        http["host"] = args.host or "127.0.0.1"
    if args.port is not None or "port" not in http:
        http["port"] = args.port if args.port is not None else 8000
    if args.num_proxies is not None:
        http["num_proxies"] = args.num_proxies
    grpc = _grpc_options(args, file_grpc)
    # The foreground instance lives in your default run directory, so `shoal status`,
    # `shoal deploy` and scripts find it; it stops with this command. It starts while the
    # application is imported and built, in parallel.
    owned: list[Any] = []
    starting = None
    if launch.find_running() is None:
        starting = threading.Thread(
            target=lambda: owned.append(
                launch.start_supervisor(
                    rundir.instance_dir("default"), private=True, http_options=http, gpus=args.gpus,
                    logging_config=logging_config, grpc_options=grpc,
                )
            )
        )
        starting.start()
    try:
        from shoal.serve import api
        from shoal.serve.config import HTTPOptions

        HTTPOptions(**http)  # validated here too, with the user's own values
        specs, _ = _specs_for(args.target, args.arguments, args.name, args.route_prefix)
    except BaseException:
        if starting is not None:
            starting.join()
            for instance in owned:  # nothing to serve: stop the supervisor started for it
                instance.wait_stopped(timeout_s=30)
        raise
    finally:
        if starting is not None:
            starting.join()
    if starting is not None and not owned:
        raise RuntimeError("the shoal supervisor did not start; see the messages above")
    if starting is None and "num_proxies" in http:  # a running instance changes its number of proxies
        api.set_num_proxies(http["num_proxies"])
    try:
        api.deploy_specs(specs, declarative=True, wait=True, progress_lines=_say_progress)
    except KeyboardInterrupt:  # Ctrl-C while deploying: stop, as after serving
        print("shoal: interrupted while deploying; stopping", file=sys.stderr, flush=True)
        api.shutdown()
        if owned:
            owned[0].wait_stopped(timeout_s=60)
        return _INTERRUPTED
    names = ", ".join(f"'{s['name']}' at {s.get('route_prefix') or '(no route)'}" for s in specs)
    url = api.get_http_url()
    stop = _stop_on_signals()  # before the line that invites Ctrl-C: from now on it drains
    print(f"shoal: serving {names} on {url} (Ctrl-C stops)", flush=True)
    if owned and not args.reload:  # nothing left to do here but hold the lifeline: shed the memory
        _become_lifeline_holder(owned[0], stop)

    def redeploy() -> None:
        try:
            import importlib

            for module in list(sys.modules.values()):
                path = getattr(module, "__file__", None) or ""
                if path.startswith(app_dir) and module.__name__ != "__main__":
                    importlib.reload(module)
            fresh, _ = _specs_for(args.target, args.arguments, args.name, args.route_prefix)
            api.deploy_specs(fresh, declarative=True, wait=True, progress_lines=_say_progress)
            print("shoal: files changed; redeployed", flush=True)
        except Exception as exc:  # keep serving the old version
            print(f"shoal: redeploy failed, still serving the previous version: {exc}", file=sys.stderr, flush=True)

    _wait_for_signal(stop, Path(app_dir) if args.reload else None, redeploy, owned[0].process if owned else None)
    print("shoal: draining and stopping", flush=True)
    api.shutdown()
    if owned:
        owned[0].wait_stopped(timeout_s=60)
    return 0


_STOP_TIMEOUT_S = 60.0  # how long a stopping `shoal run` waits for its supervisor, then kills it


def _become_lifeline_holder(instance: Any, stop: threading.Event) -> NoReturn:
    """Replace this process (exec, same pid) with ``shoal.cli_wait``, which holds ``instance``'s
    lifeline and stops it on Ctrl-C or SIGTERM, without the application's modules in memory.

    The signals are blocked first (the mask survives the exec, so one sent meanwhile stays
    pending for the new program); the driver's threads are stopped, so none of them takes one;
    one that a handler already took (``stop``) makes the new program stop at once."""
    from shoal import cli_wait
    from shoal.runtime import client

    signal.pthread_sigmask(signal.SIG_BLOCK, cli_wait.WATCHED)
    client.close_driver()
    lifeline_fd = instance.lifeline_fd
    os.set_inheritable(lifeline_fd, True)
    argv = [sys.executable, "-I", "-S", cli_wait.__file__, str(instance.process.pid), str(lifeline_fd), str(_STOP_TIMEOUT_S)]
    if stop.is_set():
        argv.append("--stop-now")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _grpc_options(args: argparse.Namespace, from_file: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gRPCOptions (plain values) a config file's ``grpc_options`` and the ``--grpc-port`` /
    ``--grpc-servicer-functions`` flags ask for (the flags win); None without servicer functions.
    ValueError naming the option if they are not valid."""
    from shoal.serve.config import gRPCOptions

    values = dict(from_file or {})
    if args.grpc_port is not None:
        values["port"] = args.grpc_port
    if args.grpc_servicer_functions:
        values["grpc_servicer_functions"] = list(args.grpc_servicer_functions)
    options = gRPCOptions(**values)
    return options.model_dump(mode="json") if options.grpc_servicer_functions else None


def cmd_start(args: argparse.Namespace) -> int:
    from shoal.controller import applied, launch, rundir
    from shoal.serve.config import HTTPOptions

    running = launch.find_running()
    if running is not None:
        print(f"shoal is already running in {running.run_dir}")
        if args.num_proxies is not None:  # the one option a running instance changes
            from shoal.serve import api

            api.set_num_proxies(args.num_proxies)
            print(f"It runs {args.num_proxies} HTTP {'proxy' if args.num_proxies == 1 else 'proxies'} from now on.")
        return 0
    extra: dict[str, Any] = {} if args.num_proxies is None else {"num_proxies": args.num_proxies}
    options = HTTPOptions(
        host=args.http_host, port=args.http_port, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_keyfile_password=args.ssl_keyfile_password, ssl_ca_certs=args.ssl_ca_certs,
        metrics_port=args.metrics_port, **extra,
    ).model_dump()
    grpc = _grpc_options(args, None)
    run_dir = rundir.instance_dir("default")
    restoring = launch.crashed(run_dir) is not None and (run_dir / applied.APPLIED_FILE).exists()
    instance = launch.start_supervisor(run_dir, private=False, http_options=options, gpus=args.gpus, grpc_options=grpc)
    if restoring:
        print("The previous supervisor stopped without shutting down; the applications it ran are deployed again.")
    print(
        f"shoal started (supervisor pid {instance.pid}).\n"
        f"Scripts you run deploy to it with serve.run(); other processes can name it with "
        f"SHOAL_ADDRESS={instance.run_dir}\n"
        f"HTTP: {instance.http_url or 'off'}   gRPC: {instance.grpc_url or 'off'}   "
        f"metrics: {instance.metrics_url or 'off'}   stop it with: shoal shutdown"
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from shoal.serve import api

    sys.path.insert(0, os.path.abspath(args.app_dir))
    specs, _ = _specs_for(args.target, args.arguments, args.name, args.route_prefix)
    num_proxies = _num_proxies_set(args.target)
    if num_proxies is not None:  # the one http option a running instance changes
        api.set_num_proxies(num_proxies)
    try:
        api.deploy_specs(specs, declarative=True, wait=args.wait, progress_lines=_say_progress)
    except KeyboardInterrupt:
        print("shoal: interrupted; the instance goes on deploying (see `shoal status`)", file=sys.stderr)
        return _INTERRUPTED
    _warn_start_only_options(args.target)
    print("Sent deploy request successfully." + ("" if args.wait else " Watch it with `shoal status`."))
    return 0


def _num_proxies_set(target: str) -> int | None:
    """The config file's ``http_options.num_proxies`` if it sets it, else None."""
    from shoal.serve import config_file

    if not _is_config_file(target):
        return None
    http = config_file.load(target).http_options
    return http.num_proxies if "num_proxies" in http.model_fields_set else None


def _warn_start_only_options(target: str) -> None:
    """Ray's warning: a running instance keeps the HTTP (and proxy, gRPC, controller) options
    it was started with (but ``http_options.num_proxies``, which ``cmd_deploy`` applies)."""
    from shoal.serve import config_file

    keys = []
    if _is_config_file(target):
        schema = config_file.load(target)
        keys = config_file.start_only_options(schema)
        if "http_options" in keys and schema.http_options.model_fields_set == {"num_proxies"}:
            keys.remove("http_options")
    if keys:
        print(
            f"shoal: warning: the instance is already running, so the config's {', '.join(keys)} "
            "are not applied; they take effect when `shoal run` starts an instance.",
            file=sys.stderr,
        )


def _metrics_port(value: str) -> int | None:
    if value.lower() == "off":
        return None
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number or 'off'") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _add_grpc_flags(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: 9000; 0 picks one)" + default)
    parser.add_argument(
        "--grpc-servicer-functions", action="append", metavar="MODULE.FUNCTION",
        help="a generated add_<Service>Servicer_to_server function to serve over gRPC (repeat for more; "
             "none: no gRPC server)" + default,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from shoal.controller import launch, rundir
    from shoal.runtime.errors import ShoalConnectionError
    from shoal.serve import api

    if launch.find_running() is None:
        dead = launch.crashed(rundir.base_dir() / "default")
        if dead is not None:
            raise ShoalConnectionError(dead)
    status = api.status().to_dict()
    status["grpc_url"] = api.get_grpc_url()  # a shoal extension, as metrics_url: where gRPC is served
    if args.name:
        status["applications"] = {k: v for k, v in status["applications"].items() if k == args.name}
    if args.json:
        print(json.dumps(status, indent=2))
    elif args.yaml:
        import yaml

        print(yaml.safe_dump(status, sort_keys=False), end="")
    else:
        print(format_status(status, api.get_metrics_url()))
        if status["grpc_url"] and status["applications"]:
            print(f"gRPC: {status['grpc_url']}")
    return 0


def format_status(status: dict[str, Any], metrics_url: str | None = None) -> str:
    """A readable table of applications, deployments and replicas, and where metrics are served."""
    if not status["applications"]:
        return "No applications are running."
    lines = [
        f"proxy: {', '.join(f'{k} {v}' for k, v in status['proxies'].items()) or 'none'}",
        f"metrics: {metrics_url or 'off'}",
        "",
    ]
    processes = status.get("proxy_processes") or []
    if processes:  # each HTTP proxy process: pid and state (and restarts, if any)
        described = [
            f"pid {p['pid'] or '-'} {p['status']}" + (f" ({p['restarts']} restarts)" if p.get("restarts") else "")
            for p in processes
        ]
        lines[0] += f" ({len(processes)} {'process' if len(processes) == 1 else 'processes'}: {', '.join(described)})"
    if status.get("target_capacity") is not None:  # a config file's: every target is scaled
        lines.insert(1, f"target capacity: {status['target_capacity']:g}%")
    rows = [("APPLICATION", "STATUS", "DEPLOYMENT", "STATUS", "REPLICAS", "RESTARTS", "PIDS")]
    for app_name, app in sorted(status["applications"].items()):
        for dep_name, dep in sorted(app["deployments"].items()) or [("-", None)]:
            if dep is None:
                rows.append((app_name, app["status"], "-", "-", "-", "-", "-"))
                continue
            states = ", ".join(f"{n} {s}" for s, n in sorted(dep["replica_states"].items())) or "0"
            pids = " ".join(str(r["pid"]) for r in dep.get("replicas", []) if r.get("pid"))
            rows.append((app_name, app["status"], dep_name, dep["status"], states, str(dep.get("restarts", 0)), pids or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for app_name, app in sorted(status["applications"].items()):
        if app["message"]:
            lines += ["", f"{app_name}: {app['message']}"]
        for dep_name, dep in sorted(app["deployments"].items()):
            message = dep.get("message", "")
            if message and message not in app["message"]:
                lines += ["", f"{app_name}/{dep_name}: {message}"]
            if dep.get("last_error") and dep["last_error"] not in app["message"] and dep["last_error"] not in message:
                lines += ["", f"{app_name}/{dep_name} last error: {dep['last_error']}"]
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from shoal.serve import api

    configs = api.configs()
    if args.name:
        configs = {k: v for k, v in configs.items() if k == args.name}
    if not configs:
        print("No configuration was found.")
        return 0
    print("\n---\n\n".join(yaml.safe_dump(c, sort_keys=False) for _, c in sorted(configs.items())), end="")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import yaml

    from shoal.serve import config_file

    sys.path.insert(0, os.path.abspath(args.app_dir))
    text = yaml.safe_dump(config_file.build_config(args.import_paths), sort_keys=False)
    if args.output_path:
        Path(args.output_path).write_text(text)
        print(f"Wrote {args.output_path}")
    else:
        print(text, end="")
    return 0


_FOLLOW_INTERVAL_S = 0.25


def cmd_logs(args: argparse.Namespace) -> int:
    from shoal.controller import launch, logfiles, rundir
    from shoal.runtime.errors import ShoalConnectionError

    running = launch.find_running()
    if running is None:
        dead = launch.crashed(rundir.base_dir() / "default")
        raise ShoalConnectionError(dead or "No shoal instance is running; start one with `shoal start` or `shoal run`.")
    tail = logfiles.Tail(running.run_dir / rundir.LOGS, args.app, args.deployment, args.replica, proxy=args.proxy)
    stop = threading.Event()
    if args.follow:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while True:
            lines = tail.poll()
            if lines:
                print("\n".join(lines), flush=True)
            if not args.follow or stop.wait(_FOLLOW_INTERVAL_S):
                return 0
    except KeyboardInterrupt:  # Ctrl-C ends --follow
        return 0
    except BrokenPipeError:  # piped into `head`: stop quietly (and flush nothing at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    from shoal.serve import api

    if not args.yes and sys.stdin.isatty():
        answer = input("This stops the shoal instance and every application on it. Continue? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Not stopped.")
            return 1
    started = time.monotonic()
    api.shutdown()
    print(f"shoal stopped ({time.monotonic() - started:.1f}s).")
    return 0


_GPUS_HELP = (
    "the GPUs replicas may use: a count N (devices 0..N-1) or device ids (0,2); "
    "default: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists"
)


def _gpus(value: str) -> tuple[str, ...]:
    from shoal.controller.gpus import parse_gpus

    try:
        return parse_gpus(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_NUM_PROXIES_HELP = (
    "HTTP proxy processes sharing the port (default: 1 on fewer than 4 cores, else min(4, cores // 2)); "
    "on a running instance, changes their number"
)


def _num_proxies(value: str) -> int:
    from shoal.serve.config import check_num_proxies

    try:
        return check_num_proxies(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"num_proxies must be a whole number of at least 1, got {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Serve Python deployments on one machine (Ray Serve's API, without Ray).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def app_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", metavar="IMPORT_PATH|CONFIG.yaml", help="module:attribute of an Application or builder, or a config file")
        p.add_argument("arguments", nargs="*", metavar="key=value", help="arguments for a builder function")
        p.add_argument("--name", default="default", help="application name, import-path mode (default: default)")
        p.add_argument("--route-prefix", default="/", help="HTTP route prefix, import-path mode (default: /)")
        p.add_argument("--app-dir", "-d", default=".", help="directory prepended to sys.path (default: .)")

    run = sub.add_parser("run", help="serve in the foreground until Ctrl-C (which drains and exits 0)")
    app_args(run)
    run.add_argument("--host", help="HTTP host (default: 127.0.0.1, or the config file's)")
    run.add_argument("--port", type=int, help="HTTP port (default: 8000, or the config file's; 0 picks one)")
    run.add_argument("--reload", "-r", action="store_true", help="redeploy when Python files under --app-dir change")
    run.add_argument("--gpus", type=_gpus, help=_GPUS_HELP)
    run.add_argument("--num-proxies", type=_num_proxies, help=_NUM_PROXIES_HELP + " (default: the config file's)")
    _add_grpc_flags(run, " (default: the config file's grpc_options)")
    run.set_defaults(func=cmd_run)

    start = sub.add_parser("start", help="start your default instance, detached")
    start.add_argument("--http-host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    start.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: 8000)")
    start.add_argument(
        "--metrics-port", type=_metrics_port, default=8080,
        help="serve Prometheus metrics on this port (default: 8080; 0 picks a free one; 'off' serves none)",
    )
    start.add_argument("--gpus", type=_gpus, help=_GPUS_HELP)
    start.add_argument("--num-proxies", type=_num_proxies, help=_NUM_PROXIES_HELP)
    _add_grpc_flags(start, "")
    start.add_argument("--ssl-keyfile", help="serve HTTPS: the private key file (with --ssl-certfile)")
    start.add_argument("--ssl-certfile", help="serve HTTPS: the certificate (chain) file (with --ssl-keyfile)")
    start.add_argument("--ssl-keyfile-password", help="the password of an encrypted --ssl-keyfile")
    start.add_argument("--ssl-ca-certs", help="require client certificates signed by these CAs")
    start.set_defaults(func=cmd_start)

    deploy = sub.add_parser("deploy", help="deploy a config file to the running instance; apps not in it are deleted")
    app_args(deploy)
    deploy.add_argument("--wait", action="store_true", help="return once every application is RUNNING, showing what it waits on")
    deploy.set_defaults(func=cmd_deploy)

    status = sub.add_parser("status", help="applications, deployments and replicas of the running instance")
    status.add_argument("--name", "-n", help="only this application")
    fmt = status.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--yaml", action="store_true", help="print YAML")
    status.set_defaults(func=cmd_status)

    config = sub.add_parser("config", help="print each application's last deployed config")
    config.add_argument("--name", "-n", help="only this application")
    config.set_defaults(func=cmd_config)

    build = sub.add_parser("build", help="write a config file for one or more import paths")
    build.add_argument("import_paths", nargs="+", metavar="IMPORT_PATH")
    build.add_argument("--app-dir", "-d", default=".", help="directory prepended to sys.path (default: .)")
    build.add_argument("--output-path", "-o", help="file to write (default: stdout)")
    build.set_defaults(func=cmd_build)

    logs = sub.add_parser("logs", help="the instance's log lines (replicas, proxy, supervisor) merged in time order")
    logs.add_argument("--app", "-a", help="only this application's replicas")
    logs.add_argument("--deployment", help="only this deployment's replicas")
    logs.add_argument("--replica", help="only this replica (its id, or the part after the last '#')")
    logs.add_argument("--proxy", action="store_true", help="only the HTTP proxy's lines (its access lines included)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.set_defaults(func=cmd_logs)

    shutdown = sub.add_parser("shutdown", help="stop the running instance and its applications")
    shutdown.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    shutdown.set_defaults(func=cmd_shutdown)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from shoal.runtime.errors import RayServeException

    try:
        return int(args.func(args))
    except (RayServeException, ImportError, TypeError, ValueError, RuntimeError, OSError) as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

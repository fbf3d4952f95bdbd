"""The ``shoal`` command: run, start, status, shutdown.

``shoal run IMPORT_PATH`` serves an application in the foreground until Ctrl-C, which drains and
exits 0. ``shoal start`` starts this user's default instance, detached; ``serve.run`` in any
script of this user then deploys to it. (Config files, ``deploy``, ``build`` and ``--reload``
come with the controller work.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from typing import Any


def import_attr(import_path: str) -> Any:
    """``module.sub:attr`` or ``module.sub.attr``; ImportError naming what was not found."""
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    else:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(
            f"'{import_path}' is not an import path; use 'module:attribute', e.g. 'app:app'."
        )
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module '{module_name}' has no attribute '{attr}'") from None


def build_application(import_path: str, args: dict[str, str]) -> Any:
    """The Application at ``import_path``, calling it with ``args`` if it is a builder."""
    from shoal.serve.deployment import Application

    target = import_attr(import_path)
    if isinstance(target, Application):
        if args:
            raise ValueError(
                "Arguments can only be passed to an application builder function, not an "
                "already built application."
            )
        return target
    if callable(target):
        app = target(args)
        if not isinstance(app, Application):
            raise TypeError(f"the builder '{import_path}' returned {type(app).__name__}, not an Application")
        return app
    raise TypeError(f"'{import_path}' is neither an Application nor a builder function")


def _wait_for_signal() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def _parse_args_kv(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"shoal: Invalid application argument '{pair}', must be of the form '<key>=<val>'.")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal", description="Serve Python deployments on one machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve an application in the foreground until Ctrl-C")
    run.add_argument("import_path", help="module:attribute of an Application or a builder function")
    run.add_argument("arguments", nargs="*", help="key=value arguments for a builder function")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default="/", help="HTTP route prefix (default: /)")
    run.add_argument("--app-dir", "-d", default=".", help="directory prepended to sys.path (default: .)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000; 0 picks one)")

    start = sub.add_parser("start", help="start this user's default instance, detached")
    start.add_argument("--http-host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    start.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: 8000)")

    sub.add_parser("status", help="print the running instance's status as JSON")
    sub.add_parser("shutdown", help="stop the running instance")
    args = parser.parse_args(argv)

    from shoal.controller import launch, rundir
    from shoal.runtime.errors import RayServeException
    from shoal.serve import api

    try:
        if args.command == "run":
            sys.path.insert(0, os.path.abspath(args.app_dir))
            app = build_application(args.import_path, _parse_args_kv(args.arguments))
            api.start(http_options={"host": args.host, "port": args.port})
            api.run(app, name=args.name, route_prefix=args.route_prefix)
            print(f"shoal: serving '{args.import_path}' at {api.get_http_url()}{args.route_prefix} (Ctrl-C stops)", flush=True)
            _wait_for_signal()
            print("shoal: draining and stopping", flush=True)
            api.shutdown()
            return 0
        if args.command == "start":
            running = launch.find_running()
            if running is not None:
                print(f"shoal is already running: SHOAL_ADDRESS={running.run_dir}")
                return 0
            options = {"host": args.http_host, "port": args.http_port}
            from shoal.serve.config import HTTPOptions

            instance = launch.start_supervisor(
                rundir.instance_dir("default"), private=False, http_options=HTTPOptions(**options).model_dump()
            )
            print(f"shoal started. Scripts of this user deploy to it; elsewhere set SHOAL_ADDRESS={instance.run_dir}")
            return 0
        if args.command == "status":
            print(json.dumps(api.status().to_dict(), indent=2))
            return 0
        api.shutdown()
        return 0
    except (RayServeException, ImportError, TypeError, ValueError, RuntimeError) as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

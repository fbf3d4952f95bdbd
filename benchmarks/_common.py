"""What every benchmark orchestrator shares: finding Ray's interpreter, free ports, and running
one framework in a child process that prints its report as a JSON line.

The scripts import it as ``_common`` with their own directory at the end of ``sys.path`` (after
the standard library, which ``benchmarks/http.py`` would otherwise shadow).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_RAY_PYTHON = "/work/ray-venv/bin/python"
HOST = "127.0.0.1"


def ray_python(args: argparse.Namespace) -> str | None:
    """The interpreter with ``ray[serve]``: ``--ray-python``, else ``$SHOAL_BENCH_RAY_PYTHON``,
    else ``DEFAULT_RAY_PYTHON`` if it exists; None with ``--no-ray`` or when there is none."""
    if getattr(args, "no_ray", False):
        return None
    path = args.ray_python or os.environ.get("SHOAL_BENCH_RAY_PYTHON")
    if path:
        return str(path)
    return DEFAULT_RAY_PYTHON if os.path.exists(DEFAULT_RAY_PYTHON) else None


def free_port() -> int:
    """A TCP port free on ``HOST`` now (for servers that cannot bind port 0, like Ray's proxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_json_child(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``cmd`` in its own process group (without ``RAY_ADDRESS``, so Ray starts its own
    instance) and return the last JSON line it printed, or ``{"error": ...}`` saying why not."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    tail = "\n    ".join(err.strip().splitlines()[-8:])
    return {"error": f"exit {proc.returncode}, no JSON line; stderr tail:\n    {tail}"}


def import_serve(framework: str) -> Any:
    """Return the ``serve`` module of the framework; the only place they differ."""
    if framework == "ray":
        from ray import serve
    else:
        from shoal import serve
    return serve


def framework_version(framework: str) -> str:
    if framework == "ray":
        import ray

        return str(ray.__version__)
    from importlib import metadata

    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return "unknown"


Report = dict[str, Any]


def run_each_framework(
    args: argparse.Namespace,
    run_child: Callable[[str, str, argparse.Namespace], Report],
    median_report: Callable[[list[Report]], Report | None],
) -> tuple[dict[str, Report | None], bool]:
    """Run shoal (this interpreter) and Ray (if ``ray_python`` finds it) ``args.runs`` times
    each, every run in a fresh process (``run_child``); return the median report per framework
    and whether any run failed."""
    pythons = {"shoal": sys.executable}
    ray_py = ray_python(args)
    if ray_py:
        pythons["ray"] = ray_py
    else:
        print("no Ray interpreter (--ray-python, $SHOAL_BENCH_RAY_PYTHON); shoal only")
    results: dict[str, Report | None] = {}
    failed = False
    for framework, python in pythons.items():
        runs = []
        for k in range(args.runs):
            print(f"{framework} run {k + 1}/{args.runs} ({python}) ...", flush=True)
            report = run_child(python, framework, args)
            if "error" in report:
                failed = True
                print(f"  failed: {report['error']}")
            runs.append(report)
        results[framework] = median_report(runs)
    return results, failed

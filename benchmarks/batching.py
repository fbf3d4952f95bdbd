"""``@serve.batch`` under load: mean batch size reached and throughput, shoal against Ray Serve.

What it measures, for a one-replica deployment whose ``@serve.batch(max_batch_size=32)`` async
method costs 2 ms plus 0.05 ms per item (``asyncio.sleep``, as a GPU call would: the loop stays
free) and records the size of every batch it runs:

* handles: ``--callers`` (256) concurrent callers in the driver, each awaiting
  ``handle.remote(i)`` back to back for ``--duration-s``;
* http: ``--callers`` keep-alive HTTP/1.1 connections (a small asyncio client: wrk cannot keep
  a fixed number of requests in flight per connection the way 256 callers do), each sending
  ``GET /batch?x=i`` back to back for ``--duration-s``.

For each it reports calls per second, p50/p99 latency, and the mean size of the batches run
during the measured window (after a ``--warmup-s`` warm-up). The deployment's
``max_ongoing_requests`` is ``--max-ongoing-requests`` (256 by default, so every caller's request
can reach the replica; with Ray's default of 5 no batch could exceed 5). It prints figures and
never asserts a threshold. The issue's target: batches fill to at least 80% of
``max_batch_size`` (25.6) under this load, and throughput at least 3 times Ray Serve 2.60's.

Run it:

    python benchmarks/batching.py                        # shoal, and ray if found
    python benchmarks/batching.py --runs 1 --duration-s 5 --no-ray
    python benchmarks/batching.py --framework shoal --json   # one framework, one run
    /work/ray-venv/bin/python benchmarks/batching.py --framework ray --json

Without ``--framework`` the script is an orchestrator: it runs each framework ``--runs`` times,
each in a fresh process (shoal with this interpreter, which needs shoal installed; Ray with
``--ray-python``, ``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``), then prints the
median of the runs in a table. Both frameworks run the same code: only the ``serve`` import
differs. Servers listen on free ports (shoal: port 0; Ray's proxy has no port 0, so a free port
is picked first).
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import time
from typing import Any

from _common import (
    DEFAULT_RAY_PYTHON,
    HOST,
    framework_version,
    free_port,
    import_serve,
    run_each_framework,
    run_json_child,
)

MAX_BATCH_SIZE = 32
BATCH_BASE_S = 0.002
BATCH_PER_ITEM_S = 0.00005
PHASES = ("handles", "http")
CHILD_OPTIONS = ("callers", "duration_s", "warmup_s", "max_ongoing_requests", "batch_wait_timeout_s")
# (key in a phase's result, label, True when higher is better)
METRICS = (
    ("calls_per_s", "throughput (calls/s)", True),
    ("mean_batch_size", "mean batch size", True),
    ("p50_ms", "p50 latency (ms)", False),
    ("p99_ms", "p99 latency (ms)", False),
)


# ---------------------------------------------------------------- one framework


def build_app(serve: Any, args: argparse.Namespace) -> Any:
    @serve.deployment(max_ongoing_requests=args.max_ongoing_requests)
    class Model:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=args.batch_wait_timeout_s)
        async def infer(self, items: list[Any]) -> list[Any]:
            self.sizes.append(len(items))
            await asyncio.sleep(BATCH_BASE_S + BATCH_PER_ITEM_S * len(items))
            return items

        async def __call__(self, arg: Any) -> Any:
            if hasattr(arg, "query_params"):  # an HTTP request
                return await self.infer(arg.query_params.get("x", ""))
            return await self.infer(arg)

        def take_sizes(self) -> list[int]:
            """The sizes of the batches run since the last call."""
            sizes, self.sizes = self.sizes, []
            return sizes

    return Model.bind()


def summarize(latencies_ns: list[int], duration_s: float, sizes: list[int], errors: int) -> dict[str, Any]:
    cuts = statistics.quantiles(latencies_ns, n=100, method="inclusive") if len(latencies_ns) > 1 else None
    return {
        "calls_per_s": len(latencies_ns) / duration_s,
        "mean_batch_size": statistics.fmean(sizes) if sizes else 0.0,
        "batches": len(sizes),
        "p50_ms": cuts[49] / 1e6 if cuts else None,
        "p99_ms": cuts[98] / 1e6 if cuts else None,
        "calls": len(latencies_ns),
        "errors": errors,
    }


async def _handle_caller(handle: Any, latencies_ns: list[int], stats: dict[str, int], stop_at: float) -> None:
    i = 0
    while time.perf_counter() < stop_at:
        start = time.perf_counter_ns()
        try:
            result = await handle.remote(i)
        except Exception:
            stats["errors"] += 1
            continue
        if result != i:
            raise RuntimeError(f"call {i} returned {result!r}")
        latencies_ns.append(time.perf_counter_ns() - start)
        i += 1


async def _http_caller(port: int, latencies_ns: list[int], stats: dict[str, int], stop_at: float) -> None:
    """One keep-alive connection sending GETs back to back until ``stop_at``."""
    reader, writer = await asyncio.open_connection(HOST, port)
    i = 0
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter_ns()
            writer.write(f"GET /batch?x={i} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    key, value = line.split(":", 1)
                    headers[key.strip().lower()] = value.strip().lower()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:  # chunked
                chunks = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunks.append((await reader.readexactly(size + 2))[:-2])
                    if size == 0:
                        break
                body = b"".join(chunks)
            if status != 200 or body != str(i).encode():
                stats["errors"] += 1
            else:
                latencies_ns.append(time.perf_counter_ns() - start)
            i += 1
    finally:
        writer.close()


async def load(phase: str, target: Any, serve_handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Drive ``target`` (a handle, or the HTTP port) with ``args.callers`` concurrent callers:
    a warm-up, then the measured window; returns its figures."""
    results = {}
    for window, duration_s in (("warmup", args.warmup_s), ("measure", args.duration_s)):
        latencies_ns: list[int] = []
        stats = {"errors": 0}
        await serve_handle.take_sizes.remote()
        stop_at = time.perf_counter() + duration_s
        if phase == "handles":
            callers = [_handle_caller(target, latencies_ns, stats, stop_at) for _ in range(args.callers)]
        else:
            callers = [_http_caller(target, latencies_ns, stats, stop_at) for _ in range(args.callers)]
        started = time.perf_counter()
        await asyncio.gather(*callers)
        elapsed_s = time.perf_counter() - started
        sizes = await serve_handle.take_sizes.remote()
        results[window] = summarize(latencies_ns, elapsed_s, sizes, stats["errors"])
    return results["measure"]


def run_framework(args: argparse.Namespace) -> dict[str, Any]:
    serve = import_serve(args.framework)
    report: dict[str, Any] = {
        "framework": args.framework,
        "version": framework_version(args.framework),
        "python": platform.python_version(),
        "phases": {},
    }
    if args.framework == "ray":
        port = free_port()
        http_options: dict[str, Any] = {"host": HOST, "port": port}
    else:
        http_options = {"host": HOST, "port": 0}
    try:
        serve.start(http_options=http_options)
        handle = serve.run(build_app(serve, args), name="batching", route_prefix="/batch")
        if args.framework != "ray":
            port = int(serve.get_http_url().rstrip("/").rsplit(":", 1)[1])
        for phase in args.phases:
            target = handle if phase == "handles" else port
            report["phases"][phase] = asyncio.run(load(phase, target, handle, args))
    finally:
        serve.shutdown()
        if args.framework == "ray":
            import ray

            ray.shutdown()
    return report


# ----------------------------------------------------------------- orchestrator


def run_child(python: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one framework once in a fresh process; return its report or an error."""
    cmd = [python, os.path.abspath(__file__), "--framework", framework, "--json", "--phases", ",".join(args.phases)]
    for name in CHILD_OPTIONS:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return run_json_child(cmd, args.timeout_s)


def median_report(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r for r in runs if "error" not in r]
    if not good:
        return None
    return {
        "version": good[0]["version"],
        "python": good[0]["python"],
        "runs": len(good),
        "phases": {
            phase: {
                key: statistics.median(r["phases"][phase][key] for r in good if r["phases"][phase][key] is not None)
                for key, _, _ in METRICS
            }
            | {"errors": sum(r["phases"][phase]["errors"] for r in good)}
            for phase in good[0]["phases"]
        },
    }


def print_table(results: dict[str, dict[str, Any] | None], args: argparse.Namespace) -> None:
    shoal, ray = results.get("shoal"), results.get("ray")
    print()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"nproc     {len(os.sched_getaffinity(0))}   loadavg {os.getloadavg()[0]:.2f}")
    for name, rep in results.items():
        if rep is not None:
            print(f"{name:<9} {rep['version']} on Python {rep['python']}, median of {rep['runs']} run(s)")
    print(
        f"scenario  1 replica, @serve.batch(max_batch_size={MAX_BATCH_SIZE}, "
        f"batch_wait_timeout_s={args.batch_wait_timeout_s:g}), batch cost 2 ms + 0.05 ms/item, "
        f"max_ongoing_requests={args.max_ongoing_requests}, {args.callers} concurrent callers, "
        f"{args.duration_s:g} s after {args.warmup_s:g} s warm-up"
    )
    print()
    print(f"{'metric':<36}{'shoal':>12}{'ray':>12}{'shoal/ray':>12}")
    for phase in args.phases:
        for key, label, higher_is_better in METRICS:
            a = shoal["phases"][phase][key] if shoal else None
            b = ray["phases"][phase][key] if ray else None
            ratio = "-"
            if a and b:
                ratio = f"{(a / b if higher_is_better else b / a):.2f}x"
            cells = [f"{v:,.1f}" if v is not None else "-" for v in (a, b)]
            print(f"{phase + ' ' + label:<36}{cells[0]:>12}{cells[1]:>12}{ratio:>12}")
    for name, rep in results.items():
        if rep is not None:
            for phase, figures in rep["phases"].items():
                if figures["errors"]:
                    print(f"{name} {phase}: {figures['errors']} failed call(s)")
    print(
        f"target (issue): mean batch size >= {0.8 * MAX_BATCH_SIZE:g} (80% of max_batch_size), "
        "throughput >= 3x Ray Serve 2.60's"
    )


def orchestrate(args: argparse.Namespace) -> int:
    results, failed = run_each_framework(args, run_child, median_report)
    print_table(results, args)
    return 1 if failed else 0


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--framework", choices=("shoal", "ray"), help="run this one framework in-process (default: compare both)")
    add("--json", action="store_true", help="one JSON line, not indented")
    add("--phases", default="handles,http", help="comma list: handles,http")
    add("--callers", type=int, default=256, help="concurrent callers")
    add("--duration-s", type=float, default=10.0, help="measured window per phase")
    add("--warmup-s", type=float, default=2.0, help="warm-up per phase")
    add("--max-ongoing-requests", type=int, default=256, help="deployment option")
    add("--batch-wait-timeout-s", type=float, default=0.01, help="@serve.batch option")
    add("--runs", type=int, default=1, help="processes per framework")
    add("--ray-python", help=f"interpreter with ray[serve] (default: $SHOAL_BENCH_RAY_PYTHON, else {DEFAULT_RAY_PYTHON} if present)")
    add("--no-ray", action="store_true", help="measure shoal only")
    add("--timeout-s", type=float, default=600.0, help="limit per child process")
    # fmt: on
    args = p.parse_args(argv)
    args.phases = [v for v in args.phases.split(",") if v]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.framework is None:
        return orchestrate(args)
    report = run_framework(args)
    print(json.dumps(report, indent=None if args.json else 2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

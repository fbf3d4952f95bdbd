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
never asserts a threshold. Issue 11 sets no target here; the batching issue's: batches fill to
at least 80% of ``max_batch_size`` (25.6) under this load, and throughput at least 3 times Ray
Serve 2.60's.

Run it:

    python benchmarks/batching.py                        # shoal, and ray if found
    python benchmarks/batching.py --runs 1 --duration-s 5 --no-ray
    python benchmarks/batching.py --markdown             # the table as Markdown
    python benchmarks/batching.py --framework shoal --json   # one framework, one run
    /work/ray-venv/bin/python benchmarks/batching.py --framework ray --json

Without ``--framework`` the script is an orchestrator: it runs each framework ``--runs`` times,
each in a fresh process (shoal with this interpreter, which needs shoal installed; Ray with
``--ray-python``, ``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``, and says so when
it skips Ray), interleaved, then prints the machine, the versions and the median and spread
(min-max) of the runs (``--runs``, default 3) in one table. Both frameworks run the same code: only the ``serve`` import
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
import platform
import statistics
import time
from typing import Any

from _common import (
    HOST,
    Figures,
    Report,
    add_framework_options,
    cell,
    check_runs,
    child_command,
    child_or_orchestrate,
    comma_list,
    framework_version,
    free_port,
    import_serve,
    ratio,
    run_each,
    run_json_child,
    shoal_and_ray,
    spreads,
)

MAX_BATCH_SIZE = 32
BATCH_BASE_S = 0.002
BATCH_PER_ITEM_S = 0.00005
PHASES = ("handles", "http")
CHILD_OPTIONS = ("callers", "duration_s", "warmup_s", "max_ongoing_requests", "batch_wait_timeout_s")
# (key in a phase's result, label, cell format)
METRICS = (
    ("calls_per_s", "throughput (calls/s)", "{:,.0f}"),
    ("mean_batch_size", "mean batch size", "{:.1f}"),
    ("p50_ms", "p50 latency (ms)", "{:,.1f}"),
    ("p99_ms", "p99 latency (ms)", "{:,.1f}"),
)
# The batching issue's targets (issue 11 sets none for batching); printed, never asserted.
TARGET_HEADER = "target (batching issue; issue 11 sets none)"
GOALS = {"calls_per_s": ">= 3x Ray (shoal / ray)", "mean_batch_size": f">= {0.8 * MAX_BATCH_SIZE:g}"}


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


def fill_table(report: Report, results: dict[str, list[Figures]], args: argparse.Namespace) -> None:
    names = list(results)
    med = {n: {ph: spreads([r["phases"][ph] for r in runs]) for ph in args.phases} for n, runs in results.items()}
    report.columns = ["metric", *names, *(f"shoal / {n}" for n in names[1:]), TARGET_HEADER]
    for phase in args.phases:
        for key, label, fmt in METRICS:
            figures = {n: med[n][phase].get(key) for n in names}
            report.add_row(
                f"{phase} {label}",
                *(cell(figures[n], fmt) for n in names),
                *(ratio(figures["shoal"], figures[n]) for n in names[1:]),
                GOALS.get(key, ""),
            )
    for name, runs in results.items():
        for phase in args.phases:
            errors = sum(r["phases"][phase]["errors"] for r in runs)
            if errors:
                report.notes.append(f"{name} {phase}: {errors} failed call(s) over {len(runs)} run(s)")


def orchestrate(args: argparse.Namespace) -> int:
    report = Report("@serve.batch under concurrent callers", __file__, runs=args.runs)
    pythons = shoal_and_ray(args, report)

    def run_child(python: str, framework: str) -> Figures:
        cmd = child_command(__file__, python, framework, args, ("phases", *CHILD_OPTIONS))
        return run_json_child(cmd, args.timeout_s)

    results, failures = run_each(pythons, args.runs, run_child)
    report.scenario = (
        f"1 replica, @serve.batch(max_batch_size={MAX_BATCH_SIZE}, "
        f"batch_wait_timeout_s={args.batch_wait_timeout_s:g}), batch cost 2 ms + 0.05 ms/item, "
        f"max_ongoing_requests={args.max_ongoing_requests}, {args.callers} concurrent callers, "
        f"{args.duration_s:g} s after {args.warmup_s:g} s warm-up"
    )
    fill_table(report, results, args)
    return report.finish(args.markdown, failures)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--phases", default="handles,http", help="comma list: handles,http")
    add("--callers", type=int, default=256, help="concurrent callers")
    add("--duration-s", type=float, default=10.0, help="measured window per phase")
    add("--warmup-s", type=float, default=2.0, help="warm-up per phase")
    add("--max-ongoing-requests", type=int, default=256, help="deployment option")
    add("--batch-wait-timeout-s", type=float, default=0.01, help="@serve.batch option")
    # fmt: on
    add_framework_options(p, ("shoal", "ray"), timeout_s=600.0)
    args = p.parse_args(argv)
    args.phases = comma_list(p, args.phases, PHASES, "phases")
    check_runs(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    return child_or_orchestrate(parse_args(argv), run_framework, orchestrate)


if __name__ == "__main__":
    sys.exit(main())

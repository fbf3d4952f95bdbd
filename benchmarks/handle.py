"""Handle round-trip latency and fan-out throughput, shoal against Ray Serve.

What it measures, for a one-replica deployment whose ``__call__`` returns its
argument (a ``def`` variant and an ``async def`` variant, deployed one at a time):

* latency: after a warm-up, N sequential ``handle.remote(x).result()`` round
  trips from the driver; reports p50, p99 and mean in microseconds;
* fan-out: ``rs = [h.remote(i) for i in range(F)]`` then
  ``[r.result() for r in rs]``; reports calls per second, the median of
  ``--repeats`` rounds. A round still collecting after ``--fanout-deadline-s``
  stops there and counts what it collected (Ray at its default
  ``max_ongoing_requests=5`` backs off and manages only tens of calls/s).

It prints figures and never asserts a threshold. The issue's reference on a
2-core machine: Ray Serve 2.60 p50 2.8 ms, 360 calls/s fanned out; shoal's
target p50 <= 400 us, >= 10,000 calls/s fanned out.

Run it:

    python benchmarks/handle.py                      # compare: shoal, and ray if found
    python benchmarks/handle.py --runs 1 --max-ongoing-requests 100
    python benchmarks/handle.py --framework shoal --json     # one framework, one run
    /work/ray-venv/bin/python benchmarks/handle.py --framework ray --json

Without ``--framework`` the script is an orchestrator: it runs each framework
``--runs`` times, each in a fresh process (shoal with this interpreter, which
needs shoal installed, e.g. ``pip install -e .``; Ray with ``--ray-python``,
``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``), then prints the
median of the runs in a table. Both frameworks run the same code: only the
``serve`` import differs.
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from _common import DEFAULT_RAY_PYTHON, framework_version, import_serve, run_each_framework, run_json_child

VARIANTS = ("sync", "async")
# Options the orchestrator passes on to each child process.
CHILD_OPTIONS = (
    "calls", "warmup", "fanout", "repeats", "fanout_deadline_s",
    "variants", "max_ongoing_requests",
)  # fmt: skip
# (key in a variant's result, label, True when higher is better)
METRICS = (
    ("p50_us", "p50 (us)", False),
    ("p99_us", "p99 (us)", False),
    ("mean_us", "mean (us)", False),
    ("fanout_calls_per_s", "fan-out (calls/s)", True),
)


# ---------------------------------------------------------------- one framework


def build_deployments(serve: Any, max_ongoing_requests: int | None) -> dict[str, Any]:
    @serve.deployment
    class Echo:
        def __call__(self, x: Any) -> Any:
            return x

    @serve.deployment
    class AsyncEcho:
        async def __call__(self, x: Any) -> Any:
            return x

    options = {}
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    return {"sync": Echo.options(**options), "async": AsyncEcho.options(**options)}


def fan_out(handle: Any, n: int, deadline_s: float) -> tuple[float, bool]:
    """Send n calls, then collect them in order; return (calls/s, completed).

    Past deadline_s the rate counts the calls collected so far and the rest
    are cancelled, so a slow framework cannot hold a run for many minutes.
    """
    start = time.perf_counter()
    responses = [handle.remote(i) for i in range(n)]
    for i, response in enumerate(responses):
        remaining_s = deadline_s - (time.perf_counter() - start)
        try:
            result = response.result(timeout_s=max(remaining_s, 0.001))
        except TimeoutError:
            for rest in responses[i:]:
                rest.cancel()
            return i / (time.perf_counter() - start), False
        if result != i:
            raise RuntimeError(f"fan-out call {i} returned {result!r}")
    return n / (time.perf_counter() - start), True


def measure(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    for i in range(args.warmup):
        handle.remote(i).result()

    latencies_ns = []
    for i in range(args.calls):
        start = time.perf_counter_ns()
        result = handle.remote(i).result()
        latencies_ns.append(time.perf_counter_ns() - start)
        if result != i:
            raise RuntimeError(f"echo returned {result!r} for {i!r}")
    cuts = statistics.quantiles(latencies_ns, n=100, method="inclusive")

    rates = []
    truncated = False
    for _ in range(args.repeats):
        rate, complete = fan_out(handle, args.fanout, args.fanout_deadline_s)
        rates.append(rate)
        if not complete:
            truncated = True
            break

    return {
        "p50_us": cuts[49] / 1e3,
        "p99_us": cuts[98] / 1e3,
        "mean_us": statistics.fmean(latencies_ns) / 1e3,
        "fanout_calls_per_s": statistics.median(rates),
        "fanout_rounds": [round(r, 1) for r in rates],
        "fanout_truncated": truncated,
    }


def run_framework(args: argparse.Namespace) -> dict[str, Any]:
    serve = import_serve(args.framework)
    report: dict[str, Any] = {
        "framework": args.framework,
        "version": framework_version(args.framework),
        "python": platform.python_version(),
        "max_ongoing_requests": args.max_ongoing_requests,
        "variants": {},
    }
    deployments = build_deployments(serve, args.max_ongoing_requests)
    try:
        for variant in args.variants:
            start = time.perf_counter()
            handle = serve.run(
                deployments[variant].bind(), name=variant, route_prefix=f"/{variant}"
            )
            deploy_s = time.perf_counter() - start
            report["variants"][variant] = measure(handle, args) | {"deploy_s": deploy_s}
            serve.delete(variant)
    finally:
        serve.shutdown()
        if args.framework == "ray":
            import ray

            ray.shutdown()
    return report


# ----------------------------------------------------------------- orchestrator


def run_child(python: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one framework once in a fresh process; return its report or an error."""
    cmd = [python, os.path.abspath(__file__), "--framework", framework, "--json"]
    for name in CHILD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            value = ",".join(value) if name == "variants" else value
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return run_json_child(cmd, args.timeout_s)


def median_report(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Median of each metric across the successful runs of one framework."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return None
    merged = {k: good[0][k] for k in ("version", "python", "max_ongoing_requests")}
    merged["runs"] = len(good)
    merged["variants"] = {
        variant: {
            key: statistics.median(r["variants"][variant][key] for r in good)
            for key, _, _ in METRICS
        }
        | {"truncated": any(r["variants"][variant]["fanout_truncated"] for r in good)}
        for variant in good[0]["variants"]
    }
    return merged


def print_table(
    results: dict[str, dict[str, Any] | None], args: argparse.Namespace
) -> None:
    shoal, ray = results.get("shoal"), results.get("ray")
    print()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"nproc     {len(os.sched_getaffinity(0))}   loadavg {os.getloadavg()[0]:.2f}"
    )
    for name, rep in results.items():
        if rep is not None:
            print(
                f"{name:<9} {rep['version']} on Python {rep['python']}, "
                f"median of {rep['runs']} run(s)"
            )
    limit = args.max_ongoing_requests or "framework default"
    print(
        f"scenario  1 replica, max_ongoing_requests={limit}, {args.calls} sequential "
        f"calls, fan-out {args.fanout} x {args.repeats} rounds"
    )
    print()
    print(f"{'metric':<26}{'shoal':>12}{'ray':>12}{'shoal faster by':>18}")
    for variant in args.variants:
        for key, label, higher_is_better in METRICS:
            a = shoal["variants"][variant][key] if shoal else None
            b = ray["variants"][variant][key] if ray else None
            ratio = "-"
            if a and b:
                ratio = f"{(a / b if higher_is_better else b / a):.1f}x"
            cells = [f"{v:,.0f}" if v is not None else "-" for v in (a, b)]
            if higher_is_better:  # mark a fan-out cut short by the deadline
                for i, rep in enumerate((shoal, ray)):
                    if rep and rep["variants"][variant]["truncated"]:
                        cells[i] += "*"
            print(f"{variant + ' ' + label:<26}{cells[0]:>12}{cells[1]:>12}{ratio:>18}")
    reports = [rep for rep in (shoal, ray) if rep]
    if any(v["truncated"] for rep in reports for v in rep["variants"].values()):
        print(
            f"* a fan-out round hit --fanout-deadline-s={args.fanout_deadline_s:g}: "
            "rate over the calls collected by then"
        )
    print(
        "reference (issue): Ray 2.60 p50 2.8 ms, 360 calls/s fanned out; "
        "shoal target p50 <= 400 us, >= 10,000 calls/s"
    )


def orchestrate(args: argparse.Namespace) -> int:
    results, failed = run_each_framework(args, run_child, median_report)
    print_table(results, args)
    return 1 if failed else 0


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--framework", choices=("shoal", "ray"),
        help="run this one framework in-process (default: compare both)")
    add("--json", action="store_true", help="one JSON line, not indented")
    add("--calls", type=int, default=2000, help="sequential round trips")
    add("--warmup", type=int, default=500, help="warm-up round trips")
    add("--fanout", type=int, default=5000, help="calls per fan-out round")
    add("--repeats", type=int, default=5, help="fan-out rounds (median)")
    add("--fanout-deadline-s", type=float, default=60.0,
        help="cut a fan-out round short after this long")
    add("--variants", default="sync,async", help="comma list: sync,async")
    add("--max-ongoing-requests", type=int, default=None,
        help="deployment option (default: the framework's default)")
    add("--runs", type=int, default=3, help="processes per framework")
    add("--ray-python", help="interpreter with ray[serve] (default: "
        f"$SHOAL_BENCH_RAY_PYTHON, else {DEFAULT_RAY_PYTHON} if present)")
    add("--no-ray", action="store_true", help="measure shoal only")
    add("--timeout-s", type=float, default=900.0, help="limit per child process")
    # fmt: on
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
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

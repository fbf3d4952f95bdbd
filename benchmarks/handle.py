"""Handle round-trip latency and fan-out throughput, shoal against Ray Serve.

What it measures, for a one-replica deployment whose ``__call__`` returns its
argument (a ``def`` variant and an ``async def`` variant, deployed one at a time):

* latency: after a warm-up, N sequential ``handle.remote(x).result()`` round
  trips from the driver; reports p50, p99 and mean in microseconds;
* fan-out: ``rs = [h.remote(i) for i in range(F)]`` then
  ``[r.result() for r in rs]``; reports calls per second, the median of
  ``--repeats`` rounds.

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

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

DEFAULT_RAY_PYTHON = "/work/ray-venv/bin/python"
VARIANTS = ("sync", "async")
# (key in a variant's result, label, True when higher is better)
METRICS = (
    ("p50_us", "p50 (us)", False),
    ("p99_us", "p99 (us)", False),
    ("mean_us", "mean (us)", False),
    ("fanout_calls_per_s", "fan-out (calls/s)", True),
)


# ---------------------------------------------------------------- one framework


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
    expected = list(range(args.fanout))
    for _ in range(args.repeats):
        start = time.perf_counter()
        responses = [handle.remote(i) for i in range(args.fanout)]
        results = [r.result() for r in responses]
        elapsed = time.perf_counter() - start
        if results != expected:
            raise RuntimeError("fan-out results do not match their inputs")
        rates.append(args.fanout / elapsed)

    return {
        "p50_us": cuts[49] / 1e3,
        "p99_us": cuts[98] / 1e3,
        "mean_us": statistics.fmean(latencies_ns) / 1e3,
        "fanout_calls_per_s": statistics.median(rates),
        "fanout_rounds": [round(r, 1) for r in rates],
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


def ray_python(args: argparse.Namespace) -> str | None:
    path = args.ray_python or os.environ.get("SHOAL_BENCH_RAY_PYTHON")
    if path:
        return path
    return DEFAULT_RAY_PYTHON if os.path.exists(DEFAULT_RAY_PYTHON) else None


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


def run_child(python: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one framework once in a fresh process; return its report or an error."""
    cmd = [
        python, os.path.abspath(__file__), "--framework", framework, "--json",
        "--calls", str(args.calls), "--warmup", str(args.warmup),
        "--fanout", str(args.fanout), "--repeats", str(args.repeats),
        "--variants", ",".join(args.variants),
    ]  # fmt: skip
    if args.max_ongoing_requests is not None:
        cmd += ["--max-ongoing-requests", str(args.max_ongoing_requests)]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # Ray must start its own local instance
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return {"error": f"timed out after {args.timeout_s:.0f} s"}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = "\n    ".join(err.strip().splitlines()[-8:])
    return {"error": f"exit {proc.returncode}, no JSON line; stderr tail:\n    {tail}"}


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
        for variant in good[0]["variants"]
    }
    return merged


def print_table(results: dict[str, dict[str, Any] | None], args: argparse.Namespace) -> None:
    shoal, ray = results.get("shoal"), results.get("ray")
    print()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"nproc     {len(os.sched_getaffinity(0))}   loadavg {os.getloadavg()[0]:.2f}")
    for name, rep in results.items():
        if rep is not None:
            print(f"{name:<9} {rep['version']} on Python {rep['python']}, "
                  f"median of {rep['runs']} run(s)")  # fmt: skip
    limit = args.max_ongoing_requests or "framework default"
    print(f"scenario  1 replica, max_ongoing_requests={limit}, {args.calls} sequential "
          f"calls, fan-out {args.fanout} x {args.repeats} rounds")  # fmt: skip
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
            print(f"{variant + ' ' + label:<26}{cells[0]:>12}{cells[1]:>12}{ratio:>18}")
    print()
    print("reference (issue): Ray 2.60 p50 2.8 ms, 360 calls/s fanned out; "
          "shoal target p50 <= 400 us, >= 10,000 calls/s")  # fmt: skip


def orchestrate(args: argparse.Namespace) -> int:
    pythons = {"shoal": sys.executable}
    ray_py = ray_python(args)
    if ray_py:
        pythons["ray"] = ray_py
    else:
        print("no Ray interpreter (--ray-python, $SHOAL_BENCH_RAY_PYTHON); shoal only")
    results: dict[str, dict[str, Any] | None] = {}
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
    print_table(results, args)
    return 1 if failed else 0


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("shoal", "ray"),
                   help="run this framework in-process (default: compare both)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--calls", type=int, default=2000, help="sequential round trips")
    p.add_argument("--warmup", type=int, default=500, help="warm-up round trips")
    p.add_argument("--fanout", type=int, default=5000, help="calls per fan-out round")
    p.add_argument("--repeats", type=int, default=5, help="fan-out rounds (median)")
    p.add_argument("--variants", default="sync,async", help="comma list: sync,async")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="deployment option (default: the framework's default)")
    p.add_argument("--runs", type=int, default=3, help="processes per framework")
    p.add_argument("--ray-python", help="interpreter with ray[serve] installed")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per child process")
    args = p.parse_args(argv)  # fmt: skip
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
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        for variant, figures in report["variants"].items():
            print(f"{args.framework} {report['version']} {variant}: "
                  f"p50 {figures['p50_us']:.0f} us, p99 {figures['p99_us']:.0f} us, "
                  f"mean {figures['mean_us']:.0f} us, "
                  f"fan-out {figures['fanout_calls_per_s']:,.0f} calls/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

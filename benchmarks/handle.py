"""Handle round-trip latency and fan-out throughput, shoal against Ray Serve.

What it measures, for a one-replica deployment whose ``__call__`` returns its
argument (a ``def`` variant and an ``async def`` variant, deployed one at a time):

* latency: after a warm-up, N sequential ``handle.remote(x).result()`` round
  trips from the driver; reports p50, p99 and mean in microseconds;
* fan-out: ``rs = [h.remote(i) for i in range(F)]`` then
  ``[r.result() for r in rs]``; reports calls per second, the median of
  ``--repeats`` rounds. A round still collecting after ``--fanout-deadline-s``
  stops there and counts what it collected (Ray at its default
  ``max_ongoing_requests=5`` backs off and manages only tens of calls/s);
* floor: the same two measurements over a raw ZeroMQ DEALER -> ROUTER ``ipc://`` round trip of
  an 8-byte message to an echo loop in another process (the physical floor under any handle).

It prints figures next to issue 11's targets (p50 async/sync <= 120/200 us, fan-out >= 25k/15k
calls/s, measured on a faster machine) and never asserts them.

Run it:

    python benchmarks/handle.py                      # compare: shoal, and ray if found
    python benchmarks/handle.py --runs 1 --max-ongoing-requests 100
    python benchmarks/handle.py --no-ray --markdown          # the table as Markdown
    python benchmarks/handle.py --framework shoal --json     # one framework, one run
    /work/ray-venv/bin/python benchmarks/handle.py --framework ray --json

Without ``--framework`` the script is an orchestrator: it runs each framework and the
floor ``--runs`` times (default 3), interleaved, each in a fresh process (shoal and the
floor with this interpreter, which needs shoal installed, e.g. ``pip install -e .``; Ray
with ``--ray-python``, ``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``, and
says so when it skips Ray), then prints the machine, the versions and the median and
spread (min-max) of the runs in one table. Both frameworks run the same code: only the
``serve`` import differs.
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any

from _common import (
    ISSUE11,
    TARGET_HEADER,
    Figures,
    Report,
    Spread,
    add_framework_options,
    cell,
    check_runs,
    child_command,
    child_or_orchestrate,
    comma_list,
    framework_version,
    import_serve,
    ratio,
    run_each,
    run_json_child,
    shoal_and_ray,
    spreads,
)

VARIANTS = ("sync", "async")
# Options the orchestrator passes on to each child process.
CHILD_OPTIONS = (
    "calls", "warmup", "fanout", "repeats", "fanout_deadline_s",
    "variants", "max_ongoing_requests",
)  # fmt: skip
# (key in a variant's result, label)
METRICS = (
    ("p50_us", "p50 (us)"),
    ("p99_us", "p99 (us)"),
    ("mean_us", "mean (us)"),
    ("fanout_calls_per_s", "fan-out (calls/s)"),
)
TARGETS = {
    ("sync", "p50_us"): ISSUE11["handle_p50_sync_us"],
    ("async", "p50_us"): ISSUE11["handle_p50_async_us"],
    ("sync", "fanout_calls_per_s"): ISSUE11["fanout_sync"],
    ("async", "fanout_calls_per_s"): ISSUE11["fanout_async"],
}
FLOOR = "zmq"  # the raw ZeroMQ round trip, run as a third "framework"


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


# ------------------------------------------------------------- the ZeroMQ floor


class _ZmqReply:
    """The echo of call ``i``. Echoes come back in order, so replies left unread by a round cut
    short at its deadline are older than ours: they are read and dropped."""

    def __init__(self, sock: Any, i: int) -> None:
        self.sock, self.i = sock, i

    def result(self, timeout_s: float | None = None) -> int:
        while True:
            if timeout_s is not None and not self.sock.poll(timeout_s * 1000):
                raise TimeoutError
            value = int.from_bytes(self.sock.recv(), "little")
            if value == self.i:
                return value

    def cancel(self) -> None:
        pass


class ZmqEcho:
    """A DEALER to an echo ROUTER, shaped like a handle (``remote(i).result()``) so that
    ``measure`` times the raw round trip exactly as it times a handle call."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def remote(self, i: int) -> _ZmqReply:
        self.sock.send(i.to_bytes(8, "little"))
        return _ZmqReply(self.sock, i)


def zmq_echo(endpoint: str) -> int:
    """Be the echo server: a ROUTER bound to ``endpoint`` returning every message to its sender,
    until SIGTERM."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def zmq_version() -> str:
    import zmq

    return str(zmq.zmq_version())


def run_floor(args: argparse.Namespace) -> Figures:
    import zmq

    with tempfile.TemporaryDirectory(prefix="shoal-bench-zmq-") as scratch:
        endpoint = f"ipc://{scratch}/echo"
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zmq-echo", endpoint],
                                  stdout=subprocess.PIPE, text=True)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the echo server exited {server.wait(10)} before it was ready")
            sock.connect(endpoint)
            figures = measure(ZmqEcho(sock), args)
        finally:
            sock.close()
            ctx.term()
            server.terminate()
            server.wait(10)
    return {
        "framework": FLOOR,
        "version": f"pyzmq {zmq.__version__}, libzmq {zmq_version()}",
        "python": platform.python_version(),
        "variants": dict.fromkeys(VARIANTS, figures),
    }


# ----------------------------------------------------------------- orchestrator


def variant_spreads(runs: list[Figures]) -> dict[str, dict[str, Spread]]:
    """Per variant: median and spread of each metric over the runs."""
    if not runs:
        return {}
    return {
        variant: spreads([r["variants"][variant] for r in runs], [k for k, _ in METRICS])
        for variant in runs[0]["variants"]
    }


def truncated(runs: list[Figures], variant: str) -> bool:
    return any(r["variants"].get(variant, {}).get("fanout_truncated") for r in runs)


def fill_table(report: Report, results: dict[str, list[Figures]], args: argparse.Namespace) -> None:
    med = {name: variant_spreads(runs) for name, runs in results.items()}
    names = [n for n in ("shoal", "ray", FLOOR) if n in results]
    labels = {"shoal": "shoal", "ray": "Ray Serve", FLOOR: "raw zmq (floor)"}
    report.columns = ["metric", *(labels[n] for n in names), *(f"shoal / {labels[n]}" for n in names[1:]), TARGET_HEADER]
    for variant in args.variants:
        for key, label in METRICS:
            figures = {n: med[n].get(variant, {}).get(key) for n in names}
            cells = []
            for n in names:
                text = cell(figures[n])
                if key == "fanout_calls_per_s" and truncated(results[n], variant):
                    text += "*"
                cells.append(text)
            ratios = [ratio(figures["shoal"], figures[n]) for n in names[1:]]
            report.add_row(f"{variant} {label}", *cells, *ratios, TARGETS.get((variant, key), ""))
    if any(truncated(runs, v) for runs in results.values() for v in args.variants):
        report.notes.append(
            f"* a fan-out round hit --fanout-deadline-s={args.fanout_deadline_s:g}: "
            "rate over the calls collected by then"
        )


def orchestrate(args: argparse.Namespace) -> int:
    report = Report("handle round trip and fan-out", __file__, runs=args.runs)
    pythons = shoal_and_ray(args, report)
    pythons[FLOOR] = sys.executable
    report.add_fact("floor", f"raw zmq: DEALER -> ROUTER over ipc, 8-byte message, echo in another process, "
                             f"libzmq {zmq_version()}")

    def run_child(python: str, framework: str) -> Figures:
        return run_json_child(child_command(__file__, python, framework, args, CHILD_OPTIONS), args.timeout_s)

    results, failures = run_each(pythons, args.runs, run_child)
    limit = args.max_ongoing_requests or "framework default"
    report.scenario = (
        f"1 replica echoing its argument, max_ongoing_requests={limit}, {args.calls} sequential "
        f"calls after {args.warmup} warm-up, fan-out {args.fanout} x {args.repeats} rounds (median)"
    )
    fill_table(report, results, args)
    return report.finish(args.markdown, failures)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--calls", type=int, default=2000, help="sequential round trips")
    add("--warmup", type=int, default=500, help="warm-up round trips")
    add("--fanout", type=int, default=5000, help="calls per fan-out round")
    add("--repeats", type=int, default=5, help="fan-out rounds (median)")
    add("--fanout-deadline-s", type=float, default=60.0,
        help="cut a fan-out round short after this long")
    add("--variants", default="sync,async", help="comma list: sync,async")
    add("--max-ongoing-requests", type=int, default=None,
        help="deployment option (default: the framework's default)")
    add("--zmq-echo", help=argparse.SUPPRESS)  # internal: be the floor's echo server
    # fmt: on
    add_framework_options(p, ("shoal", "ray", FLOOR), timeout_s=900.0)
    args = p.parse_args(argv)
    args.variants = comma_list(p, args.variants, VARIANTS, "variants")
    check_runs(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zmq_echo:
        return zmq_echo(args.zmq_echo)
    run = run_floor if args.framework == FLOOR else run_framework
    return child_or_orchestrate(args, run, orchestrate)


if __name__ == "__main__":
    sys.exit(main())

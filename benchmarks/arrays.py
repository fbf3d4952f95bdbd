"""Large arrays through a handle: shoal against Ray Serve and a raw ZeroMQ round trip.

What it measures: a float32 numpy array of each size (default 1 MiB and 64 MiB) echoed by a
one-replica deployment whose ``async def __call__`` returns its argument, ``handle.remote(a)
.result()`` from the driver, one call at a time. After a warm-up, each echo is timed; the
table shows the median echo time, round trips per second (1 / median) and GB/s, counted as the
array's bytes moved both ways (2 x size / median echo), the median of ``--runs`` processes.

The peers, in the same run:

* ``ray``: the same code under Ray Serve 2.60 (``--ray-python``, ``$SHOAL_BENCH_RAY_PYTHON`` or
  /work/ray-venv/bin/python; ``--no-ray`` to skip);
* ``zmq``: the physical limit of a socket: a DEALER sends the array's buffer with
  ``copy=False`` over ``ipc://`` to a ROUTER in another process, which sends the received
  frame back with ``copy=False``; the DEALER receives it with ``copy=False`` and makes an
  array of it (``np.frombuffer``, no copy). No pickling, no framing.

The issue's figures (another, faster machine): 64 MiB echo 475 ms on shoal before out-of-band
buffers, 82 ms on Ray, 205 ms on raw ZeroMQ; 1 MiB 4.9 ms on shoal, 7.9 ms on Ray. Targets:
64 MiB at least 2x Ray's round trips/s; 1 MiB at most 1 ms. It prints figures next to them in one
table (the machine, the versions, the median and spread of the runs) and never asserts.

Run it:

    python benchmarks/arrays.py                          # shoal, zmq, and ray if found
    python benchmarks/arrays.py --runs 5 --no-ray
    python benchmarks/arrays.py --no-ray --markdown      # the table as Markdown
    python benchmarks/arrays.py --framework shoal --json # one framework, one process
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import multiprocessing
import platform
import statistics
import tempfile
import time
from typing import Any

import _common as common

FRAMEWORKS = ("shoal", "ray", "zmq")
MIB = 1024 * 1024
# Options the orchestrator passes on to each child process.
CHILD_OPTIONS = ("sizes_mib", "echoes", "warmup")


def echoes_for(size_mib: float, args: argparse.Namespace) -> int:
    """Timed echoes for one size: ``--echoes`` at 64 MiB, more for smaller arrays (at most 2000)."""
    return int(min(2000, max(args.echoes, args.echoes * 64 / size_mib)))


def time_echoes(echo: Any, array: Any, n: int, warmup: int) -> list[float]:
    import numpy as np

    result = echo(array)
    if not np.array_equal(result, array):
        raise RuntimeError("the echo returned another array")
    for _ in range(warmup):
        echo(array)
    times_s = []
    for _ in range(n):
        start = time.perf_counter()
        echo(array)
        times_s.append(time.perf_counter() - start)
    return times_s


def summary(times_s: list[float], nbytes: int) -> dict[str, float]:
    median_s = statistics.median(times_s)
    return {"echo_ms": median_s * 1e3, "per_s": 1 / median_s, "gb_s": 2 * nbytes / median_s / 1e9}


# ---------------------------------------------------------------- one framework


def run_serve(framework: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    serve = common.import_serve(framework)

    @serve.deployment
    class Echo:
        async def __call__(self, x: Any) -> Any:
            return x

    results: dict[str, Any] = {}
    try:
        # A free port: Ray's proxy would take 8000 and fail if anything else holds it.
        serve.start(http_options={"host": common.HOST, "port": common.free_port()})
        handle = serve.run(Echo.bind(), name="arrays", route_prefix="/arrays")
        for size_mib in args.sizes:
            array = np.random.default_rng(0).random(int(size_mib * MIB) // 4, dtype=np.float32)
            times_s = time_echoes(lambda a: handle.remote(a).result(), array, echoes_for(size_mib, args), args.warmup)
            results[f"{size_mib:g}"] = summary(times_s, array.nbytes)
    finally:
        serve.shutdown()
        if framework == "ray":
            import ray

            ray.shutdown()
    return results


def _zmq_echo_server(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    ctx.term()


def run_zmq(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import zmq

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/echo.sock"
        server = multiprocessing.get_context("spawn").Process(target=_zmq_echo_server, args=(endpoint,))
        server.start()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)

        def echo(array: Any) -> Any:
            sock.send(array, copy=False)
            return np.frombuffer(sock.recv(copy=False), dtype=array.dtype)

        try:
            for size_mib in args.sizes:
                array = np.random.default_rng(0).random(int(size_mib * MIB) // 4, dtype=np.float32)
                times_s = time_echoes(echo, array, echoes_for(size_mib, args), args.warmup)
                results[f"{size_mib:g}"] = summary(times_s, array.nbytes)
        finally:
            sock.send(b"stop")
            server.join(timeout=10)
            if server.is_alive():
                server.kill()
            sock.close(linger=0)
            ctx.term()
    return results


def zmq_version() -> str:
    import zmq

    return f"{zmq.zmq_version()}, pyzmq {zmq.__version__}"


def run_framework(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    if args.framework == "zmq":
        sizes = run_zmq(args)
        version = f"libzmq {zmq_version()}"
    else:
        sizes = run_serve(args.framework, args)
        version = common.framework_version(args.framework)
    return {
        "framework": args.framework, "version": version, "python": platform.python_version(),
        "numpy": np.__version__, "sizes": sizes,
    }


# ----------------------------------------------------------------- orchestrator


# (key, label, cell format)
METRICS = (("echo_ms", "echo (ms)", "{:.2f}"), ("per_s", "echoes/s", "{:,.1f}"), ("gb_s", "GB/s", "{:.2f}"))
TARGETS = {("64", "per_s"): common.ISSUE11["array_64mib_vs_ray"], ("1", "echo_ms"): common.ISSUE11["array_1mib_ms"]}
LABELS = {"shoal": "shoal", "ray": "Ray Serve", "zmq": "raw zmq (floor)"}


def times_faster(shoal: common.Spread | None, peer: common.Spread | None, key: str) -> str:
    """How many times faster shoal is than the peer (above 1: faster), from the medians."""
    return common.ratio(peer, shoal, "{:.2f}x") if key == "echo_ms" else common.ratio(shoal, peer, "{:.2f}x")


def fill_table(report: common.Report, results: dict[str, list[common.Figures]], args: argparse.Namespace) -> None:
    med = {name: common.nested_spreads(runs, "sizes", [k for k, _, _ in METRICS]) for name, runs in results.items()}
    names = [n for n in FRAMEWORKS if n in results]
    peers = names[1:]
    report.columns = ["size, metric", *(LABELS[n] for n in names), *(f"shoal vs {LABELS[n]}" for n in peers),
                      common.TARGET_HEADER]
    for size_mib in args.sizes:
        size = f"{size_mib:g}"
        for key, label, fmt in METRICS:
            figures = {n: med[n].get(size, {}).get(key) for n in names}
            report.add_row(f"{size} MiB {label}", *(common.cell(figures[n], fmt) for n in names),
                           *(times_faster(figures["shoal"], figures[n], key) for n in peers),
                           TARGETS.get((size, key), ""))
    report.notes.append("shoal vs peer: how many times faster shoal is (above 1: faster)")
    report.notes.append("reference (issue 11, faster machine): 64 MiB echo 475 ms on shoal before out-of-band "
                        "buffers, 82 ms on Ray, 205 ms raw ZeroMQ; 1 MiB 4.9 ms on shoal, 7.9 ms on Ray")


def orchestrate(args: argparse.Namespace) -> int:
    report = common.Report("large arrays through a handle", __file__, ("numpy",), args.runs)
    found = common.shoal_and_ray(args, report)
    # Interleaved (shoal, zmq, ray, shoal, ...): a busy spell on a shared machine hits all alike.
    pythons = {"shoal": found.pop("shoal"), "zmq": sys.executable, **found}
    report.add_fact("floor", f"raw zmq: DEALER -> ROUTER over ipc, copy=False both ways, libzmq {zmq_version()}")

    def run_child(python: str, framework: str) -> common.Figures:
        cmd = common.child_command(__file__, python, framework, args, CHILD_OPTIONS)
        return common.run_json_child(cmd, args.timeout_s)

    results, failures = common.run_each(pythons, args.runs, run_child)
    report.scenario = (
        f"float32 array echoed by a 1-replica async method, one call at a time, {args.warmup} warm-up echoes, "
        f"then {args.echoes} timed at 64 MiB (more for smaller arrays, at most 2000; median echo); "
        "echoes/s = 1 / median echo; GB/s = 2 x array bytes / median echo"
    )
    fill_table(report, results, args)
    return report.finish(args.markdown, failures)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = p.add_argument
    add("--sizes-mib", default="1,64", help="comma list of array sizes in MiB")
    add("--echoes", type=int, default=15, help="timed echoes at 64 MiB (more for smaller sizes)")
    add("--warmup", type=int, default=3, help="untimed echoes per size")
    common.add_framework_options(p, FRAMEWORKS, timeout_s=900.0)
    args = p.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes_mib.split(",") if s]
    except ValueError:
        p.error(f"--sizes-mib: not a comma list of numbers: {args.sizes_mib}")
    common.check_runs(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    return common.child_or_orchestrate(parse_args(argv), run_framework, orchestrate)


if __name__ == "__main__":
    sys.exit(main())

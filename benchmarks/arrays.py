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
64 MiB at least 2x Ray's round trips/s; 1 MiB at most 1 ms. It prints figures and never asserts.

Run it:

    python benchmarks/arrays.py                          # shoal, zmq, and ray if found
    python benchmarks/arrays.py --runs 5 --no-ray
    python benchmarks/arrays.py --framework shoal --json # one framework, one process
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
import multiprocessing
import platform
import statistics
import tempfile
import time
from typing import Any

from _common import DEFAULT_RAY_PYTHON, HOST, framework_version, free_port, import_serve, ray_python, run_json_child

FRAMEWORKS = ("shoal", "ray", "zmq")
MIB = 1024 * 1024


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

    serve = import_serve(framework)

    @serve.deployment
    class Echo:
        async def __call__(self, x: Any) -> Any:
            return x

    results: dict[str, Any] = {}
    try:
        # A free port: Ray's proxy would take 8000 and fail if anything else holds it.
        serve.start(http_options={"host": HOST, "port": free_port()})
        handle = serve.run(Echo.bind(), name="arrays", route_prefix="/arrays")
        for size_mib in args.sizes_mib:
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
            for size_mib in args.sizes_mib:
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


def run_framework(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    if args.framework == "zmq":
        import zmq

        sizes = run_zmq(args)
        version = f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
    else:
        sizes = run_serve(args.framework, args)
        version = framework_version(args.framework)
    return {
        "framework": args.framework, "version": version, "python": platform.python_version(),
        "numpy": np.__version__, "sizes": sizes,
    }


# ----------------------------------------------------------------- orchestrator


def run_child(python: str, framework: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        python, os.path.abspath(__file__), "--framework", framework, "--json",
        "--sizes-mib", ",".join(f"{s:g}" for s in args.sizes_mib),
        "--echoes", str(args.echoes), "--warmup", str(args.warmup),
    ]
    return run_json_child(cmd, args.timeout_s)


def orchestrate(args: argparse.Namespace) -> int:
    pythons = {"shoal": sys.executable, "zmq": sys.executable}
    ray_py = ray_python(args)
    if ray_py:
        pythons["ray"] = ray_py
    else:
        print("no Ray interpreter (--ray-python, $SHOAL_BENCH_RAY_PYTHON); shoal and zmq only")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pythons}
    failed = False
    # Interleaved (shoal, zmq, ray, shoal, ...): a busy spell on a shared machine hits all alike.
    for k in range(args.runs):
        for name, python in pythons.items():
            print(f"{name} run {k + 1}/{args.runs} ...", flush=True)
            report = run_child(python, name, args)
            if "error" in report:
                failed = True
                print(f"  failed: {report['error']}")
            else:
                runs[name].append(report)
    print_table(runs, args)
    return 1 if failed else 0


def _median(reports: list[dict[str, Any]], size: str, key: str) -> float | None:
    values = [r["sizes"][size][key] for r in reports if size in r.get("sizes", {})]
    return statistics.median(values) if values else None


def print_table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.machine()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, reports in runs.items():
        if reports:
            r = reports[0]
            print(f"{name:<9} {r['version']}, Python {r['python']}, numpy {r['numpy']}, median of {len(reports)} run(s)")
    print("scenario  float32 array echoed by an async method, one call at a time; "
          "GB/s = 2 x array bytes / echo time")
    print()
    names = [n for n in FRAMEWORKS if runs.get(n)]
    head = f"{'size':<8}{'metric':<14}" + "".join(f"{n:>12}" for n in names)
    if "ray" in names:
        head += f"{'shoal/ray':>12}"
    if "zmq" in names:
        head += f"{'shoal/zmq':>12}"
    print(head)
    for size_mib in args.sizes_mib:
        size = f"{size_mib:g}"
        for key, label in (("echo_ms", "echo (ms)"), ("per_s", "echoes/s"), ("gb_s", "GB/s")):
            values = {n: _median(runs[n], size, key) for n in names}
            line = f"{size + ' MiB':<8}{label:<14}" + "".join(
                f"{v:>12.2f}" if v is not None else f"{'-':>12}" for v in values.values()
            )
            for peer in ("ray", "zmq"):
                if peer in names:
                    a, b = values.get("shoal"), values.get(peer)
                    ratio = "-" if not a or not b else f"{(b / a if key == 'echo_ms' else a / b):.2f}x"
                    line += f"{ratio:>12}"
            print(line)
    print("shoal/peer: how many times faster shoal is (above 1: faster)")
    print("reference (issue, faster machine): 64 MiB Ray 82 ms, raw ZeroMQ 205 ms; "
          "targets: 64 MiB >= 2x Ray's echoes/s, 1 MiB <= 1 ms")


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--framework", choices=FRAMEWORKS, help="run this one in-process (default: compare all)")
    add("--json", action="store_true", help="one JSON line, not indented")
    add("--sizes-mib", default="1,64", help="comma list of array sizes in MiB")
    add("--echoes", type=int, default=15, help="timed echoes at 64 MiB (more for smaller sizes)")
    add("--warmup", type=int, default=3, help="untimed echoes per size")
    add("--runs", type=int, default=3, help="processes per framework (median)")
    add("--ray-python", help="interpreter with ray[serve] (default: "
        f"$SHOAL_BENCH_RAY_PYTHON, else {DEFAULT_RAY_PYTHON} if present)")
    add("--no-ray", action="store_true", help="skip Ray Serve")
    add("--timeout-s", type=float, default=900.0, help="limit per child process")
    # fmt: on
    args = p.parse_args(argv)
    args.sizes_mib = [float(s) for s in args.sizes_mib.split(",") if s]
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

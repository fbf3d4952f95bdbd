"""HTTP req/s of a one-replica hello app with 1 and with 2 proxies (``http_options.num_proxies``).

Each round starts a fresh private instance per proxy count, in alternating order (1, 2, 2, 1, ...
so that neither always runs first on a warming machine), deploys ``hello`` (one replica), and runs
``wrk -t min(c, 2) -c c -d D --latency`` for every connection count after a 2 s warm-up. It also
reads how many requests each proxy answered (the CPU time each proxy process used, from
``/proc``), to show how the shared listening socket spread the load. One table: the machine,
the versions, the median and spread (min-max) over the rounds and the ratio to the first proxy
count. Issue 11 asks for the figures (no target). Nothing is asserted.

    python benchmarks/proxies.py                     # 3 rounds, 5 s, connections 1 and 64
    python benchmarks/proxies.py --runs 5 --duration 10 --connections 64 --proxies 1,2,4
    python benchmarks/proxies.py --markdown          # the table as Markdown

The replica's ``max_ongoing_requests`` (``--max-ongoing-requests``) matters here: each proxy
has its own router, which counts only its own requests in flight, so with the default (5) and
one replica the routers send more than it takes, the replica rejects the excess and the routers
back off (Ray Serve's protocol, 25 ms doubling): at 64 connections, give the replica headroom
(say 100) to measure the proxies rather than that contention.

On a machine with few cores a second proxy competes with the replica and wrk for them: expect
little or nothing from it there (see the README).
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import re
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import psutil
from _common import Figures, Report, add_common_options, cell, check_runs, progress, ratio, spreads


def _hello_app(max_ongoing_requests: int | None) -> Any:
    from shoal import serve

    options = {} if max_ongoing_requests is None else {"max_ongoing_requests": max_ongoing_requests}

    @serve.deployment(**options)
    class Hello:
        async def __call__(self, request: Any) -> str:
            return "hello"

    return Hello.bind()


def _wrk(url: str, connections: int, duration_s: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{duration_s:g}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan")}


def _proxy_cpu_s(supervisor: psutil.Process) -> list[float]:
    times = []
    for child in supervisor.children():
        if child.name() == "shoal-proxy":
            cpu = child.cpu_times()
            times.append(cpu.user + cpu.system)
    return sorted(times)


def _round(num_proxies: int, connections: list[int], duration_s: float, max_ongoing: int | None) -> Figures:
    """One fresh instance with ``num_proxies`` proxies: per connection count ``c``, wrk's
    ``rps_c`` and ``p50_ms_c``, and the CPU seconds each proxy used meanwhile."""
    from shoal import serve

    serve.start(http_options={"port": 0, "num_proxies": num_proxies, "metrics_port": 0})
    try:
        serve.run(_hello_app(max_ongoing), name="hello", route_prefix="/")
        url = serve.get_http_url()
        assert url is not None
        deadline = time.monotonic() + 30
        while len([p for p in serve.status().proxy_processes if p.status.value == "HEALTHY"]) < num_proxies:
            if time.monotonic() > deadline:
                raise RuntimeError("the proxies did not all start")
            time.sleep(0.05)
        assert urllib.request.urlopen(url + "/", timeout=10).read() == b"hello"
        supervisor = next(p for p in psutil.Process().children() if p.name() == "shoal")
        _wrk(url + "/", max(connections), 2.0)  # warm-up
        before = _proxy_cpu_s(supervisor)
        result: Figures = {}
        for c in connections:
            figures = _wrk(url + "/", c, duration_s)
            result |= {f"rps_{c}": figures["rps"], f"p50_ms_{c}": figures["p50_ms"]}
        after = _proxy_cpu_s(supervisor)
        result["proxy_cpu_s"] = [round(a - b, 2) for a, b in zip(after, before)]
        return result
    finally:
        serve.shutdown()


def fill_table(report: Report, rounds: dict[int, list[Figures]], connections: list[int]) -> None:
    """A row per proxy count: req/s and p50 per connection count, and req/s against the first count."""
    med = {n: spreads(runs) for n, runs in rounds.items()}
    base = next(iter(rounds))
    report.columns = ["proxies", *(f"{c} conns {what}" for c in connections
                                   for what in ("req/s", "p50 (ms)", f"req/s vs {base} prox."))]
    for n, figures in med.items():
        cells = [[cell(figures.get(f"rps_{c}")), cell(figures.get(f"p50_ms_{c}"), "{:.2f}"),
                  ratio(figures.get(f"rps_{c}"), med[base].get(f"rps_{c}"), "x{:.2f}")] for c in connections]
        report.add_row(str(n), *(text for group in cells for text in group))
    for n, runs in rounds.items():
        report.notes.append(f"proxies={n}: CPU seconds per proxy during the timed runs, per round: "
                            + "; ".join(str(r["proxy_cpu_s"]) for r in runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--proxies", default="1,2", help="proxy counts to compare")
    parser.add_argument(
        "--max-ongoing-requests", type=int,
        help="the replica's (default: the deployment default, 5: with several proxies their routers contend for it)",
    )
    add_common_options(parser, peer=False)
    args = parser.parse_args(argv)
    check_runs(parser, args)
    if shutil.which("wrk") is None:
        print("wrk is not on PATH", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    counts = [int(n) for n in args.proxies.split(",")]
    report = Report("several proxies on one port", __file__, ("psutil",), args.runs)
    rounds: dict[int, list[Figures]] = {n: [] for n in counts}
    for run in range(args.runs):
        order = counts if run % 2 == 0 else list(reversed(counts))
        for n in order:
            rounds[n].append(_round(n, connections, args.duration, args.max_ongoing_requests))
            last = rounds[n][-1]
            progress(f"round {run + 1} proxies={n}: " + "  ".join(
                f"c={c} {last[f'rps_{c}']:.0f} req/s p50 {last[f'p50_ms_{c}']:.2f} ms" for c in connections
            ) + f"  proxy cpu s {last['proxy_cpu_s']}")
    report.scenario = (
        f"a fresh instance per round and proxy count (order alternating), 1 replica of an async hello, "
        f"max_ongoing_requests={args.max_ongoing_requests or 'default'}; after a 2 s warm-up, "
        f"`wrk -t min(c, 2) -c c -d {args.duration:g}s --latency` per connection count c"
    )
    fill_table(report, rounds, connections)
    report.print(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

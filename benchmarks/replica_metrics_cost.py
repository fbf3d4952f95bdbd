"""What a replica's metrics cost per request: a micro-benchmark of the recording alone.

Times, in one process with prometheus-client's multiprocess mode on (samples go to mmap files
in a temporary directory, as in a replica of an instance), the work ``ReplicaWorker`` adds to
each request: the route's bound children looked up, two ``perf_counter`` calls, the ongoing
count changed twice (written once per loop iteration) and ``ReplicaMetrics.finished`` (latency
histogram, rolling windows, request or error counter). Requests are simulated on an asyncio
loop, ``--per-iteration`` of them per loop iteration (1: the worst case, an idle replica), against
a baseline that only runs the loop. Prints CPU microseconds per request (one table: the machine,
the versions, the median and spread (min-max) of ``--runs`` runs, each the best of 3 rounds);
asserts nothing.

    python benchmarks/replica_metrics_cost.py [--n 100000] [--per-iteration 1] [--runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.realpath(__file__))
# benchmarks/http.py would shadow the standard library's http package for a script run from here.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

from _common import Report, add_common_options, check_runs, spreads


async def measure(n: int, per_iteration: int, error: str | None) -> float:
    from shoal.runtime.replica_metrics import ReplicaMetrics

    recorder = ReplicaMetrics(deployment="D", replica="r", application="app", max_ongoing_requests=100)
    recorder.start_reporting()
    routes = ["/a", "/b", ""]

    async def run(record: bool) -> float:
        start = time.process_time()  # CPU time: other processes on the machine do not count
        ongoing = 0
        for i in range(n):
            if record:
                route = recorder.route(routes[i % 3])
                started_s = time.perf_counter()
                ongoing += 1
                recorder.set_ongoing(ongoing)
                ongoing -= 1
                recorder.set_ongoing(ongoing)
                recorder.finished(route, (time.perf_counter() - started_s) * 1000, error)
            else:
                routes[i % 3]
            if i % per_iteration == 0:
                await asyncio.sleep(0)
        return (time.process_time() - start) / n * 1e6

    await run(True)  # bind the children first
    best = float("inf")
    for _ in range(3):
        best = min(best, await run(True) - await run(False))
    recorder.stop_reporting()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--per-iteration", type=int, default=1)
    add_common_options(parser, peer=False)
    args = parser.parse_args()
    check_runs(parser, args)
    report = Report("replica metrics cost", __file__, ("prometheus-client",), args.runs)

    from shoal.runtime import metrics

    metrics.enable(Path(tempfile.mkdtemp(prefix="shoal-metrics-bench-")))
    outcomes = (("success", None), ("error", "ValueError"))
    runs = [{label: asyncio.run(measure(args.n, args.per_iteration, error)) for label, error in outcomes}
            for _ in range(args.runs)]
    report.scenario = (f"{args.n:,} simulated requests, {args.per_iteration} per loop iteration, "
                       "prometheus-client multiprocess mode, CPU time minus a loop-only baseline")
    report.add_fact("peer", "none (the baseline loop is subtracted)")
    report.columns = ["request outcome", "CPU us added per request"]
    report.add_rows(spreads(runs), "{:.2f}")
    return report.finish(args.markdown, {})


if __name__ == "__main__":
    sys.exit(main())

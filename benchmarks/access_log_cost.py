"""Per-line cost of access lines, in CPU microseconds of the writing thread (best of 5 rounds).

* ``RotatingLineFile.write``: a shared writer (``stat`` per write), one that looks every
  ``SHARED_RECHECK_S`` (a replica's access file) and a lone one, next to a bare ``os.write`` of
  the same line;
* a replica's access line (``runtime/logs.log_access`` into its run-directory file), TEXT and JSON,
  written at once (no loop bound: local testing mode, unit tests) and as a replica writes it, on
  its loop (``bind_log_files``: one write per loop iteration) with 1 and 16 requests ending per
  iteration;
* the proxy's access line (``proxy.access``, written once per loop turn). (The proxy has no
  access-log middleware any more: the line is written by the request path itself.)

Run it: ``python benchmarks/access_log_cost.py [lines_per_round] [--runs 3] [--markdown]``. It
prints one table (the machine, the versions, the median and spread (min-max) of ``--runs`` runs,
each the best of 5 rounds) and asserts nothing. CPU time, not wall time, so a busy machine blurs
the figures less.
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import io
import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import Figures, Report, add_common_options, check_runs, spreads

from shoal.proxy.access import access_line
from shoal.runtime import logs
from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.rotation import SHARED_RECHECK_S, RotatingLineFile, RotationLimits

LINE = "INFO 2026-12-02 12:00:00,000 ray.serve 0123456789abcdef0123456789abcdef -- GET /api 200 1.2ms"
REQUEST_ID = "0123456789abcdef0123456789abcdef"
ENDED_PER_LOOP_TURN = 16  # requests that end in one loop iteration of a busy proxy


def best_us(run: Callable[[], None], lines: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.thread_time()
        run()
        rounds.append((time.thread_time() - started) / lines * 1e6)
    return min(rounds)


def files(directory: str, lines: int, out: Figures) -> None:
    kinds = (("shared writer", True, None), (f"shared writer, recheck_s {SHARED_RECHECK_S}", True, SHARED_RECHECK_S),
             ("lone writer", False, None))
    for label, shared, recheck_s in kinds:
        writer = RotatingLineFile(os.path.join(directory, f"{label}.log"), RotationLimits(), shared=shared,
                                  recheck_s=recheck_s)
        cost = best_us(lambda w=writer: [w.write(LINE) for _ in range(lines)], lines)  # type: ignore[misc]
        out[f"RotatingLineFile.write, {label}"] = cost
    fd = os.open(os.path.join(directory, "bare.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    data = (LINE + "\n").encode()
    out["bare os.write"] = best_us(lambda: [os.write(fd, data) for _ in range(lines)], lines)
    os.close(fd)


def replica(directory: str, lines: int, out: Figures) -> None:
    for encoding in ("TEXT", "JSON"):
        logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app",
                                     logging_config={"encoding": encoding}, default_logs_dir=directory)
        logging.getLogger().handlers[0].setStream(io.StringIO())  # type: ignore[attr-defined]
        cost = best_us(lambda: [logs.log_access("GET", "/api", 200, 1.23, request_id=REQUEST_ID) for _ in range(lines)], lines)
        out[f"replica access line, {encoding}"] = cost


async def replica_on_loop(directory: str, lines: int, out: Figures) -> None:
    """As a replica writes its access lines: bound to its loop, ``per_turn`` ending per iteration."""
    for encoding in ("TEXT", "JSON"):
        logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app",
                                     logging_config={"encoding": encoding}, default_logs_dir=directory)
        logging.getLogger().handlers[0].setStream(io.StringIO())  # type: ignore[attr-defined]
        logs.bind_log_files(asyncio.get_running_loop())
        for per_turn in (1, ENDED_PER_LOOP_TURN):
            rounds = []
            for _ in range(5):
                started = time.thread_time()
                for number in range(lines):
                    logs.log_access("GET", "/api", 200, 1.23, request_id=REQUEST_ID)
                    if number % per_turn == 0:
                        await asyncio.sleep(0)  # let the loop turn (and the buffered file write)
                rounds.append((time.thread_time() - started) / lines * 1e6)
            out[f"replica access line, {encoding}, on its loop, {per_turn} per iteration"] = min(rounds)


async def proxy(directory: str, encoding: str, lines: int, out: Figures) -> None:
    config = {"encoding": encoding}
    handlers = logs.install_proxy_logging(host="127.0.0.1", logging_config=config, default_logs_dir=directory,
                                          file_factory=LoopBufferedHandler)
    logging.getLogger().handlers[0].setStream(io.StringIO())  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    for handler in handlers:
        if isinstance(handler, LoopBufferedHandler):
            handler.bind(loop)
    line = access_line(handlers, config, "127.0.0.1")
    async def drive(call: Callable[[], Any]) -> float:
        rounds = []
        for _ in range(5):
            started = time.thread_time()
            for number in range(lines):
                await call()
                if number % ENDED_PER_LOOP_TURN == 0:
                    await asyncio.sleep(0)  # let the loop turn (and the buffered file write)
            rounds.append((time.thread_time() - started) / lines * 1e6)
        return min(rounds)

    async def just_line() -> None:
        line.write("GET", "/api", 200, 1.23, REQUEST_ID)

    out[f"proxy access line, {encoding}"] = await drive(just_line)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("lines", type=int, nargs="?", default=50_000, help="lines per round")
    add_common_options(parser, peer=False)
    args = parser.parse_args()
    check_runs(parser, args)
    report = Report("access line cost", __file__, runs=args.runs)
    runs: list[Figures] = []
    for _ in range(args.runs):
        figures: Figures = {}
        with tempfile.TemporaryDirectory() as directory:
            files(directory, args.lines, figures)
            replica(directory, args.lines, figures)
            asyncio.run(replica_on_loop(directory, args.lines, figures))
            for encoding in ("TEXT", "JSON"):
                asyncio.run(proxy(directory, encoding, args.lines, figures))
        runs.append(figures)
    report.scenario = f"{args.lines:,} lines per round, CPU time of the writing thread, best of 5 rounds per run"
    report.add_fact("peer", "none (no peer has these parts); the bare os.write row is the floor")
    report.columns = ["what", "CPU us per line"]
    report.add_rows(spreads(runs), "{:.2f}")
    return report.finish(args.markdown, {})


if __name__ == "__main__":
    sys.exit(main())

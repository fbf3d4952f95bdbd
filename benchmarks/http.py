"""HTTP throughput and latency of a one-replica hello app: shoal, bare uvicorn, Ray Serve.

What it measures: each target serves ``GET /`` -> ``hello`` (text/plain) from

* shoal: ``@serve.deployment class Hello: async def __call__(self, request): return "hello"``,
  one replica, deployment defaults (``--max-ongoing-requests N`` passes through), behind
  shoal's HTTP proxy;
* bare: uvicorn (uvloop, httptools, access log off, one worker) serving a Starlette app whose
  handler returns ``PlainTextResponse("hello")``, the floor any proxy-plus-replica design pays;
* ray: the same deployment as shoal under Ray Serve, when an interpreter with Ray is found;
* shoal-metrics and shoal-quiet (asked for with ``--targets``): shoal with access logs off, and
  with access logs and the metrics endpoint off, to price what the defaults cost.

For every (target, connections) pair, connections 1, 16 and 64 by default, it runs
``wrk -t min(c, 2) -c c -d D --latency --timeout 10s`` after a 2 s warm-up and records
requests/s and the p50/p99 of wrk's latency distribution, plus wrk's "Non-2xx or 3xx
responses" and socket-error counts (wrk leaves responses slower than its ``--timeout`` out of
the distribution and counts them as timeouts; its default of 2 s would hide Ray's tail). Without wrk on PATH it says so and uses a built-in asyncio HTTP/1.1 keep-alive client
instead (one process, so it saturates well below wrk: its figures for the bare server are the
client's limit, not the server's).

It prints figures next to issue 11's targets (at 64 connections at least 0.50 of the bare
figure from the same run, p50 at 1 connection at most 0.20 ms; measured on a faster machine)
and never asserts them. ``--num-proxies N`` runs shoal with ``http_options.num_proxies=N``.

Run it:

    python benchmarks/http.py                           # shoal, bare, and ray if found
    python benchmarks/http.py --targets shoal,bare --runs 1 --duration 5
    python benchmarks/http.py --connections 64 --max-ongoing-requests 100
    python benchmarks/http.py --targets shoal,bare --num-proxies 2
    python benchmarks/http.py --json                     # one JSON line on stdout
    python benchmarks/http.py --markdown                 # the table as Markdown

The script is an orchestrator: each round (``--runs``, default 3) starts every target in a
fresh process of its own (``--serve TARGET``, an internal mode: shoal and bare with this
interpreter, which needs shoal, uvicorn, uvloop and httptools; Ray with ``--ray-python``,
``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``), polls its URL until it answers
``hello``, measures every connection count against it, then stops it, so the targets never
share the two cores with each other's idle processes and the rounds spread each target over
the whole run. One table shows the machine, the versions, and the median and spread (min-max)
of the rounds; a skipped peer is named with the reason. Progress goes to standard error. Servers listen on free ports chosen
by the system (port 0); nothing assumes port 8000. On exit, Ctrl-C included, the servers are
shut down (``serve.shutdown()``, uvicorn's graceful stop) and any process they left behind is
killed.

The file is named ``http.py``, which would shadow the standard library's ``http`` package for
anything this script imports; the first lines below take this directory off ``sys.path``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import dataclasses
import json
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from _common import (
    HOST,
    ISSUE11,
    TARGET_HEADER,
    Report,
    add_common_options,
    cell,
    check_runs,
    comma_list,
    free_port,
    load_average,
    machine,
    package_version,
    progress,
    ratio,
    shoal_and_ray,
    spreads,
)

TARGETS = ("shoal", "shoal-metrics", "shoal-quiet", "bare", "ray")
# What the shoal variants turn off, to price metrics and access logs (shoal: both on, the defaults).
SHOAL_VARIANTS = {
    "shoal": {},
    "shoal-metrics": {"logging_config": {"enable_access_log": False}},
    "shoal-quiet": {"logging_config": {"enable_access_log": False}, "metrics_port": None},
}
BODY = b"hello"
ANNOUNCE = "SHOAL_BENCH_SERVER "  # prefix of the child's one line to the orchestrator


# ------------------------------------------------------------------- server side


def announce(info: dict[str, Any]) -> None:
    """The child's one line to the orchestrator: its URL and versions."""
    sys.stdout.write(ANNOUNCE + json.dumps(info) + "\n")
    sys.stdout.flush()


def stop_event() -> threading.Event:
    """Set on SIGTERM/SIGINT or when stdin reaches EOF (the orchestrator closed it or died)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    on_stdin_eof(stop.set)
    return stop


def on_stdin_eof(action: Callable[[], None]) -> None:
    """Call ``action`` from a daemon thread once standard input closes (the parent is gone)."""

    def watch() -> None:
        try:
            while os.read(0, 4096):  # raw fd: no buffer lock to trip over at exit
                pass
        except (OSError, ValueError):
            pass
        action()

    threading.Thread(target=watch, daemon=True, name="stdin-eof").start()


def serve_framework(framework: str, max_ongoing_requests: int | None, num_proxies: int) -> int:
    """shoal or Ray Serve: deploy Hello on a free port, announce, wait for the stop signal."""
    stop = stop_event()
    if framework == "ray":
        from ray import serve

        port = free_port()  # Ray's proxy has no port 0; a tiny race, reported if it bites
        http_options: dict[str, Any] = {"host": HOST, "port": port}
        start_options: dict[str, Any] = {}
    else:
        from shoal import serve

        variant = SHOAL_VARIANTS[framework]
        http_options = {"host": HOST, "port": 0, "metrics_port": variant.get("metrics_port", 0)}
        if num_proxies != 1:  # only then: a shoal without the option refuses the key by name
            http_options["num_proxies"] = num_proxies
        start_options = {"logging_config": variant["logging_config"]} if "logging_config" in variant else {}

    @serve.deployment
    class Hello:
        async def __call__(self, request: Any) -> str:
            return "hello"

    options = {}
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    try:
        serve.start(http_options=http_options, **start_options)
        serve.run(Hello.options(**options).bind(), name="hello", route_prefix="/")
        if framework == "ray":
            import ray

            url = f"http://{HOST}:{port}/"
            version = str(ray.__version__)
        else:
            url = serve.get_http_url().rstrip("/") + "/"
            version = package_version("shoal")
        announce(
            {
                "url": url,
                "version": version,
                "python": platform.python_version(),
                "pid": os.getpid(),
                "max_ongoing_requests": max_ongoing_requests,
            }
        )
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        if framework == "ray":
            import ray

            ray.shutdown()
    return 0


def bare_app() -> Any:
    """The Starlette app the bare server runs: the same handler, no framework around it."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/", hello)])


def serve_bare() -> int:
    """uvicorn on a socket bound to port 0 (no race), one worker, uvloop + httptools."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        bare_app(),
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        workers=1,
        log_level="warning",
    )
    server = uvicorn.Server(config)

    on_stdin_eof(lambda: setattr(server, "should_exit", True))
    announce(
        {
            "url": f"http://{HOST}:{port}/",
            "version": (
                f"uvicorn {package_version('uvicorn')}, starlette {package_version('starlette')}, "
                f"uvloop {package_version('uvloop')}, httptools {package_version('httptools')}"
            ),
            "python": platform.python_version(),
            "pid": os.getpid(),
        }
    )
    server.run(sockets=[sock])  # handles SIGTERM/SIGINT itself: graceful stop
    return 0


# ---------------------------------------------------------------- load clients

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """requests/s, p50/p99 (ms), request count, non-2xx/3xx and socket errors from wrk --latency."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if not (rps and total):
        raise ValueError("no Requests/sec in wrk output:\n" + out)
    return {
        "requests_per_s": float(rps.group(1)),
        "p50_ms": wrk_ms(p50.group(1)) if p50 else None,
        "p99_ms": wrk_ms(p99.group(1)) if p99 else None,
        "requests": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": (
            dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups())))
            if sock
            else {}
        ),
    }


def run_wrk(url: str, connections: int, duration_s: float, timeout_s: float) -> dict[str, Any]:
    threads = min(connections, 2)
    # wrk takes whole seconds.
    seconds, timeout = max(1, round(duration_s)), max(1, round(timeout_s))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    cmd += ["--timeout", f"{timeout}s", url]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exit {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    return parse_wrk(proc.stdout)


async def _one_connection(
    host: str,
    port: int,
    path: str,
    latencies_ns: list[int],
    stats: dict[str, int],
    deadline: float,
) -> None:
    """One keep-alive connection sending GETs back to back until the deadline."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    writer = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            start = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip().lower()
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            latencies_ns.append(time.perf_counter_ns() - start)
            if not 200 <= status < 400:
                stats["non2xx"] += 1
            if headers.get("connection") == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            stats["errors"] += 1
            if writer is not None:
                writer.close()
                writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _asyncio_load(url: str, connections: int, duration_s: float) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    host, port, path = parsed.hostname or HOST, parsed.port or 80, parsed.path or "/"
    latencies_ns: list[int] = []
    stats = {"non2xx": 0, "errors": 0}
    deadline = time.perf_counter() + duration_s
    tasks = [
        asyncio.create_task(_one_connection(host, port, path, latencies_ns, stats, deadline))
        for _ in range(connections)
    ]
    # Requests in flight at the deadline are dropped, as wrk does.
    await asyncio.wait(tasks, timeout=duration_s + 0.05)
    count = len(latencies_ns)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cuts = statistics.quantiles(latencies_ns, n=100, method="inclusive") if count > 1 else None
    return {
        "requests_per_s": count / duration_s,
        "p50_ms": cuts[49] / 1e6 if cuts else None,
        "p99_ms": cuts[98] / 1e6 if cuts else None,
        "requests": count,
        "non2xx": stats["non2xx"],
        "socket_errors": {"errors": stats["errors"]} if stats["errors"] else {},
    }


def run_asyncio_client(url: str, connections: int, duration_s: float) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(_asyncio_load(url, connections, duration_s))
    except ImportError:
        return asyncio.run(_asyncio_load(url, connections, duration_s))


# ----------------------------------------------------------------- orchestrator


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time (to tell a reused pid apart)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st:
                stats[int(name)] = st
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


class Server:
    """One target's server process: started, announced, ready, stopped without leftovers."""

    def __init__(self, target: str, python: str, args: argparse.Namespace, scratch: str):
        self.target = target
        self.log_path = os.path.join(scratch, f"{target}-{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        cmd = [python, os.path.abspath(__file__), "--serve", target]
        if args.max_ongoing_requests is not None and target != "bare":
            cmd += ["--max-ongoing-requests", str(args.max_ongoing_requests)]
        if args.num_proxies != 1 and target.startswith("shoal"):
            cmd += ["--num-proxies", str(args.num_proxies)]
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # Ray must start its own local instance
        env.pop("SHOAL_ADDRESS", None)  # shoal too: never a running (shared) instance
        env["SHOAL_RUN_DIR"] = tempfile.mkdtemp(prefix="shoal-run-", dir=scratch)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=scratch,  # never this directory: its http.py would shadow the stdlib's
            start_new_session=True,  # the terminal's Ctrl-C reaches only the orchestrator
        )
        self.lines: list[str] = []
        self.got_line = threading.Event()
        self.reader = threading.Thread(target=self._read_stdout, daemon=True)
        self.reader.start()
        self.info: dict[str, Any] = {}
        self.family: dict[int, int] = {}

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self.got_line.set()
        self.got_line.set()

    def stderr_tail(self, n: int = 12) -> str:
        self.log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().strip().splitlines()
        except OSError:
            return ""
        return "\n    ".join(lines[-n:])

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the announce line, then poll the URL until it answers 200 ``hello``."""
        deadline = time.monotonic() + timeout_s
        while not self.info:
            for line in self.lines:
                if line.startswith(ANNOUNCE):
                    self.info = json.loads(line[len(ANNOUNCE) :])
                    break
            else:
                if self.proc.poll() is not None and self.reader.join(2) is None and not any(
                    line.startswith(ANNOUNCE) for line in self.lines
                ):
                    raise RuntimeError(
                        f"{self.target} server exited {self.proc.returncode} before announcing"
                        f"; stderr tail:\n    {self.stderr_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.target} server did not announce in {timeout_s:.0f} s")
                self.got_line.wait(0.2)
                self.got_line.clear()
        last = "no answer"
        while True:
            try:
                with urllib.request.urlopen(self.info["url"], timeout=2) as resp:
                    body = resp.read()
                    if resp.status == 200 and body == BODY:
                        break
                    last = f"{resp.status} {body[:80]!r}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last = repr(exc)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.target} server exited {self.proc.returncode}; stderr tail:\n"
                    f"    {self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.target} at {self.info['url']} not ready in {timeout_s:.0f} s: {last}"
                )
            time.sleep(0.1)
        self.family.update(descendants(self.proc.pid))

    def stop(self, timeout_s: float) -> list[int]:
        """Graceful stop (stdin EOF, then SIGTERM), then SIGKILL; returns pids killed late."""
        if self.proc.poll() is None:
            self.family.update(descendants(self.proc.pid))
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=min(timeout_s, 5))
        except subprocess.TimeoutExpired:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        # Whatever the server started and did not stop: give it a moment, then kill it.
        end = time.monotonic() + 5
        alive = self._alive()
        while alive and time.monotonic() < end:
            time.sleep(0.2)
            alive = self._alive()
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return alive

    def _alive(self) -> list[int]:
        alive = []
        for pid, start in self.family.items():
            st = _proc_stat(pid)
            if st is not None and st[1] == start:
                alive.append(pid)
        return alive


def measure(url: str, connections: int, args: argparse.Namespace) -> dict[str, Any]:
    if args.client == "wrk":
        return run_wrk(url, connections, args.duration, args.wrk_timeout) | {"client": "wrk"}
    return run_asyncio_client(url, connections, args.duration) | {"client": "asyncio"}


def run_round(
    target: str, python: str, args: argparse.Namespace, scratch: str, k: int
) -> dict[str, Any]:
    """One fresh server for ``target``; every connection count against it."""
    progress(f"{target} round {k + 1}/{args.runs} ({python}) ...")
    server = Server(target, python, args, scratch)
    report: dict[str, Any] = {"target": target, "round": k + 1, "results": {}}
    try:
        started = time.perf_counter()
        server.wait_ready(args.ready_timeout_s)
        report["info"] = server.info
        report["ready_s"] = time.perf_counter() - started
        progress(f"  ready in {report['ready_s']:.1f} s at {server.info['url']}")
        for c in args.connections:
            if args.warmup > 0:
                warm = argparse.Namespace(**vars(args) | {"duration": args.warmup})
                measure(server.info["url"], c, warm)
            result = measure(server.info["url"], c, args)
            report["results"][c] = result
            notes = []
            if result["non2xx"]:
                notes.append(f"{result['non2xx']} non-2xx/3xx")
            errors = {k: v for k, v in result["socket_errors"].items() if v}
            if errors:
                notes.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
            progress(
                f"  {c:>3} conns: {result['requests_per_s']:>9,.0f} req/s  "
                f"p50 {fmt_ms(result['p50_ms'])} ms  p99 {fmt_ms(result['p99_ms'])} ms"
                + (f"  ({'; '.join(notes)})" if notes else ""),
            )
    except Exception as exc:
        report["error"] = str(exc)
        progress(f"  failed: {exc}")
    except KeyboardInterrupt:
        report["interrupted"] = True
        progress("  interrupted: stopping the server ...")
    finally:
        # A second Ctrl-C must not leave the server running: ignore it while stopping.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        started = time.perf_counter()
        try:
            leftovers = server.stop(args.stop_timeout_s)
        finally:
            signal.signal(signal.SIGINT, previous)
        report["stop_s"] = time.perf_counter() - started
        progress(f"  stopped in {report['stop_s']:.1f} s")
        if leftovers:
            report["leftover_pids_killed"] = leftovers
            progress(f"  {target} left {len(leftovers)} process(es) behind; killed them")
    return report


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


def medians(rounds: list[dict[str, Any]], connections: list[int]) -> dict[int, dict[str, Any]]:
    """Per connection count: median and spread of req/s, p50 and p99, and the error counts summed
    over the rounds."""
    out: dict[int, dict[str, Any]] = {}
    for c in connections:
        runs = [r["results"][c] for r in rounds if c in r.get("results", {})]
        if not runs:
            continue
        out[c] = spreads(runs, ("requests_per_s", "p50_ms", "p99_ms")) | {
            "runs": len(runs),
            "non2xx": sum(r["non2xx"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            "socket_errors": sum(sum(r["socket_errors"].values()) for r in runs),
        }
    return out


def wrk_version() -> str:
    try:
        proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "absent"
    m = re.search(r"wrk (\S+)", proc.stdout + proc.stderr)
    return m.group(1) if m else "unknown"


# (key, label, cell format)
FIGURES = (
    ("requests_per_s", "req/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
)
GOALS = {(64, "requests_per_s"): ISSUE11["http_64_vs_bare"], (1, "p50_ms"): ISSUE11["http_1_p50_ms"]}


def fill_table(report: Report, med: dict[str, dict[int, dict[str, Any]]], args: argparse.Namespace) -> None:
    """One row per (connections, figure); a column per target, then shoal / each peer."""
    cols = [t for t in TARGETS if t in args.targets]
    peers = [t for t in ("bare", "ray") if t in cols and "shoal" in cols]
    report.columns = ["conns, figure", *cols, *(f"shoal / {p}" for p in peers), TARGET_HEADER]
    for c in args.connections:
        for key, label, fmt in FIGURES:
            figures = {t: med.get(t, {}).get(c, {}).get(key) for t in cols}
            report.add_row(
                f"{c} conns {label}",
                *(cell(figures[t], fmt) for t in cols),
                *(ratio(figures["shoal"], figures[p]) for p in peers),
                GOALS.get((c, key), ""),
            )
    for t in cols:
        for c, m in med.get(t, {}).items():
            if m["non2xx"] or m["socket_errors"]:
                report.notes.append(
                    f"note: {t} at {c} conns: {m['non2xx']} non-2xx/3xx responses and "
                    f"{m['socket_errors']} socket errors over {m['runs']} run(s) "
                    f"({m['requests']:,} requests)"
                )
    quiet = med.get("shoal-quiet", {}).get(64, {}).get("requests_per_s")
    for variant, what in (("shoal-metrics", "metrics on, access logs off"), ("shoal", "metrics and access logs on")):
        v64 = med.get(variant, {}).get(64, {}).get("requests_per_s")
        if v64 and quiet:
            report.notes.append(
                f"64 conns: {variant} ({what}) is {ratio(v64, quiet)} of shoal-quiet (both off): "
                f"{v64.median:,.0f} vs {quiet.median:,.0f} req/s"
            )


def find_pythons(args: argparse.Namespace, report: Report) -> dict[str, str]:
    """The interpreter of each target: this one, and Ray's from ``shoal_and_ray`` (which puts
    its version, or why it is skipped, in the report)."""
    pythons = {t: sys.executable for t in args.targets if t != "ray"}
    if "ray" not in args.targets:
        report.add_fact("skipped ray", "not in --targets")
    elif ray := shoal_and_ray(args, report).get("ray"):
        pythons["ray"] = ray
    return pythons


def orchestrate(args: argparse.Namespace) -> int:
    report = Report("HTTP hello: shoal, bare uvicorn, Ray Serve", __file__, ("httptools",), args.runs)
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "asyncio"
        if args.client == "asyncio":
            progress("wrk was not found on PATH: using the built-in asyncio client instead")
    elif args.client == "wrk" and not shutil.which("wrk"):
        progress("wrk was not found on PATH (--client wrk)")
        return 2
    client_desc = (
        f"wrk {wrk_version()} -t min(c,2) --latency --timeout {args.wrk_timeout:g}s"
        if args.client == "wrk"
        else "built-in asyncio HTTP/1.1 keep-alive client (wrk absent or not chosen; "
        "one process, so it saturates well below wrk)"
    )
    if "bare" in args.targets:
        report.add_fact("peer bare", "uvicorn + Starlette in one process, this interpreter (versions above)")
    pythons = find_pythons(args, report)
    args.targets = [t for t in args.targets if t in pythons]
    report.add_fact("client", client_desc)

    rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in args.targets}
    failures: dict[str, list[str]] = {}
    scratch = tempfile.mkdtemp(prefix="shoal-bench-http-")
    try:
        for k in range(args.runs):
            for t in args.targets:
                round_report = run_round(t, pythons[t], args, scratch, k)
                if "error" in round_report:
                    failures.setdefault(t, []).append(round_report["error"])
                rounds[t].append(round_report)
                if round_report.get("interrupted"):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        progress("interrupted: servers stopped; partial results follow")
        failures.setdefault("all", []).append("interrupted (Ctrl-C)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = {t: medians(rs, args.connections) for t, rs in rounds.items()}
    limit = args.max_ongoing_requests or "framework default"
    proxies = f"; shoal http_options.num_proxies={args.num_proxies}" if args.num_proxies != 1 else ""
    report.scenario = (
        f"GET / -> 'hello', 1 replica, max_ongoing_requests={limit}{proxies}; "
        f"{args.duration:g} s per run after {args.warmup:g} s warm-up; each round a fresh server "
        "process per target, targets interleaved"
    )
    fill_table(report, med, args)
    report.add_failures(failures)
    if args.json:
        info = {t: next((r["info"] for r in rs if "info" in r), None) for t, rs in rounds.items()}
        summary = {
            "date": report.started,
            "machine": machine(),
            "load_before": report.load_before,
            "load_after": load_average(),
            "client": args.client,
            "client_desc": client_desc,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "max_ongoing_requests": args.max_ongoing_requests,
            "num_proxies": args.num_proxies,
            "info": info,
            "medians": med,
            "rounds": rounds,
        }
        print(json.dumps(summary, default=dataclasses.asdict), flush=True)
    else:
        report.print(args.markdown)
    return 1 if failures else 0


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    # fmt: off
    add("--targets", default="shoal,bare,ray",
        help="comma list of shoal,bare,ray (ray is skipped if no interpreter has it); "
        "shoal-metrics (access logs off) and shoal-quiet (access logs and metrics off) price "
        "what shoal's default metrics and access logs cost")
    add("--connections", default="1,16,64", help="comma list of connection counts")
    add("--duration", type=float, default=10.0, help="seconds per measured run")
    add("--warmup", type=float, default=2.0, help="seconds of load before each measured run")
    add("--max-ongoing-requests", type=int, default=None,
        help="deployment option for shoal and ray (default: the framework's default)")
    add("--wrk-timeout", type=float, default=10.0,
        help="wrk --timeout in seconds: wrk leaves slower responses out of its latency "
        "distribution and counts them as timeouts (its own default is 2)")
    add("--client", choices=("auto", "wrk", "asyncio"), default="auto",
        help="load generator (auto: wrk if on PATH, else the built-in asyncio client)")
    add("--json", action="store_true",
        help="print one JSON line on stdout (progress goes to stderr)")
    add("--ready-timeout-s", type=float, default=180.0,
        help="limit for a server to start and answer")
    add("--stop-timeout-s", type=float, default=60.0,
        help="limit for a server to shut down before it is killed")
    add("--num-proxies", type=int, default=1,
        help="shoal's http_options.num_proxies (passed only when not 1, so the script also runs "
        "against a shoal without that option; Ray keeps its one proxy per node)")
    add("--serve", choices=TARGETS, help=argparse.SUPPRESS)  # internal: be one server
    # fmt: on
    add_common_options(p)
    args = p.parse_args(argv)
    args.targets = comma_list(p, args.targets, TARGETS, "targets")
    check_runs(p, args)
    if args.num_proxies < 1:
        p.error("--num-proxies needs at least 1")
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c]
    except ValueError:
        p.error("--connections takes a comma list of integers")
    if not args.connections or min(args.connections) < 1:
        p.error("--connections needs positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve == "bare":
        return serve_bare()
    if args.serve:
        return serve_framework(args.serve, args.max_ongoing_requests, args.num_proxies)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

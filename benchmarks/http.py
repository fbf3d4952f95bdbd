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

It prints figures and never asserts a threshold. The issue's reference on a 2-core machine at
64 connections: bare uvicorn about 27,000 req/s, Ray Serve 2.60 about 450 req/s, LitServe about
1,200 req/s; shoal's target: at 64 connections at least 35% of the bare figure from the same
run, and p50 at 1 connection at most 0.6 ms.

Run it:

    python benchmarks/http.py                           # shoal, bare, and ray if found
    python benchmarks/http.py --targets shoal,bare --runs 1 --duration 5
    python benchmarks/http.py --connections 64 --max-ongoing-requests 100
    python benchmarks/http.py --json                     # one JSON line on stdout

The script is an orchestrator: each round (``--runs``, default 3) starts every target in a
fresh process of its own (``--serve TARGET``, an internal mode: shoal and bare with this
interpreter, which needs shoal, uvicorn, uvloop and httptools; Ray with ``--ray-python``,
``$SHOAL_BENCH_RAY_PYTHON`` or ``/work/ray-venv/bin/python``), polls its URL until it answers
``hello``, measures every connection count against it, then stops it, so the targets never
share the two cores with each other's idle processes and the rounds spread each target over
the whole run. The table shows the median of the rounds. Servers listen on free ports chosen
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
import datetime
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

from _common import DEFAULT_RAY_PYTHON, HOST, free_port, ray_python

TARGETS = ("shoal", "shoal-metrics", "shoal-quiet", "bare", "ray")
# What the shoal variants turn off, to price metrics and access logs (shoal: both on, the defaults).
SHOAL_VARIANTS = {
    "shoal": {},
    "shoal-metrics": {"logging_config": {"enable_access_log": False}},
    "shoal-quiet": {"logging_config": {"enable_access_log": False}, "metrics_port": None},
}
BODY = b"hello"
ANNOUNCE = "SHOAL_BENCH_SERVER "  # prefix of the child's one line to the orchestrator
REFERENCE = (
    "reference (issue, 2 cores, 64 conns): bare uvicorn ~27,000 req/s, Ray Serve 2.60 ~450, "
    "LitServe ~1,200; shoal target >= 35% of bare, 1-conn p50 <= 0.6 ms"
)


# ------------------------------------------------------------------- server side


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


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


def serve_framework(framework: str, max_ongoing_requests: int | None) -> int:
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


def ray_importable(python: str) -> str | None:
    """None if ``python -c 'import ray.serve'`` works, else why not."""
    try:
        proc = subprocess.run(
            [python, "-c", "import ray.serve"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return None


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


def log(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def run_round(
    target: str, python: str, args: argparse.Namespace, scratch: str, k: int
) -> dict[str, Any]:
    """One fresh server for ``target``; every connection count against it."""
    log(args, f"{target} round {k + 1}/{args.runs} ({python}) ...")
    server = Server(target, python, args, scratch)
    report: dict[str, Any] = {"target": target, "round": k + 1, "results": {}}
    try:
        started = time.perf_counter()
        server.wait_ready(args.ready_timeout_s)
        report["info"] = server.info
        report["ready_s"] = time.perf_counter() - started
        log(args, f"  ready in {report['ready_s']:.1f} s at {server.info['url']}")
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
            log(
                args,
                f"  {c:>3} conns: {result['requests_per_s']:>9,.0f} req/s  "
                f"p50 {fmt_ms(result['p50_ms'])} ms  p99 {fmt_ms(result['p99_ms'])} ms"
                + (f"  ({'; '.join(notes)})" if notes else ""),
            )
    except Exception as exc:
        report["error"] = str(exc)
        log(args, f"  failed: {exc}")
    except KeyboardInterrupt:
        report["interrupted"] = True
        log(args, "  interrupted: stopping the server ...")
    finally:
        # A second Ctrl-C must not leave the server running: ignore it while stopping.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        started = time.perf_counter()
        try:
            leftovers = server.stop(args.stop_timeout_s)
        finally:
            signal.signal(signal.SIGINT, previous)
        report["stop_s"] = time.perf_counter() - started
        log(args, f"  stopped in {report['stop_s']:.1f} s")
        if leftovers:
            report["leftover_pids_killed"] = leftovers
            log(args, f"  {target} left {len(leftovers)} process(es) behind; killed them")
    return report


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


def medians(rounds: list[dict[str, Any]], connections: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for c in connections:
        runs = [r["results"][c] for r in rounds if c in r.get("results", {})]
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            vals = [r[key] for r in runs if r[key] is not None]
            return statistics.median(vals) if vals else None

        out[c] = {
            "requests_per_s": med("requests_per_s"),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
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


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    med = summary["medians"]
    cols = [t for t in TARGETS if t in args.targets]
    print()
    print(f"date      {summary['date']}")
    print(f"nproc     {summary['nproc']}   loadavg {summary['loadavg']:.2f} (at the end)")
    print(f"client    {summary['client_desc']}")
    for t in cols:
        info = summary["info"].get(t)
        if info:
            print(f"{t:<9} {info['version']} on Python {info['python']}")
    limit = args.max_ongoing_requests or "framework default"
    print(
        f"scenario  GET / -> 'hello', 1 replica, max_ongoing_requests={limit}; "
        f"{args.duration:g} s per run after {args.warmup:g} s warm-up; median of "
        f"{args.runs} round(s), each a fresh server process"
    )
    print()
    head = f"{'conns':>5}"
    sub = f"{'':>5}"
    for t in cols:
        head += f" | {t:^26}"
        sub += f" | {'req/s':>9} {'p50 ms':>7} {'p99 ms':>8}"
    if "shoal" in cols and "bare" in cols:
        head += f" | {'shoal/bare':>10}"
        sub += f" | {'%':>10}"
    if "shoal" in cols and "ray" in cols:
        head += f" | {'shoal/ray':>9}"
        sub += f" | {'x':>9}"
    print(head)
    print(sub)
    print("-" * len(sub))
    for c in args.connections:
        row = f"{c:>5}"
        for t in cols:
            m = med.get(t, {}).get(c)
            if m:
                row += (
                    f" | {m['requests_per_s']:>9,.0f} {fmt_ms(m['p50_ms']):>7} "
                    f"{fmt_ms(m['p99_ms']):>8}"
                )
            else:
                row += f" | {'-':>9} {'-':>7} {'-':>8}"
        s = med.get("shoal", {}).get(c)
        if "shoal" in cols and "bare" in cols:
            b = med.get("bare", {}).get(c)
            pct = f"{100 * s['requests_per_s'] / b['requests_per_s']:.0f}%" if s and b else "-"
            row += f" | {pct:>10}"
        if "shoal" in cols and "ray" in cols:
            r = med.get("ray", {}).get(c)
            x = f"{s['requests_per_s'] / r['requests_per_s']:.1f}x" if s and r else "-"
            row += f" | {x:>9}"
        print(row)
    print()
    for t in cols:
        for c, m in med.get(t, {}).items():
            if m["non2xx"] or m["socket_errors"]:
                print(
                    f"note: {t} at {c} conns: {m['non2xx']} non-2xx/3xx responses and "
                    f"{m['socket_errors']} socket errors over {m['runs']} run(s) "
                    f"({m['requests']:,} requests)"
                )
    for line in summary["checks"]:
        print(line)
    print(REFERENCE)


def checks(med: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The issue's two targets as plain statements; never asserted."""
    lines = []
    s64, b64 = med.get("shoal", {}).get(64), med.get("bare", {}).get(64)
    if s64 and b64:
        pct = 100 * s64["requests_per_s"] / b64["requests_per_s"]
        lines.append(
            f"64 conns: shoal is {pct:.0f}% of bare ({s64['requests_per_s']:,.0f} vs "
            f"{b64['requests_per_s']:,.0f} req/s; target >= 35%)"
        )
    quiet64 = med.get("shoal-quiet", {}).get(64)
    for variant, what in (("shoal-metrics", "metrics on, access logs off"), ("shoal", "metrics and access logs on")):
        v64 = med.get(variant, {}).get(64)
        if v64 and quiet64:
            pct = 100 * v64["requests_per_s"] / quiet64["requests_per_s"]
            lines.append(
                f"64 conns: {variant} ({what}) is {pct:.0f}% of shoal-quiet (both off): "
                f"{v64['requests_per_s']:,.0f} vs {quiet64['requests_per_s']:,.0f} req/s"
            )
    s1 = med.get("shoal", {}).get(1)
    if s1 and s1["p50_ms"] is not None:
        lines.append(f"1 conn p50: {s1['p50_ms']:.2f} ms (target <= 0.6 ms)")
    return lines


def orchestrate(args: argparse.Namespace) -> int:
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "asyncio"
        if args.client == "asyncio":
            log(args, "wrk was not found on PATH: using the built-in asyncio client instead")
    elif args.client == "wrk" and not shutil.which("wrk"):
        log(args, "wrk was not found on PATH (--client wrk)")
        return 2
    client_desc = (
        f"wrk {wrk_version()} -t min(c,2) --latency --timeout {args.wrk_timeout:g}s"
        if args.client == "wrk"
        else "built-in asyncio HTTP/1.1 keep-alive client (wrk absent or not chosen; "
        "one process, so it saturates well below wrk)"
    )
    pythons: dict[str, str] = {}
    for t in args.targets:
        if t != "ray":
            pythons[t] = sys.executable
            continue
        py = ray_python(args)
        why = "no Ray interpreter (--ray-python, $SHOAL_BENCH_RAY_PYTHON)" if not py else None
        if py and not why:
            why = ray_importable(py)
            why = f"{py} cannot import ray.serve: {why}" if why else None
        if why:
            log(args, f"skipping ray: {why}")
        else:
            pythons[t] = py  # type: ignore[assignment]
    args.targets = [t for t in args.targets if t in pythons]

    rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in args.targets}
    failed = False
    scratch = tempfile.mkdtemp(prefix="shoal-bench-http-")
    try:
        for k in range(args.runs):
            for t in args.targets:
                report = run_round(t, pythons[t], args, scratch, k)
                failed |= "error" in report
                rounds[t].append(report)
                if report.get("interrupted"):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        log(args, "interrupted: servers stopped; partial results follow")
        failed = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = {t: medians(rs, args.connections) for t, rs in rounds.items()}
    info = {}
    for t, rs in rounds.items():
        for r in rs:
            if "info" in r:
                info[t] = r["info"]
                break
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg()[0],
        "client": args.client,
        "client_desc": client_desc,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "max_ongoing_requests": args.max_ongoing_requests,
        "info": info,
        "medians": med,
        "checks": checks(med),
        "rounds": rounds,
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print_table(summary, args)
    return 1 if failed else 0


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
    add("--runs", type=int, default=3, help="rounds, each a fresh server per target (median)")
    add("--max-ongoing-requests", type=int, default=None,
        help="deployment option for shoal and ray (default: the framework's default)")
    add("--wrk-timeout", type=float, default=10.0,
        help="wrk --timeout in seconds: wrk leaves slower responses out of its latency "
        "distribution and counts them as timeouts (its own default is 2)")
    add("--client", choices=("auto", "wrk", "asyncio"), default="auto",
        help="load generator (auto: wrk if on PATH, else the built-in asyncio client)")
    add("--json", action="store_true",
        help="print one JSON line on stdout (progress goes to stderr)")
    add("--ray-python", help="interpreter with ray[serve] (default: "
        f"$SHOAL_BENCH_RAY_PYTHON, else {DEFAULT_RAY_PYTHON} if present)")
    add("--ready-timeout-s", type=float, default=180.0,
        help="limit for a server to start and answer")
    add("--stop-timeout-s", type=float, default=60.0,
        help="limit for a server to shut down before it is killed")
    add("--serve", choices=TARGETS, help=argparse.SUPPRESS)  # internal: be one server
    # fmt: on
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
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
        return serve_framework(args.serve, args.max_ongoing_requests)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

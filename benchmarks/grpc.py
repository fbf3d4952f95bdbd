"""gRPC unary hello at 1 and 64 calls in flight: shoal's gRPC proxy, a bare grpcio server, Ray Serve.

What it measures: each target answers ``shoalbench.Greeter/SayHello`` (``hello_bench.proto``
in this directory) with ``HelloReply(message="hello " + name)``, from

* bare: a ``grpc.aio`` server in one process with the servicer in it (the same code as the
  deployment's method), the floor any proxy-plus-replica design pays;
* shoal: ``@serve.deployment class Hello: async def SayHello(self, request)``, one replica,
  deployment defaults (``--max-ongoing-requests N`` passes through), behind shoal's gRPC proxy
  (``serve.start(grpc_options={"port": 0, "grpc_servicer_functions": [...]})``);
* ray: the same deployment under Ray Serve's gRPC proxy, when an interpreter with Ray is found.

The stubs are generated when the script runs, with ``grpc_tools.protoc`` from each target's
interpreter (its own protobuf runtime), into a temporary directory put on ``PYTHONPATH`` of the
servers (Ray's proxy imports the servicer function from there, as it must) and of the client.

The load generator is a grpcio asyncio client in processes of its own (``--client-processes``,
default 1), one channel each, keeping N calls in flight (split over the processes) with
``application=hello`` metadata, for ``--duration`` seconds after ``--warmup`` seconds of the
same load; it counts the calls that completed in the measured window and their latency (p50,
p99). The client runs on the same machine and shares its cores with the server under test:
the report gives the cores the client used while measured, and the progress lines (standard
error) the cores each server process used, to tell a saturated client from a saturated server.

Each round (``--runs``, default 3) starts every target in a fresh process (``--serve TARGET``,
an internal mode), waits until it answers, measures every in-flight count against it, then
stops it and whatever it started; targets are interleaved. One table shows the machine, the
versions, the median and spread (min-max) of the rounds, shoal / bare (issue 12's target:
at least 0.40 at 64 in flight) and shoal / ray. A target that cannot serve (shoal built
without gRPC) is named with its error and the others still run. Nothing is asserted.

``--profile`` runs one extra shoal round afterwards, not measured, with ``py-spy record
--threads`` on shoal's proxy (and replica) for the measured window at the largest in-flight
count, and prints where their time goes: the share of each thread, and the top frames on top of
the stack (self) and anywhere in it (inclusive, bootstrap frames left out). Idle threads are
left out, so time in C (uvloop, grpc's Cython core) shows as its Python caller (``Runner.run``
for the event loop, ``Thread.run`` for grpc's poller thread); ``--profile-native`` shows the C
frames, but py-spy then stops the process for each sample (slower; samples waiting in the kernel
are left out). It needs ``py-spy`` (on PATH, next to this Python, or ``--py-spy PATH``) and
ptrace rights.

Run it:

    python benchmarks/grpc.py                                  # shoal, bare, and ray if found
    python benchmarks/grpc.py --targets shoal,bare --runs 1 --duration 5
    python benchmarks/grpc.py --in-flight 64 --client-processes 2
    python benchmarks/grpc.py --targets shoal,bare --runs 1 --profile
    python benchmarks/grpc.py --markdown                       # the table as Markdown

The file is named ``grpc.py``, which would shadow the ``grpc`` package for anything this script
imports; the first lines below take this directory off the front of ``sys.path``, and the
servers take it off entirely (Ray would otherwise give it to its workers).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import collections
import json
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from _common import (
    HOST,
    Report,
    add_common_options,
    cell,
    check_runs,
    comma_list,
    free_port,
    package_version,
    progress,
    ratio,
    shoal_and_ray,
    spreads,
)

if TYPE_CHECKING:
    import psutil  # imported where used: the servers' interpreters (Ray's) may not have it

TARGETS = ("shoal", "bare", "ray")
PROTO = "hello_bench.proto"
PB2 = "hello_bench_pb2"
PB2_GRPC = "hello_bench_pb2_grpc"
SERVICER_FUNCTION = f"{PB2_GRPC}.add_GreeterServicer_to_server"
METHOD = "/shoalbench.Greeter/SayHello"
APP_NAME = "hello"
METADATA = (("application", APP_NAME),)
ANNOUNCE = "SHOAL_BENCH_GRPC_SERVER "  # prefix of a server's one line to the orchestrator
ISSUE12_TARGET = ">= 0.40 of bare at 64 in flight"
TARGET_HEADER = "target (issue 12)"


# ------------------------------------------------------------------------------- stubs


def generate_stubs(python: str, out_dir: str) -> str | None:
    """Generate ``hello_bench_pb2*.py`` into ``out_dir`` with ``python -m grpc_tools.protoc``;
    None when it worked, else why not."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [python, "-m", "grpc_tools.protoc", f"-I{_HERE}", f"--python_out={out_dir}",
           f"--grpc_python_out={out_dir}", os.path.join(_HERE, PROTO)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} -m grpc_tools.protoc: {exc}"
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return f"{python} -m grpc_tools.protoc failed: {why} (pip install grpcio-tools)"
    return None


# --------------------------------------------------------------------------- server side


def announce(info: dict[str, Any]) -> None:
    sys.stdout.write(ANNOUNCE + json.dumps(info) + "\n")
    sys.stdout.flush()


def stop_event() -> threading.Event:
    """Set on SIGTERM/SIGINT or when standard input closes (the orchestrator is done or gone)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except (OSError, ValueError):
            pass
        stop.set()

    threading.Thread(target=watch, daemon=True, name="stdin-eof").start()
    return stop


def serve_bare() -> int:
    """The servicer in a ``grpc.aio`` server bound to port 0, until the stop event."""
    import grpc
    import hello_bench_pb2 as pb2  # type: ignore[import-not-found]
    import hello_bench_pb2_grpc as pb2_grpc  # type: ignore[import-not-found]

    class Greeter(pb2_grpc.GreeterServicer):  # type: ignore[misc]
        async def SayHello(self, request: Any, context: Any) -> Any:
            return pb2.HelloReply(message="hello " + request.name)

    stop = stop_event()

    async def main() -> None:
        server = grpc.aio.server()
        pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        announce({"address": f"{HOST}:{port}", "version": f"grpcio {package_version('grpcio')}",
                  "python": platform.python_version(), "pid": os.getpid()})  # fmt: skip
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(grace=1.0)

    asyncio.run(main())
    return 0


def shoal_grpc_address(serve: Any) -> str:
    """The host:port shoal's gRPC proxy listens on (it was started with port 0)."""
    for name in ("get_grpc_address", "get_grpc_url"):
        getter = getattr(serve, name, None)
        if getter is not None:
            address = getter()
            if not address:
                raise RuntimeError(f"serve.{name}() is {address!r}: shoal serves no gRPC")
            return str(address).removeprefix("grpc://").rstrip("/")
    raise RuntimeError("this shoal does not report its gRPC port (no serve.get_grpc_url())")


def serve_framework(framework: str, max_ongoing_requests: int | None) -> int:
    """shoal or Ray Serve: deploy Hello with a gRPC proxy, announce its address, wait to stop."""
    # Not _HERE on sys.path from here on: Ray would give it to its workers, where this file would
    # shadow the grpc package.
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
    import hello_bench_pb2 as pb2

    stop = stop_event()
    if framework == "ray":
        from ray import serve
        from ray.serve.config import gRPCOptions

        grpc_port = free_port()  # Ray's proxy has no port 0; a tiny race, reported if it bites
        http_options: dict[str, Any] = {"host": HOST, "port": free_port()}
    else:
        from shoal import serve
        from shoal.serve.config import gRPCOptions  # type: ignore[no-redef]

        grpc_port = 0  # shoal picks a free port and reports it (serve.get_grpc_url())
        http_options = {"host": HOST, "port": 0, "metrics_port": 0}
    grpc_options = gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION])

    @serve.deployment
    class Hello:
        async def SayHello(self, request: Any) -> Any:
            return pb2.HelloReply(message="hello " + request.name)

    options = {} if max_ongoing_requests is None else {"max_ongoing_requests": max_ongoing_requests}
    try:
        serve.start(http_options=http_options, grpc_options=grpc_options)
        serve.run(Hello.options(**options).bind(), name=APP_NAME, route_prefix="/")
        if framework == "ray":
            import ray

            address, version = f"{HOST}:{grpc_port}", str(ray.__version__)
        else:
            address, version = shoal_grpc_address(serve), package_version("shoal")
        announce({"address": address, "version": version, "python": platform.python_version(),
                  "pid": os.getpid(), "max_ongoing_requests": max_ongoing_requests})  # fmt: skip
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        if framework == "ray":
            import ray

            ray.shutdown()
    return 0


# ---------------------------------------------------------------------------- the client


async def _load(address: str, in_flight: int, start_at: float, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """``in_flight`` calls kept in flight on one channel from ``start_at`` (``time.time()``, the
    same for every client process); the calls that complete within the measured window (after
    the warm-up) and their latencies."""
    import grpc
    import hello_bench_pb2 as pb2

    latencies_us: list[int] = []
    errors: collections.Counter[str] = collections.Counter()
    request = pb2.HelloRequest(name="bench")
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            METHOD, request_serializer=pb2.HelloRequest.SerializeToString,
            response_deserializer=pb2.HelloReply.FromString,
        )  # fmt: skip
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        start_ns = time.perf_counter_ns()
        window = (start_ns + int(warmup_s * 1e9), start_ns + int((warmup_s + duration_s) * 1e9))

        async def caller() -> None:
            while True:
                t0 = time.perf_counter_ns()
                if t0 >= window[1]:
                    return
                try:
                    await call(request, metadata=METADATA, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                t1 = time.perf_counter_ns()
                if window[0] <= t0 and t1 <= window[1]:
                    latencies_us.append((t1 - t0) // 1000)

        async def cpu_meter() -> float:
            """CPU seconds this process (every thread) used within the measured window."""
            await asyncio.sleep(max(0.0, (window[0] - time.perf_counter_ns()) / 1e9))
            used_s = -cpu_seconds()
            await asyncio.sleep(max(0.0, (window[1] - time.perf_counter_ns()) / 1e9))
            return used_s + cpu_seconds()

        meter = asyncio.create_task(cpu_meter())
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        cpu_s = await meter
    return {"latencies_us": latencies_us, "errors": dict(errors), "duration_s": duration_s, "cpu_s": cpu_s}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_client(args: argparse.Namespace) -> int:
    """The ``--client`` mode: one process of the load generator; one JSON line on stdout."""
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
    result = asyncio.run(_load(args.client, args.client_in_flight, args.client_start_at, args.warmup, args.duration))
    print(json.dumps(result), flush=True)
    return 0


def measure(address: str, in_flight: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """``in_flight`` calls split over ``--client-processes`` client processes run at once;
    req/s over the measured window, p50/p99 of their latencies together, errors by code."""
    procs = min(args.client_processes, in_flight)
    shares = [in_flight // procs + (1 if i < in_flight % procs else 0) for i in range(procs)]
    start_at = time.time() + 2.0  # the client processes start their load together, after importing grpc
    cmds = [[sys.executable, os.path.abspath(__file__), "--client", address, "--client-in-flight", str(n),
             "--client-start-at", repr(start_at), "--warmup", str(args.warmup), "--duration", str(args.duration)]
            for n in shares]  # fmt: skip
    children = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for c in cmds]  # fmt: skip
    latencies: list[int] = []
    cpu_s = 0.0
    errors: collections.Counter[str] = collections.Counter()
    limit_s = 2.0 + args.warmup + args.duration + 60
    for child in children:
        try:
            out, err = child.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            raise RuntimeError(f"the client did not finish in {limit_s:.0f} s") from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            tail = "\n    ".join(err.strip().splitlines()[-8:])
            raise RuntimeError(f"client exit {child.returncode}; stderr tail:\n    {tail}")
        result = json.loads(lines[-1])
        latencies += result["latencies_us"]
        cpu_s += result["cpu_s"]
        errors.update(result["errors"])
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else None
    return {
        "requests_per_s": len(latencies) / args.duration,
        "p50_ms": cuts[49] / 1e3 if cuts else None,
        "p99_ms": cuts[98] / 1e3 if cuts else None,
        "calls": len(latencies),
        "client_cores": cpu_s / args.duration,
        "errors": dict(errors),
    }


# -------------------------------------------------------------------------- orchestrator


class Server:
    """One target's server process: started, announced, answering, stopped without leftovers."""

    def __init__(self, target: str, python: str, args: argparse.Namespace, scratch: str, env: dict[str, str]):
        self.target = target
        self.log_path = os.path.join(scratch, f"{target}-{time.monotonic_ns()}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        cmd = [python, os.path.abspath(__file__), "--serve", target]
        if args.max_ongoing_requests is not None and target != "bare":
            cmd += ["--max-ongoing-requests", str(args.max_ongoing_requests)]
        env = dict(env)
        env.pop("RAY_ADDRESS", None)  # Ray starts its own local instance
        env.pop("SHOAL_ADDRESS", None)  # shoal too: never a running (shared) instance
        env["SHOAL_RUN_DIR"] = tempfile.mkdtemp(prefix="shoal-run-", dir=scratch)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=scratch, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.got_line = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.info: dict[str, Any] = {}
        self.family: set[psutil.Process] = set()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self.got_line.set()
        self.got_line.set()

    def stderr_tail(self, n: int = 12) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "\n    ".join(f.read().strip().splitlines()[-n:])

    def _remember_family(self) -> None:
        import psutil

        try:
            self.family.update(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the announce line, then call SayHello until it answers ``hello ready``."""
        import grpc
        import hello_bench_pb2 as pb2

        deadline = time.monotonic() + timeout_s
        while not self.info:
            found = [line for line in self.lines if line.startswith(ANNOUNCE)]
            if found:
                self.info = json.loads(found[0][len(ANNOUNCE) :])
            elif self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader thread drain stdout
                if not any(line.startswith(ANNOUNCE) for line in self.lines):
                    raise RuntimeError(f"{self.target} server exited {self.proc.returncode} before announcing"
                                       f"; stderr tail:\n    {self.stderr_tail()}")  # fmt: skip
            elif time.monotonic() > deadline:
                raise RuntimeError(f"{self.target} server did not announce in {timeout_s:.0f} s")
            else:
                self.got_line.wait(0.2)
                self.got_line.clear()
        last = "no answer"
        with grpc.insecure_channel(self.info["address"]) as channel:
            call = channel.unary_unary(METHOD, request_serializer=pb2.HelloRequest.SerializeToString,
                                       response_deserializer=pb2.HelloReply.FromString)  # fmt: skip
            while True:
                try:
                    reply = call(pb2.HelloRequest(name="ready"), metadata=METADATA, timeout=2)
                    if reply.message == "hello ready":
                        break
                    last = f"answered {reply.message!r}"
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.target} server exited {self.proc.returncode}; stderr tail:\n"
                                       f"    {self.stderr_tail()}")  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.target} at {self.info['address']} not ready in {timeout_s:.0f} s: {last}")
                time.sleep(0.1)
        self._remember_family()

    def processes(self) -> list[psutil.Process]:
        """The server's process and its descendants now."""
        import psutil

        self._remember_family()
        try:
            return [psutil.Process(self.proc.pid), *sorted(self.family, key=lambda p: p.pid)]
        except psutil.Error:
            return sorted(self.family, key=lambda p: p.pid)

    def stop(self, timeout_s: float) -> list[int]:
        """Graceful stop (stdin EOF, then SIGTERM), then SIGKILL; returns the pids killed late."""
        import psutil

        if self.proc.poll() is None:
            self._remember_family()
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        _gone, alive = psutil.wait_procs(list(self.family), timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()
        return [p.pid for p in alive]


def run_round(target: str, python: str, args: argparse.Namespace, scratch: str, env: dict[str, str],
              k: int, profile: bool = False) -> dict[str, Any]:  # fmt: skip
    """A fresh server for ``target``; every in-flight count against it (with ``profile``, only the
    largest, under py-spy)."""
    progress(f"{target} round {k + 1}/{args.runs} ({python}) ..." if not profile
             else f"{target}: profiling round ...")  # fmt: skip
    server = Server(target, python, args, scratch, env)
    report: dict[str, Any] = {"target": target, "round": k + 1, "results": {}}
    try:
        started = time.perf_counter()
        server.wait_ready(args.ready_timeout_s)
        report["info"] = server.info
        progress(f"  ready in {time.perf_counter() - started:.1f} s at {server.info['address']}")
        if profile:
            report["profile"] = profile_round(server, args, env)
            return report
        for n in args.in_flight:
            before = cpu_by_process(server)
            result = measure(server.info["address"], n, args, args.client_env)
            used = cpu_by_process(server)
            result["server_cores"] = {name: (used[name] - before.get(name, 0.0)) / (args.warmup + args.duration)
                                      for name in used}  # fmt: skip
            report["results"][n] = result
            busy = ", ".join(f"{name} {c:.2f}" for name, c in sorted(result["server_cores"].items()) if c >= 0.05)
            errs = f"\n      cores used: client {result['client_cores']:.2f}, server: {busy}" + (f"  errors {result['errors']}" if result["errors"] else "")
            progress(f"  {n:>3} in flight: {result['requests_per_s']:>8,.0f} req/s  p50 {fmt_ms(result['p50_ms'])} ms  "
                     f"p99 {fmt_ms(result['p99_ms'])} ms{errs}")  # fmt: skip
    except Exception as exc:
        report["error"] = str(exc)
        progress(f"  failed: {exc}")
    except KeyboardInterrupt:
        report["interrupted"] = True
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            leftovers = server.stop(args.stop_timeout_s)
        finally:
            signal.signal(signal.SIGINT, previous)
        if leftovers:
            progress(f"  {target} left {len(leftovers)} process(es) behind; killed them")
    return report


def cpu_by_process(server: Server) -> dict[str, float]:
    """CPU seconds used so far by the server's processes, summed by process name (e.g.
    ``shoal-proxy``, ``shoal-replica``, ``python``, Ray's ``ServeReplica:...``)."""
    import psutil

    out: dict[str, float] = collections.defaultdict(float)
    for p in server.processes():
        try:
            with p.oneshot():
                times = p.cpu_times()
                out[p.name()] += times.user + times.system
        except psutil.Error:
            continue
    return dict(out)


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


# ------------------------------------------------------------------------------ profiling


def profile_round(server: Server, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The largest in-flight load against shoal with ``py-spy record`` on its proxy and its
    replica for the measured window; the top frames of each."""
    import psutil

    py_spy = args.py_spy or shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise RuntimeError("py-spy is not installed (pip install py-spy, or --py-spy PATH)")
    roles: dict[str, int] = {}
    for p in server.processes():
        try:
            name, cmdline = p.name(), " ".join(p.cmdline())
        except psutil.Error:
            continue
        for role in ("proxy", "replica"):
            if role in name or f"shoal-{role}" in cmdline or f"shoal.{role}" in cmdline:
                roles.setdefault(role, p.pid)
    if "proxy" not in roles:
        raise RuntimeError("shoal's proxy process was not found among the server's processes")
    n = max(args.in_flight)
    spies = {}
    for role, pid in roles.items():
        out = os.path.join(os.path.dirname(server.log_path), f"py-spy-{role}-{pid}.txt")
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(args.duration))), "--rate", "250",
               "--format", "raw", "--threads", "--output", out]  # fmt: skip
        # --native needs py-spy to stop the process for each sample (slower); else it reads on the fly.
        cmd.append("--native" if args.profile_native else "--nonblocking")
        spies[role] = (out, cmd)
    result = {}
    load = threading.Thread(target=lambda: result.update(measure(server.info["address"], n, args, args.client_env)))
    load.start()
    time.sleep(2.0 + args.warmup + 0.5)  # py-spy samples the measured window, not the warm-up
    procs = {role: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for role, (out, cmd) in spies.items()}  # fmt: skip
    load.join()
    profile: dict[str, Any] = {"in_flight": n, "requests_per_s": result.get("requests_per_s"), "pids": roles}
    for role, proc in procs.items():
        _, err = proc.communicate(timeout=args.duration + 60)
        out = spies[role][0]
        if not os.path.exists(out):
            profile[role] = {"error": f"py-spy exit {proc.returncode}: {err.strip()[-300:]}"}
            continue
        profile[role] = top_frames(out, args.profile_top)
    return profile


# Top frames of a thread waiting in the kernel (py-spy --native cannot leave them out itself).
WAITING_FRAMES = ("epoll_wait", "epoll_pwait", "poll", "select", "pthread_cond_wait", "pthread_cond_timedwait",
                  "futex_wait", "__futex_abstimed_wait_common", "sem_timedwait", "nanosleep", "clock_nanosleep")
# Frames on (nearly) every stack of their thread, left out of the inclusive list: they say nothing.
BOOTSTRAP_FRAMES = ("multiprocessing/", "threading.py", "asyncio/runners.py", "(<string>", "worker_main.py",
                    "template_main.py", "proxy/main.py")  # fmt: skip


def top_frames(collapsed_path: str, top: int) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``thread (id);frame;frame;... count``, with --threads): the
    samples per thread, and the frames with the most samples on top of the stack (self) and
    anywhere in it (inclusive, by function, the bootstrap frames every stack has left out)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    with open(collapsed_path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            thread = frames.pop(0) if frames[0].startswith(("thread ", "process ")) else "thread (?)"
            frames = [short_frame(fr) for fr in frames] or ["(no Python frame)"]
            if frames[-1].split(" ")[0] in WAITING_FRAMES:  # --native: a thread blocked in the kernel
                waiting += count
                continue
            threads[thread] += count
            total += count
            own[frames[-1]] += count
            for fr in {without_line(fr) for fr in frames}:  # by function: its lines add up
                if not any(marker in fr for marker in BOOTSTRAP_FRAMES):
                    inclusive[fr] += count
    return {"samples": total, "waiting": waiting, "threads": threads.most_common(top), "self": own.most_common(top),
            "inclusive": inclusive.most_common(top)}  # fmt: skip


def without_line(frame: str) -> str:
    """``function (file.py:123)`` -> ``function (file.py)``."""
    head, sep, line = frame.rpartition(":")
    return f"{head})" if sep and line.rstrip(")").isdigit() else frame


def short_frame(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (package/file.py:line)``, shorter paths."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3."):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        where = where.replace(os.path.dirname(_HERE) + "/", "")
    return f"{name} ({where})" if where else name


def print_profile(profile: dict[str, Any], markdown: bool) -> None:
    lines = [f"py-spy on shoal at {profile['in_flight']} in flight "
             f"({fmt_rps(profile.get('requests_per_s'))} req/s while sampled, so lower than unprofiled), "
             f"pids {profile['pids']}:"]  # fmt: skip
    for role in ("proxy", "replica"):
        data = profile.get(role)
        if data is None:
            continue
        if "error" in data:
            lines.append(f"{role}: {data['error']}")
            continue
        total = data["samples"] or 1
        waiting = f", and {data['waiting']} waiting in the kernel, left out" if data.get("waiting") else ""
        lines.append(f"{role}: {data['samples']} samples (threads with work; idle left out{waiting})")
        for kind in ("threads", "self", "inclusive"):
            lines.append(f"  top {kind}:")
            lines += [f"    {100 * c / total:5.1f}%  {fr}" for fr, c in data[kind]]
    print()
    if markdown:
        print("```")
    print("\n".join(lines))
    if markdown:
        print("```")


def fmt_rps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


# ------------------------------------------------------------------------------- report

FIGURES = (("requests_per_s", "req/s", "{:,.0f}"), ("p50_ms", "p50 ms", "{:,.2f}"), ("p99_ms", "p99 ms", "{:,.2f}"))


def medians(rounds: list[dict[str, Any]], in_flight: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for n in in_flight:
        runs = [r["results"][n] for r in rounds if n in r.get("results", {})]
        if runs:
            errors: collections.Counter[str] = collections.Counter()
            for r in runs:
                errors.update(r["errors"])
            keys = [key for key, _, _ in FIGURES] + ["client_cores"]
            out[n] = spreads(runs, keys) | {"runs": len(runs), "errors": dict(errors)}
    return out


def fill_table(report: Report, med: dict[str, dict[int, dict[str, Any]]], targets: list[str],
               in_flight: list[int]) -> None:  # fmt: skip
    cols = [t for t in ("shoal", "bare", "ray") if t in targets]
    peers = [p for p in ("bare", "ray") if p in cols and "shoal" in cols]
    report.columns = ["in flight, figure", *cols, *(f"shoal / {p}" for p in peers), TARGET_HEADER]
    for n in in_flight:
        for key, label, fmt in FIGURES:
            figures = {t: med.get(t, {}).get(n, {}).get(key) for t in cols}
            goal = ISSUE12_TARGET if (n == 64 and key == "requests_per_s") else ""
            report.add_row(f"{n} in flight {label}", *(cell(figures[t], fmt) for t in cols),
                           *(ratio(figures["shoal"], figures[p]) for p in peers), goal)  # fmt: skip
    busy = [f"{t} at {n} in flight {m['client_cores'].median:.2f}" for t in cols for n, m in med.get(t, {}).items()
            if "client_cores" in m]  # fmt: skip
    if busy:
        report.notes.append(f"client CPU while measured (cores of {os.cpu_count()}, median): "
                            + ", ".join(busy))  # fmt: skip
    for t in cols:
        for n, m in med.get(t, {}).items():
            if m["errors"]:
                report.notes.append(f"note: {t} at {n} in flight: failed calls by code over {m['runs']} run(s): "
                                    f"{m['errors']}")  # fmt: skip


def orchestrate(args: argparse.Namespace) -> int:
    report = Report("gRPC unary hello: shoal, bare grpcio, Ray Serve", __file__,
                    ("grpcio", "grpcio-tools", "protobuf"), args.runs)  # fmt: skip
    pythons = {t: sys.executable for t in args.targets if t != "ray"}
    if "ray" not in args.targets:
        report.add_fact("skipped ray", "not in --targets")
    elif ray := shoal_and_ray(args, report).get("ray"):
        pythons["ray"] = ray
    targets = [t for t in args.targets if t in pythons]
    if "bare" in targets:
        report.add_fact("peer bare", "grpc.aio server with the servicer in one process, this interpreter")
    report.add_fact("client", f"grpcio asyncio client, {args.client_processes} process(es) of this interpreter, one "
                    "channel each, on the same machine: it shares the cores with the server under test")  # fmt: skip

    scratch = tempfile.mkdtemp(prefix="shoal-bench-grpc-")
    rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    failures: dict[str, list[str]] = {}
    unavailable: dict[str, str] = {}
    profile: dict[str, Any] | None = None
    try:
        # Stubs per interpreter (each with its own protobuf runtime); this one's for the client.
        stub_dirs: dict[str, str] = {}
        envs: dict[str, dict[str, str]] = {}
        for python in dict.fromkeys([sys.executable, *pythons.values()]):
            stubs = os.path.join(scratch, f"stubs-{len(stub_dirs)}")
            why = generate_stubs(python, stubs)
            if why is not None:
                if python == sys.executable:
                    raise SystemExit(why)
                for t in targets:
                    if pythons[t] == python:
                        unavailable[t] = why
                continue
            stub_dirs[python] = stubs
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (stubs, env.get("PYTHONPATH")) if p)
            envs[python] = env
        sys.path.insert(0, stub_dirs[sys.executable])  # for the readiness check
        args.client_env = envs[sys.executable]  # the client runs with this interpreter, whatever the target
        for k in range(args.runs):
            for t in targets:
                if t in unavailable:
                    continue
                r = run_round(t, pythons[t], args, scratch, envs[pythons[t]], k)
                if r.get("interrupted"):
                    raise KeyboardInterrupt
                if "error" in r:
                    if t == "shoal" and not rounds[t] and "before announcing" in r["error"]:
                        # A shoal without a gRPC proxy refuses the servicer functions at start.
                        lines = [line.strip() for line in r["error"].strip().splitlines()]
                        last = next((line for line in reversed(lines) if "rror" in line and not
                                     line.startswith(("File ", "For further"))), lines[-1])  # fmt: skip
                        unavailable[t] = f"shoal's gRPC proxy is not available in this shoal: {last}"
                    failures.setdefault(t, []).append(r["error"])
                else:
                    rounds[t].append(r)
        if args.profile and "shoal" in targets and "shoal" not in unavailable:
            r = run_round("shoal", pythons["shoal"], args, scratch, envs[pythons["shoal"]], args.runs, profile=True)
            profile = r.get("profile")
            if profile is None:
                failures.setdefault("profile", []).append(r.get("error", "no profile"))
    except KeyboardInterrupt:
        progress("interrupted: servers stopped; partial results follow")
        failures.setdefault("all", []).append("interrupted (Ctrl-C)")
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            progress(f"kept {scratch}")

    med = {t: medians(rs, args.in_flight) for t, rs in rounds.items()}
    for t, why in unavailable.items():
        report.notes.append(f"{t}: not measured: {why}")
        failures.pop(t, None)
    limit = args.max_ongoing_requests or "framework default"
    report.scenario = (
        f"unary SayHello -> 'hello <name>' with metadata application={APP_NAME}, 1 replica, "
        f"max_ongoing_requests={limit}; {args.duration:g} s per run after {args.warmup:g} s of the same load; "
        "each round a fresh server process per target, targets interleaved"
    )
    fill_table(report, med, targets, args.in_flight)
    report.add_failures(failures)
    report.print(args.markdown)
    if profile is not None:
        print_profile(profile, args.markdown)
    return 1 if failures else 0


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = p.add_argument
    add("--targets", default="shoal,bare,ray", help="comma list of shoal,bare,ray (ray is skipped if no "
        "interpreter has it; shoal is named and skipped if it has no gRPC proxy)")  # fmt: skip
    add("--in-flight", default="1,64", help="comma list of calls kept in flight (default 1,64)")
    add("--duration", type=float, default=10.0, help="seconds per measured run")
    add("--warmup", type=float, default=2.0, help="seconds of the same load before each measured run")
    add("--client-processes", type=int, default=1, help="client processes sharing the calls in flight (default 1)")
    add("--max-ongoing-requests", type=int, default=None,
        help="deployment option for shoal and ray (default: the framework's default)")
    add("--ready-timeout-s", type=float, default=180.0, help="limit for a server to start and answer")
    add("--stop-timeout-s", type=float, default=60.0, help="limit for a server to stop before it is killed")
    add("--profile", action="store_true", help="one more shoal round under py-spy: where its proxy's time goes")
    add("--py-spy", help="the py-spy executable for --profile (default: on PATH, else next to this Python)")
    add("--profile-native", action="store_true",
        help="py-spy --native: C and Cython frames too (grpc's core), stopping the process per sample")
    add("--profile-top", type=int, default=15, help="frames listed per profile table (default 15)")
    add("--keep-scratch", action="store_true", help="keep the temporary directory (stubs, logs, py-spy output)")
    add("--serve", choices=TARGETS, help=argparse.SUPPRESS)  # internal: be one server
    add("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # internal: be one client process
    add("--client-in-flight", type=int, default=1, help=argparse.SUPPRESS)
    add("--client-start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    add_common_options(p)
    args = p.parse_args(argv)
    args.targets = comma_list(p, args.targets, TARGETS, "targets")
    check_runs(p, args)
    try:
        args.in_flight = [int(n) for n in args.in_flight.split(",") if n]
    except ValueError:
        p.error("--in-flight takes a comma list of integers")
    if not args.in_flight or min(args.in_flight) < 1:
        p.error("--in-flight needs positive integers")
    if args.client_processes < 1:
        p.error("--client-processes needs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return run_client(args)
    if args.serve == "bare":
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
        return serve_bare()
    if args.serve:
        return serve_framework(args.serve, args.max_ongoing_requests)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

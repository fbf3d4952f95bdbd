"""Lifecycle figures: start to first 200, memory of the process tree, scale from zero, load step.

What it measures (medians of ``--runs`` runs; prints figures, never asserts thresholds):

* start: seconds from launching ``shoal run examples.hello:app`` to the first HTTP 200 on ``/``;
  with ``--ray-python`` (or /work/ray-venv), the same for ``serve run`` of the same app on Ray;
* memory: processes and summed memory of the whole process tree serving that app, after the
  first 200: RSS (shared pages counted in every process), PSS (shared pages divided among the
  processes: the tree's real footprint) and USS (pages unique to each process);
* scale from zero: seconds from a request arriving at a deployment with zero replicas
  (``min_replicas=0``) to its response;
* load step: seconds from a step of 4 concurrent requests to 4 replicas serving
  (``target_ongoing_requests=1``, ``upscale_delay_s=0``).

The issue's targets: start to first 200 at most 1.5 s, the whole tree at most 200 MiB, scale from
zero to first response at most 1 s. Ray Serve 2.60 here: 7.6 s to first 200, 25 processes, ~2 GiB.

    python benchmarks/lifecycle.py                 # shoal, and Ray if its venv is found
    python benchmarks/lifecycle.py --runs 5 --no-ray
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import datetime
import platform
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from _common import free_port, ray_python

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# The same example app, spelled for Ray.
RAY_APP = (ROOT / "examples" / "hello.py").read_text().replace("from shoal", "from ray")


def wait_for_200(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Seconds until ``url`` answers 200 (polled every 10 ms), or raise."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")


def tree_memory(root_pid: int) -> tuple[int, float, float, float]:
    """(processes, RSS, PSS, USS in MiB) of ``root_pid`` and its descendants.

    RSS counts shared pages (the interpreter, shared libraries) once per process; PSS divides
    them among the processes sharing them, so its sum is the tree's real footprint; USS counts
    only pages no other process maps."""
    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = uss = 0
    count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        count += 1
        rss += info.rss
        pss += info.pss
        uss += info.uss
    return count, rss / MIB, pss / MIB, uss / MIB


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (Ctrl-C: drain and exit), then SIGKILL of the whole group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_run(framework: str, python: str, workdir: Path) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ)
    if framework == "shoal":
        env["SHOAL_RUN_DIR"] = str(workdir / "run")
        Path(env["SHOAL_RUN_DIR"]).mkdir(mode=0o700, exist_ok=True)
        cmd = [str(Path(python).parent / "shoal"), "run", "examples.hello:app", "--port", str(port)]
        cwd = ROOT
    else:
        (workdir / "ray_hello.py").write_text(RAY_APP)
        env.pop("RAY_ADDRESS", None)
        env["RAY_SERVE_DEFAULT_HTTP_PORT"] = str(port)
        cmd = [str(Path(python).parent / "serve"), "run", "ray_hello:app"]
        cwd = workdir
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if framework == "ray":
            port = 8000  # `serve run` has no port flag; Ray's default
        seconds = wait_for_200(f"http://127.0.0.1:{port}/", proc, 120)
        count, rss, pss, uss = tree_memory(proc.pid)
    finally:
        stop(proc)
    return {"start_s": seconds, "processes": count, "rss_mib": rss, "pss_mib": pss, "uss_mib": uss}


def scaling_figures(runs: int) -> dict[str, float]:
    """Scale from zero and the load step, in this process (shoal's Python API)."""
    from shoal import serve

    serve.start(http_options={"port": 0})

    @serve.deployment(autoscaling_config={
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 0.5, "downscale_to_zero_delay_s": 0.5,
        "look_back_period_s": 0.5,
    })
    class FromZero:
        def __call__(self) -> str:
            return "ok"

    @serve.deployment(autoscaling_config={
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 0.5, "look_back_period_s": 0.5,
    }, max_ongoing_requests=1)
    class Step:
        async def __call__(self, hold_s: float) -> str:
            await asyncio.sleep(hold_s)
            return "ok"

    def running(app: str, name: str) -> int:
        dep = serve.status().applications[app].deployments[name]
        return dep.replica_states.get("RUNNING", 0)

    zero, step = [], []
    handle = serve.run(FromZero.bind(), name="zero", route_prefix=None)
    step_handle = serve.run(Step.bind(), name="step", route_prefix=None)
    for _ in range(runs):
        while running("zero", "FromZero"):
            time.sleep(0.05)
        started = time.monotonic()
        handle.remote().result(timeout_s=30)
        zero.append(time.monotonic() - started)

        while running("step", "Step") > 1:
            time.sleep(0.05)
        started = time.monotonic()
        held = [step_handle.remote(3.0) for _ in range(4)]
        while running("step", "Step") < 4 and time.monotonic() - started < 30:
            time.sleep(0.02)
        step.append(time.monotonic() - started)
        for response in held:
            response.result(timeout_s=30)
    serve.shutdown()
    return {"scale_from_zero_s": statistics.median(zero), "step_to_4_replicas_s": statistics.median(step)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ray-python", default=os.environ.get("SHOAL_BENCH_RAY_PYTHON"))
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    ray_interpreter = ray_python(args)

    results: dict[str, list[dict[str, Any]]] = {"shoal": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            results["shoal"].append(start_run("shoal", sys.executable, Path(tmp)))
            if ray_interpreter:
                results["ray"].append(start_run("ray", ray_interpreter, Path(tmp)))
    scaling = scaling_figures(args.runs)

    def med(framework: str, key: str) -> float | None:
        values = [r[key] for r in results[framework]]
        return statistics.median(values) if values else None

    print(f"# lifecycle, {datetime.date.today()}, {os.cpu_count()} cores, Python {platform.python_version()}, median of {args.runs}")
    print(f"{'metric':34} {'shoal':>10} {'ray':>10}")
    for key, label, fmt in (
        ("start_s", "start to first 200 (s)", "{:.2f}"),
        ("processes", "processes in the tree", "{:.0f}"),
        ("rss_mib", "tree RSS (MiB)", "{:.0f}"),
        ("pss_mib", "tree PSS (MiB)", "{:.0f}"),
        ("uss_mib", "tree USS (MiB)", "{:.0f}"),
    ):
        s, r = med("shoal", key), med("ray", key)
        print(f"{label:34} {fmt.format(s):>10} {fmt.format(r) if r is not None else '-':>10}")
    print(f"{'scale from zero to response (s)':34} {scaling['scale_from_zero_s']:>10.2f} {'-':>10}")
    print(f"{'load step to 4 replicas (s)':34} {scaling['step_to_4_replicas_s']:>10.2f} {'-':>10}")
    print("targets: start <= 1.5 s, tree <= 200 MiB, scale from zero <= 1 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lifecycle figures: start to first 200, memory of the process tree, scale from zero, load step.

What it measures (medians of ``--runs`` runs; prints figures, never asserts thresholds):

* start: seconds from launching ``shoal run examples.hello:app`` to the first HTTP 200 on ``/``;
  with ``--ray-python`` (or /work/ray-venv), the same for ``serve run`` of the same app on Ray;
* memory: processes and summed memory of the whole process tree serving that app, one second
  after the first 200 (the steady state): RSS (shared pages counted in every process), PSS (shared pages divided among the
  processes: the tree's real footprint) and USS (pages unique to each process);
* scale from zero: seconds from a request arriving at a deployment with zero replicas
  (``min_replicas=0``) to its response;
* load step: seconds from a step of 4 concurrent requests to 4 replicas serving
  (``target_ongoing_requests=1``, ``upscale_delay_s=0``).

Issue 11's targets, printed next to the figures (measured on a faster machine): start to first
200 at most 0.40 s, the tree's PSS at most 100 MiB. Ray Serve 2.60 here: 7.6 s to first 200, 25
processes, ~2 GiB. Ray runs only the start and memory figures (the scaling figures use shoal's
Python API); a skipped Ray is named with the reason. One table: the machine, the versions, the
median and spread (min-max) of the runs.

    python benchmarks/lifecycle.py                 # shoal, and Ray if its venv is found
    python benchmarks/lifecycle.py --runs 5 --no-ray
    python benchmarks/lifecycle.py --markdown      # the table as Markdown
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import asyncio
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from _common import (
    ISSUE11,
    TARGET_HEADER,
    Figures,
    Report,
    add_common_options,
    cell,
    check_runs,
    free_port,
    progress,
    ratio,
    shoal_and_ray,
    spreads,
)

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


SETTLE_S = 1.0  # memory is taken this long after the first 200


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
        time.sleep(SETTLE_S)  # the serving tree's steady state (`shoal run` swaps itself for a small process)
        count, rss, pss, uss = tree_memory(proc.pid)
    finally:
        stop(proc)
    return {"start_s": seconds, "processes": count, "rss_mib": rss, "pss_mib": pss, "uss_mib": uss}


def scaling_figures(runs: int) -> list[Figures]:
    """Scale from zero and the load step, ``runs`` times each, in this process (shoal's Python
    API)."""
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

    figures: list[Figures] = []
    handle = serve.run(FromZero.bind(), name="zero", route_prefix=None)
    step_handle = serve.run(Step.bind(), name="step", route_prefix=None)
    for _ in range(runs):
        while running("zero", "FromZero"):
            time.sleep(0.05)
        started = time.monotonic()
        handle.remote().result(timeout_s=30)
        zero_s = time.monotonic() - started

        while running("step", "Step") > 1:
            time.sleep(0.05)
        started = time.monotonic()
        held = [step_handle.remote(3.0) for _ in range(4)]
        while running("step", "Step") < 4 and time.monotonic() - started < 30:
            time.sleep(0.02)
        figures.append({"scale_from_zero_s": zero_s, "step_to_4_replicas_s": time.monotonic() - started})
        for response in held:
            response.result(timeout_s=30)
    serve.shutdown()
    return figures


# (key, label, cell format, target)
ROWS = (
    ("start_s", "start to first 200 (s)", "{:.2f}", ISSUE11["start_s"]),
    ("processes", "processes in the tree", "{:.0f}", ""),
    ("rss_mib", "tree RSS (MiB)", "{:,.0f}", ""),
    ("pss_mib", "tree PSS (MiB)", "{:,.0f}", ISSUE11["tree_pss_mib"]),
    ("uss_mib", "tree USS (MiB)", "{:,.0f}", ""),
    ("scale_from_zero_s", "scale from zero to response (s)", "{:.2f}", ""),
    ("step_to_4_replicas_s", "load step to 4 replicas (s)", "{:.2f}", ""),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    args = parser.parse_args()
    check_runs(parser, args)
    report = Report("start, memory and scaling", __file__, ("psutil",), args.runs)
    pythons = shoal_and_ray(args, report)

    results: dict[str, list[Figures]] = {name: [] for name in pythons}
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            for name, python in pythons.items():
                progress(f"{name} start {k + 1}/{args.runs} ({python}) ...")
                try:
                    results[name].append(start_run(name, python, Path(tmp)))
                except (RuntimeError, TimeoutError) as exc:
                    progress(f"  failed: {exc}")
                    failures.setdefault(name, []).append(str(exc))
    progress(f"shoal scaling x {args.runs} ...")
    results["shoal"] += scaling_figures(args.runs)

    med = {name: spreads(runs, [row[0] for row in ROWS]) for name, runs in results.items()}
    names = list(pythons)
    report.scenario = (
        "`shoal run examples.hello:app` (Ray: `serve run` of the same app) to the first 200 on /, "
        "then the memory of its process tree; scaling: shoal's Python API, min_replicas=0 and a "
        "step of 4 concurrent requests (target_ongoing_requests=1, upscale_delay_s=0)"
    )
    report.columns = ["metric", *names, *(f"shoal / {n}" for n in names[1:]), TARGET_HEADER]
    for key, label, fmt, target in ROWS:
        figures = {n: med[n].get(key) for n in names}
        report.add_row(label, *(cell(figures[n], fmt) for n in names),
                       *(ratio(figures["shoal"], figures[n]) for n in names[1:]), target)
    return report.finish(args.markdown, failures)


if __name__ == "__main__":
    sys.exit(main())

"""Warm start: how soon a new replica serves after the controller decided to start it, for an
app whose module import takes ``--import-s`` seconds (numpy, if installed, then a sleep), with
replicas forked from a warm template (``SHOAL_WORKER_START=fork``, the default) against spawned
ones (``SHOAL_WORKER_START=spawn``).

Two scenarios, each in a fresh instance per run (fork and spawn runs interleaved, medians):

- from zero: a deployment with ``min_replicas=0`` (its template, if any, is already warm: the
  benchmark waits for the template's import, as an app deployed earlier would have), one call
  through a handle. Figures: decision -> READY and decision -> the call's answer;
- 1 -> 4: ``min_replicas=1``, 8 calls held for 2 s with ``target_ongoing_requests=1`` make the
  autoscaler start 3 replicas at once. Figure: decision -> the first new replica READY (from then
  on it is routable), and -> the last.

The decision's time is the replica's ``start_time_s`` in the instance's status (the controller's
clock when it planned the start), READY its ``ready_time_s``; both wall-clock seconds on this
machine, so they compare with the client's clock. The app's module appends the importing
process's pid to a marker file after its sleep: the table says how many processes paid the import.

Issue 11's target, printed next to the figures (measured on a faster machine): the first new
replica serving less than 150 ms after the decision. One table: the machine, the versions, the
median and spread (min-max) of the runs; nothing is asserted.

    python benchmarks/warm_start.py [--runs 3] [--import-s 1.0]
    python benchmarks/warm_start.py --markdown     # the table as Markdown
"""

from __future__ import annotations

import os
import sys

# benchmarks/http.py would shadow the standard library's http package for a script run from here.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE] + [_HERE]  # _common, last

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import _common as common

ROOT = Path(__file__).resolve().parent.parent

APP = textwrap.dedent(
    '''
    import asyncio, os, time
    try:
        import numpy  # noqa: F401  (a real import, as an app would have)
    except ImportError:
        pass
    time.sleep(float(os.environ.get("WARM_BENCH_IMPORT_S", "1.0")))
    if os.environ.get("WARM_BENCH_MARKER"):
        with open(os.environ["WARM_BENCH_MARKER"], "a") as f:
            f.write(f"{os.getpid()}\\n")

    from shoal import serve

    @serve.deployment(autoscaling_config={
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 600, "look_back_period_s": 0.5,
    })
    class FromZero:
        def __call__(self) -> int:
            return os.getpid()

    @serve.deployment(autoscaling_config={
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
        "upscale_delay_s": 0, "downscale_delay_s": 600, "look_back_period_s": 0.5,
    }, max_ongoing_requests=2)
    class Step:
        async def __call__(self, hold_s: float) -> int:
            await asyncio.sleep(hold_s)
            return os.getpid()
    '''
)


def _raw_status() -> dict[str, Any]:
    from shoal.runtime import client

    rt = client.current_runtime()
    assert rt is not None
    reply, _ = rt.call_sync("status")
    return dict(reply["status"])


def _replicas(app: str, name: str) -> list[dict[str, Any]]:
    app_status = _raw_status()["applications"].get(app)
    return list(app_status["deployments"][name]["replicas"]) if app_status else []


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(what)


def child(workdir: Path, marker: Path) -> common.Figures:
    """One run in this process (a fresh instance): both scenarios."""
    sys.path.insert(0, str(workdir))
    import warm_bench_app as bench  # the driver pays the import once (not measured)

    from shoal import serve

    serve.start(http_options={"port": 0})
    result: common.Figures = {}
    try:
        handle = serve.run(bench.FromZero.bind(), name="zero", route_prefix=None)
        if os.environ.get("SHOAL_WORKER_START", "fork") == "fork":
            # An app deployed a while ago has a warm template: wait for its import to end.
            _wait(lambda: _imports(marker) >= 2, 60, "the template's import")  # the driver's, then its
        sent = time.time()
        pid = handle.remote().result(timeout_s=60)
        answered = time.time()
        (replica,) = _wait(lambda: [r for r in _replicas("zero", "FromZero") if r.get("ready_time_s")], 10, "ready")
        result["zero_ready_ms"] = (replica["ready_time_s"] - replica["start_time_s"]) * 1000
        result["zero_answer_ms"] = (answered - replica["start_time_s"]) * 1000
        result["zero_client_ms"] = (answered - sent) * 1000
        result["zero_method"] = replica.get("start_method", "")
        assert replica["pid"] == pid

        step = serve.run(bench.Step.bind(), name="step", route_prefix=None)
        (first,) = _replicas("step", "Step")
        if os.environ.get("SHOAL_WORKER_START", "fork") == "fork":
            _wait(lambda: _imports(marker) >= 3, 60, "the second template's import")
        held = [step.remote(2.0) for _ in range(8)]
        new = _wait(
            lambda: (lambda rs: rs if len(rs) >= 3 and all(r.get("ready_time_s") for r in rs) else None)(
                [r for r in _replicas("step", "Step") if r["replica_id"] != first["replica_id"]]
            ),
            60, "3 new replicas ready",
        )
        for response in held:
            response.result(timeout_s=60)
        ready_ms = sorted((r["ready_time_s"] - r["start_time_s"]) * 1000 for r in new)
        result["step_first_ms"] = ready_ms[0]
        result["step_last_ms"] = ready_ms[-1]
        result["step_methods"] = sorted({r.get("start_method", "") for r in new})
        result["imports"] = _imports(marker) - 1  # less the driver's
        result["processes"] = _tree_size()
    finally:
        serve.shutdown()
    return result


def _imports(marker: Path) -> int:
    """How many processes finished importing the app (pids in the marker file)."""
    return len(marker.read_text().split()) if marker.exists() else 0


def _tree_size() -> int:
    import psutil

    return len(psutil.Process().children(recursive=True))


def run_child(mode: str, import_s: float) -> common.Figures:
    """One run (``child``) in a fresh process with ``SHOAL_WORKER_START=mode``: its figures, or
    ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "warm_bench_app.py").write_text(APP)
        run_dir = workdir / "run"
        run_dir.mkdir(mode=0o700)
        marker = workdir / "imported"
        env = {
            **os.environ, "SHOAL_WORKER_START": mode, "SHOAL_RUN_DIR": str(run_dir),
            "WARM_BENCH_IMPORT_S": str(import_s), "WARM_BENCH_MARKER": str(marker),
        }
        env.pop("SHOAL_ADDRESS", None)
        cmd = [sys.executable, __file__, "--child", str(workdir)]
        return common.run_json_child(cmd, 300, env=env, cwd=ROOT)


# (key, label, target)
ROWS = (
    ("zero_ready_ms", "from zero: decision -> READY (ms)", common.ISSUE11["warm_first_ms"]),
    ("zero_answer_ms", "from zero: decision -> answer (ms)", ""),
    ("zero_client_ms", "from zero: call -> answer (ms)", ""),
    ("step_first_ms", "1 -> 4: decision -> first new READY (ms)", common.ISSUE11["warm_first_ms"]),
    ("step_last_ms", "1 -> 4: decision -> last new READY (ms)", ""),
    ("imports", "processes that imported the app", ""),
    ("processes", "processes under the driver at the end", ""),
)
MODES = {"fork": "fork (template)", "spawn": "spawn"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import-s", type=float, default=1.0, help="seconds the app's module import sleeps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    common.add_common_options(parser, peer=False)
    args = parser.parse_args()
    if args.child:
        workdir = Path(args.child)
        print(json.dumps(child(workdir, workdir / "imported")), flush=True)
        return 0
    common.check_runs(parser, args)

    report = common.Report("warm start: forked from a template vs spawned", __file__, ("numpy", "psutil"), args.runs)
    # Interleaved (fork, spawn, fork, ...): a noisy minute hits both.
    results, failures = common.run_each(dict.fromkeys(MODES, sys.executable), args.runs,
                                        lambda python, mode: run_child(mode, args.import_s))
    report.scenario = (
        f"the app's module import takes {args.import_s:g} s (numpy, then a sleep); a fresh instance per run: "
        "one call to a min_replicas=0 deployment, then 8 calls held 2 s scale another from 1 to 4 replicas "
        "(target_ongoing_requests=1, upscale_delay_s=0)"
    )
    med = {mode: common.spreads(runs, [key for key, _, _ in ROWS]) for mode, runs in results.items()}
    report.columns = ["figure", *MODES.values(), "fork / spawn", common.TARGET_HEADER]
    for key, label, target in ROWS:
        figures = {m: med[m].get(key) for m in MODES}
        report.add_row(label, *(common.cell(s) for s in figures.values()), common.ratio(figures["fork"], figures["spawn"]),
                       target)
    for mode, runs in results.items():
        seen = sorted({m for r in runs for m in [r["zero_method"], *r["step_methods"]]})
        report.notes.append(f"{mode}: start methods seen: {', '.join(seen) or '-'}")
    return report.finish(args.markdown, failures)


if __name__ == "__main__":
    sys.exit(main())

"""Pods on one machine: N shoal instances behind a client that spreads requests over them, their
total throughput for N = 1, 2, 3, and the pod-scaling decision deploy/kubernetes' autoscaler
would take from their metrics.

Each instance is what a pod runs: ``shoal run`` on the base's Serve config
(``deploy/kubernetes/base/serve_config.yaml``, the ``examples.hello`` app, JSON logs), changed only
to listen on 127.0.0.1 at ports of its own (HTTP and metrics) and to live in a run directory of
its own (``SHOAL_RUN_DIR``). The client is one ``wrk`` per instance, all at once, the total
connections split evenly (what a round-robin Service does to long-lived connections).

The decision: while a load runs, every instance's ``/metrics`` is scraped a few times; per
trigger of the base's KEDA ScaledObject (``deploy/kubernetes/base/scaledobject.yaml``, read here,
so the numbers are the manifest's), the metric is summed over the instances, and
``benchmarks/_pod_scaling.py`` applies the autoscaler's formula (ceil(total / threshold), the
largest trigger, clamped to the bounds, the HPA's 10% tolerance around the current count). A
heavy load should scale 3 pods up, a light one and no load down to the floor. Each run's decision
uses the median of its scrapes. Nothing is asserted.

    python benchmarks/pods.py                      # 3 runs, 48 connections, 5 s per load
    python benchmarks/pods.py --runs 5 --duration 10 --connections 96 --markdown

Needs ``wrk`` (Debian's ``wrk``). On a 2-core machine N instances share the same two cores, so
expect the total to stay flat (or fall) with N: the figure that matters is the decision.
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
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from _common import (
    Figures,
    Report,
    add_common_options,
    cell,
    check_runs,
    free_port,
    kill_tree,
    progress,
    spreads,
)
from _pod_scaling import Policy, desired_pods, load_policy, sum_metric, wanted_by_trigger

ROOT = Path(_HERE).parent
SERVE_CONFIG = ROOT / "deploy" / "kubernetes" / "base" / "serve_config.yaml"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
SCRAPE_PERIOD_S = 0.5
CURRENT_PODS = 3  # the decision is computed for 3 pods running (N = 3)


@dataclass
class Instance:
    """One ``shoal run`` standing in for a pod."""

    process: subprocess.Popen[bytes]
    http_url: str
    metrics_url: str


def _config_for(http_port: int, metrics_port: int) -> str:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=http_port, metrics_port=metrics_port)
    return yaml.safe_dump(config, sort_keys=False)


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _wait_ready(instance: Instance, log: Path) -> None:
    """Until /-/healthz answers 200 (the app is deployed), as the pod's readiness probe waits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while _get(instance.http_url + "/-/healthz")[0] != 200:
        if instance.process.poll() is not None:
            raise RuntimeError(f"shoal run exited {instance.process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f} s; see {log}")
        time.sleep(0.1)  # a benchmark's poll, not a test's synchronisation


@contextmanager
def instances(count: int, workdir: Path) -> Iterator[list[Instance]]:
    """``count`` instances started together, ready; stopped with SIGTERM (their drain) at the end."""
    started: list[Instance] = []
    logs: list[Path] = []
    try:
        for k in range(count):
            home = workdir / f"pod{k}"
            home.mkdir()
            http_port, metrics_port = free_port(), free_port()
            config = home / "serve_config.yaml"
            config.write_text(_config_for(http_port, metrics_port))
            log = home / "stdout.log"
            logs.append(log)
            env = dict(os.environ, SHOAL_RUN_DIR=str(home / "run"))
            env.pop("SHOAL_ADDRESS", None)
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "shoal.cli", "run", str(config)], cwd=ROOT, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            started.append(Instance(process, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"))
        for instance, log in zip(started, logs):
            _wait_ready(instance, log)
        yield started
    finally:
        for instance in started:
            if instance.process.poll() is None:
                instance.process.terminate()
        for instance in started:
            try:
                instance.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_tree(instance.process)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def _wrk(url: str, connections: int, duration_s: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{duration_s:g}s", "--latency", url + "/"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "requests": float(requests.group(1)) if requests else 0.0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def _load(pods: list[Instance], connections: int, duration_s: float) -> list[dict[str, float]]:
    """One wrk per instance at once, ``connections`` split between them; each one's figures."""
    results: list[dict[str, float]] = [{} for _ in pods]

    def run(k: int, c: int) -> None:
        results[k] = _wrk(pods[k].http_url, c, duration_s) if c else {"requests": 0.0, "rps": 0.0, "errors": 0.0}

    threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(_split(connections, len(pods)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _scrape_totals(pods: list[Instance], policy: Policy) -> dict[str, float]:
    """Each trigger's metric summed over the instances, from one scrape of each."""
    texts = [_get(p.metrics_url)[1] for p in pods]
    return {t.metric: sum(sum_metric(text, t.metric) for text in texts) for t in policy.triggers}


def _decide_under_load(pods: list[Instance], policy: Policy, connections: int, duration_s: float) -> Figures:
    """Run the load, scraping every SCRAPE_PERIOD_S after the first second; the decision on the
    median of the scrapes (and without load: the scrape once the load has stopped)."""
    samples: list[dict[str, float]] = []
    done = threading.Event()

    def scrape() -> None:
        if done.wait(min(1.0, duration_s / 4)):
            return
        while not done.is_set():
            samples.append(_scrape_totals(pods, policy))
            done.wait(SCRAPE_PERIOD_S)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    if connections:
        _load(pods, connections, duration_s)
    else:
        time.sleep(duration_s)  # no load: the metrics of idle instances
    done.set()
    scraper.join()
    totals = {t.metric: statistics.median(s[t.metric] for s in samples) if samples else 0.0 for t in policy.triggers}
    figures: Figures = {f"total {t.metric}": totals[t.metric] for t in policy.triggers}
    for name, wanted in wanted_by_trigger(policy, totals).items():
        figures[f"trigger {name}"] = wanted
    figures["desired pods"] = desired_pods(policy, totals, current_pods=CURRENT_PODS)
    figures["scrapes"] = len(samples)
    return figures


def one_run(args: argparse.Namespace, policy: Policy) -> Figures:
    figures: Figures = {"throughput": {}, "decisions": {}}
    with tempfile.TemporaryDirectory(prefix="shoal-pods-") as tmp:
        for n in args.pods:
            with ExitStack() as stack:
                workdir = Path(tmp) / f"n{n}"
                workdir.mkdir()
                pods = stack.enter_context(instances(n, workdir))
                progress(f"  N={n}: {n} instance(s) ready; warm-up, then {args.duration:g} s at {args.connections} connections")
                _load(pods, args.connections, 1.0)  # warm-up
                per_pod = _load(pods, args.connections, args.duration)
                total_rps = sum(r["rps"] for r in per_pod)
                figures["throughput"][str(n)] = {
                    "total req/s": total_rps,
                    "req/s per instance": total_rps / n,
                    "p50 ms (slowest instance)": max(r["p50_ms"] for r in per_pod),
                    "non-2xx": sum(r["errors"] for r in per_pod),
                }
                if n == CURRENT_PODS:
                    for label, connections in (("heavy", args.heavy), ("light", args.light), ("none", 0)):
                        progress(f"  N={n}: decision under {label} load ({connections} connections)")
                        decision = _decide_under_load(pods, policy, connections, args.duration)
                        decision["connections"] = connections
                        figures["decisions"][label] = decision
    return figures


def report(rep: Report, args: argparse.Namespace, policy: Policy, runs: list[Figures],
           failures: dict[str, list[str]]) -> int:
    rep.add_fact("wrk", "one per instance, connections split evenly; " + (shutil.which("wrk") or "absent"))
    triggers = ", ".join(f"{t.name}: sum({t.metric}) / {t.threshold:g} per pod" for t in policy.triggers)
    rep.add_fact("autoscaler", f"deploy/kubernetes/base/scaledobject.yaml: {triggers}; "
                               f"pods in [{policy.min_pods}, {policy.max_pods}], HPA tolerance 10%")
    rep.scenario = (f"examples.hello with the base's Serve config (Hello x2, Greeter x1, JSON logs) per instance; "
                    f"throughput at {args.connections} connections for {args.duration:g} s after a 1 s warm-up; "
                    f"decisions with {CURRENT_PODS} instances under {args.heavy} / {args.light} / 0 connections, "
                    f"metrics scraped every {SCRAPE_PERIOD_S:g} s")
    rep.columns = ["figure", *[f"N={n}" for n in args.pods]]
    keys = ["total req/s", "req/s per instance", "p50 ms (slowest instance)", "non-2xx"]
    by_n = {str(n): spreads([r["throughput"][str(n)] for r in runs if str(n) in r["throughput"]], keys) for n in args.pods}
    for key in keys:
        fmt = "{:,.2f}" if "ms" in key else "{:,.0f}"
        rep.add_row(key, *[cell(by_n[str(n)].get(key), fmt) for n in args.pods])
    decisions = [r["decisions"] for r in runs if r["decisions"]]
    if decisions:
        rep.add_row("", *["" for _ in args.pods])
        labels = ["heavy", "light", "none"]
        rep.add_row(f"decision with {CURRENT_PODS} pods", *[f"{label} load" for label in labels])
        per_label = {label: spreads([d[label] for d in decisions]) for label in labels}
        row_keys = ["connections"] + [k for k in decisions[0]["heavy"] if k not in ("connections", "scrapes")]
        for key in row_keys:
            fmt = "{:,.1f}" if key.startswith("total") else "{:,.0f}"
            rep.add_row(key, *[cell(per_label[label].get(key), fmt) for label in labels])
        expected = [desired_pods(policy, {t.metric: float(c) for t in policy.triggers[:1]}, CURRENT_PODS)
                    for c in (args.heavy, args.light, 0)]
        rep.add_row("if every connection had a request in a proxy", *[str(e) for e in expected])
        rep.notes.append("'desired pods' is the autoscaler's formula on the median of the scraped totals, with 3 pods "
                         "running: above 3 scales up, below scales down. The last row is the same formula with "
                         "ongoing HTTP requests = the connection count (a closed-loop client's upper bound: "
                         "a request in wrk's or the kernel's hands is not yet in a proxy).")
    rep.add_failures(failures)
    rep.print(args.markdown)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", default="1,2,3", help="instance counts to measure (default 1,2,3; 3 also decides)")
    parser.add_argument("--connections", type=int, default=48, help="total wrk connections for throughput")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--heavy", type=int, default=48, help="connections of the load that should scale up")
    parser.add_argument("--light", type=int, default=6, help="connections of the load that should scale down")
    add_common_options(parser, peer=False)
    args = parser.parse_args()
    check_runs(parser, args)
    args.pods = sorted({int(n) for n in args.pods.split(",") if n})
    if not args.pods or min(args.pods) < 1:
        parser.error("--pods needs instance counts >= 1")
    if shutil.which("wrk") is None:
        parser.error("needs wrk (apt-get install wrk)")
    policy = load_policy()
    rep = Report("Pods: N instances, their throughput and the autoscaler's decision", __file__, ("PyYAML",), args.runs)
    runs: list[Figures] = []
    failures: dict[str, list[str]] = {}
    for k in range(args.runs):
        progress(f"run {k + 1}/{args.runs}")
        try:
            runs.append(one_run(args, policy))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            progress(f"  failed: {exc}")
            failures.setdefault("pods", []).append(str(exc))
    return report(rep, args, policy, runs, failures)


if __name__ == "__main__":
    raise SystemExit(main())

"""What every benchmark script shares: the machine and versions it ran on, the peer it compares
with (Ray Serve from another interpreter), medians with their spread, and the one table it prints.

The scripts import it as ``_common`` with their own directory at the end of ``sys.path`` (after
the standard library, which ``benchmarks/http.py`` would otherwise shadow).

A script's report, in the order it is built::

    parser = argparse.ArgumentParser(...)
    add_common_options(parser)               # --runs (default 3), --markdown, --ray-python, --no-ray
    args = parser.parse_args()
    report = Report("64 MiB arrays", __file__, ("numpy",), args.runs)  # load average before
    ray = find_ray(args)                     # Peer: its interpreter and version, or why skipped
    report.add_peer(ray)
    ... run, collecting one dict of figures per run ...
    s = spreads(runs)                        # key -> Spread(median, low, high, n)
    report.scenario = "what ran, with which options"
    report.columns = ["metric", "shoal", "ray", "shoal / ray", TARGET_HEADER]
    report.add_row("p50 (us)", cell(s["p50_us"]), cell(ray_s.get("p50_us")), ratio(...), ISSUE11["..."])
    report.print(args.markdown)              # load average after; plain text or Markdown

Progress goes to standard error (``progress()``), so standard output is the report alone and
``benchmarks/run_all.py`` can collect the ``--markdown`` tables. Targets are printed next to the
figures under ``TARGET_HEADER``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_RAY_PYTHON = "/work/ray-venv/bin/python"
HOST = "127.0.0.1"
# What every report lists for its own interpreter (a script adds e.g. numpy or httptools).
BASE_PACKAGES = ("shoal", "uvicorn", "starlette", "uvloop", "pyzmq", "msgpack")
TARGET_HEADER = "target (issue 11, measured on a faster machine)"
# Issue 11's targets, printed next to the figures they concern; never asserted.
ISSUE11 = {
    "http_64_vs_bare": ">= 0.50 of bare",
    "http_1_p50_ms": "<= 0.20 ms",
    "handle_p50_async_us": "<= 120 us",
    "handle_p50_sync_us": "<= 200 us",
    "fanout_async": ">= 25,000 calls/s",
    "fanout_sync": ">= 15,000 calls/s",
    "start_s": "<= 0.40 s",
    "tree_pss_mib": "<= 100 MiB",
    "array_64mib_vs_ray": ">= 2x Ray's throughput",
    "array_1mib_ms": "<= 1 ms",
    "warm_first_ms": "< 150 ms after the decision",
}

Figures = dict[str, Any]


def progress(text: str) -> None:
    """A progress line, on standard error (standard output carries the report only)."""
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ options and the child run


def add_common_options(parser: argparse.ArgumentParser, *, runs: int = 3, peer: bool = True) -> None:
    """``--runs`` (median of that many), ``--markdown``, and with ``peer`` ``--ray-python`` and
    ``--no-ray``."""
    add = parser.add_argument
    add("--runs", type=int, default=runs, help=f"runs per target, median and spread (default {runs})")
    add("--markdown", action="store_true", help="print the report as Markdown (for the README)")
    if peer:
        add("--ray-python", help="interpreter with ray[serve] (default: "
            f"$SHOAL_BENCH_RAY_PYTHON, else {DEFAULT_RAY_PYTHON} if present)")  # fmt: skip
        add("--no-ray", action="store_true", help="measure without Ray Serve")


def add_framework_options(parser: argparse.ArgumentParser, frameworks: Sequence[str], timeout_s: float,
                          runs: int = 3) -> None:
    """The options of a script whose children each run one framework in-process and print one
    JSON line (``--framework``, ``--json``, ``--timeout-s``), plus ``add_common_options``."""
    add = parser.add_argument
    add("--framework", choices=frameworks, help="run this one in-process and print its JSON (default: compare)")
    add("--json", action="store_true", help="with --framework: one JSON line, not indented")
    add("--timeout-s", type=float, default=timeout_s, help="limit per child process")
    add_common_options(parser, runs=runs)


def comma_list(parser: argparse.ArgumentParser, text: str, allowed: Iterable[str], what: str) -> list[str]:
    """``text`` split on commas; an item outside ``allowed`` is a usage error naming it."""
    items = [item for item in text.split(",") if item]
    unknown = set(items) - set(allowed)
    if unknown:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))}")
    return items


def check_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runs < 1:
        parser.error("--runs needs at least 1")


def child_or_orchestrate(
    args: argparse.Namespace,
    run_framework: Callable[[argparse.Namespace], Figures],
    orchestrate: Callable[[argparse.Namespace], int],
) -> int:
    """With ``--framework``: run it here and print its figures as JSON; else orchestrate."""
    if args.framework is None:
        return orchestrate(args)
    print(json.dumps(run_framework(args), indent=None if args.json else 2), flush=True)
    return 0


def child_command(script: str, python: str, framework: str, args: argparse.Namespace,
                  options: Iterable[str]) -> list[str]:
    """The command running ``script --framework F --json`` with ``options`` copied from ``args``
    (lists joined by commas, None left out)."""
    cmd = [python, os.path.abspath(script), "--framework", framework, "--json"]
    for name in options:
        value = getattr(args, name)
        if value is not None:
            value = ",".join(value) if isinstance(value, list) else value
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def free_port() -> int:
    """A TCP port free on ``HOST`` now (for servers that cannot bind port 0, like Ray's proxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_json_child(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
                   cwd: str | os.PathLike[str] | None = None) -> Figures:
    """Run ``cmd`` in its own process group (in ``cwd``, with ``env`` or this environment, either
    without ``RAY_ADDRESS``, so Ray starts its own instance) and return the last JSON line it
    printed, or ``{"error": ...}`` saying why not."""
    env = dict(os.environ if env is None else env)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    tail = "\n    ".join(err.strip().splitlines()[-8:])
    return {"error": f"exit {proc.returncode}, no JSON line; stderr tail:\n    {tail}"}


def import_serve(framework: str) -> Any:
    """Return the ``serve`` module of the framework; the only place they differ."""
    if framework == "ray":
        from ray import serve
    else:
        from shoal import serve
    return serve


def framework_version(framework: str) -> str:
    if framework == "ray":
        import ray

        return str(ray.__version__)
    return package_version("shoal")


def run_each(
    pythons: dict[str, str],
    runs: int,
    run_child: Callable[[str, str], Figures],
) -> tuple[dict[str, list[Figures]], dict[str, list[str]]]:
    """Run every target ``runs`` times, interleaved (round 1 of each, then round 2, ...), each
    run a fresh process from ``run_child(python, target)``; return the successful runs per
    target and the errors of the failed ones (for ``Report.add_failures``)."""
    results: dict[str, list[Figures]] = {name: [] for name in pythons}
    failures: dict[str, list[str]] = {}
    for k in range(runs):
        for name, python in pythons.items():
            progress(f"{name} run {k + 1}/{runs} ({python}) ...")
            figures = run_child(python, name)
            if "error" in figures:
                progress(f"  failed: {figures['error']}")
                failures.setdefault(name, []).append(str(figures["error"]))
            else:
                results[name].append(figures)
    return results, failures


def run_each_framework(
    args: argparse.Namespace,
    run_child: Callable[[str, str, argparse.Namespace], Figures],
    median_report: Callable[[list[Figures]], Figures | None],
) -> tuple[dict[str, Figures | None], bool]:
    """The older entry point, kept for scripts written against it: shoal and (when ``find_ray``
    finds it) Ray, ``args.runs`` runs each through ``run_child(python, framework, args)``; the
    ``median_report`` of the successful runs per framework, and whether any run failed."""
    pythons = shoal_and_ray(args, None)
    results, failures = run_each(pythons, args.runs, lambda python, name: run_child(python, name, args))
    return {name: median_report(runs) for name, runs in results.items()}, bool(failures)


# -------------------------------------------------------------------------------- the peer


@dataclass(frozen=True)
class Peer:
    """A framework compared with shoal in the same run: its interpreter and version, or why it
    is skipped (``python`` None)."""

    name: str
    python: str | None
    version: str = ""
    skipped: str = ""


_RAY_PROBE = (
    "import json, platform, ray, ray.serve; "
    "print(json.dumps({'ray': ray.__version__, 'python': platform.python_version()}))"
)


def ray_python(args: argparse.Namespace) -> str | None:
    """The interpreter with ``ray[serve]``: ``--ray-python``, else ``$SHOAL_BENCH_RAY_PYTHON``,
    else ``DEFAULT_RAY_PYTHON`` if it exists; None with ``--no-ray`` or when there is none."""
    if getattr(args, "no_ray", False):
        return None
    path = getattr(args, "ray_python", None) or os.environ.get("SHOAL_BENCH_RAY_PYTHON")
    if path:
        return str(path)
    return DEFAULT_RAY_PYTHON if os.path.exists(DEFAULT_RAY_PYTHON) else None


def find_ray(args: argparse.Namespace) -> Peer:
    """Ray Serve as a peer: the interpreter ``ray_python`` names, checked by importing
    ``ray.serve`` in it (which also gives its version), or the reason it is skipped."""
    if getattr(args, "no_ray", False):
        return Peer("ray", None, skipped="--no-ray")
    python = ray_python(args)
    if python is None:
        return Peer("ray", None, skipped=f"no interpreter with Ray (--ray-python, $SHOAL_BENCH_RAY_PYTHON, {DEFAULT_RAY_PYTHON})")
    try:
        proc = subprocess.run([python, "-c", _RAY_PROBE], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Peer("ray", None, skipped=f"{python}: {exc}")
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return Peer("ray", None, skipped=f"{python} cannot import ray.serve: {why}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return Peer("ray", python, version=f"Ray Serve {found['ray']} on Python {found['python']} ({python})")


def shoal_and_ray(args: argparse.Namespace, report: Report | None) -> dict[str, str]:
    """The interpreters to run: shoal's (this one) and Ray's when ``find_ray`` finds it. The
    report gets Ray's version line, or the line saying why it is skipped (also on stderr)."""
    pythons = {"shoal": sys.executable}
    ray = find_ray(args)
    if report is not None:
        report.add_peer(ray)
    if ray.python:
        pythons["ray"] = ray.python
    else:
        progress(f"skipping ray: {ray.skipped}")
    return pythons


# ----------------------------------------------------------------------- machine and versions


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return None


def machine() -> str:
    """Cores (and how many this process may use), CPU model, memory, OS, in one line."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = memory_gib()
    parts = [f"{os.cpu_count()} cores ({usable} usable)", cpu_model()]
    if mem is not None:
        parts.append(f"{mem:.0f} GiB")
    parts.append(platform.platform(terse=True))
    return ", ".join(parts)


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def versions(packages: Iterable[str]) -> str:
    return ", ".join([f"Python {platform.python_version()}"] + [f"{p} {package_version(p)}" for p in packages])


# ------------------------------------------------------------------------- medians and spread


@dataclass(frozen=True)
class Spread:
    """The median of a figure over runs, with its lowest and highest value."""

    median: float
    low: float
    high: float
    n: int


def spread(values: Iterable[float | None]) -> Spread | None:
    """Median and min-max of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def spreads(runs: Sequence[Figures], keys: Iterable[str] | None = None) -> dict[str, Spread]:
    """``spread`` of each key over the runs (every key of the first run by default; keys whose
    values are not numbers are left out)."""
    if not runs:
        return {}
    names = list(keys) if keys is not None else list(runs[0])
    out = {}
    for key in names:
        values = [r.get(key) for r in runs]
        if all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values):
            s = spread(values)
            if s is not None:
                out[key] = s
    return out


def nested_spreads(runs: Sequence[Figures], key: str,
                   keys: Iterable[str] | None = None) -> dict[str, dict[str, Spread]]:
    """For figures grouped under ``run[key]`` (e.g. ``{"sizes": {"1": {...}, "64": {...}}}``):
    per group, in the order first seen, the ``spreads`` of ``keys`` over the runs that have it."""
    wanted = None if keys is None else list(keys)
    groups: dict[str, list[Figures]] = {}
    for run in runs:
        for name, figures in run.get(key, {}).items():
            groups.setdefault(name, []).append(figures)
    return {name: spreads(group, wanted) for name, group in groups.items()}


def cell(s: Spread | None, fmt: str = "{:,.0f}") -> str:
    """``median (low-high)``; just the median for one run; ``-`` for no figure."""
    if s is None:
        return "-"
    if s.n == 1 or fmt.format(s.low) == fmt.format(s.high):
        return fmt.format(s.median)
    return f"{fmt.format(s.median)} ({fmt.format(s.low)}-{fmt.format(s.high)})"


def ratio(a: Spread | None, b: Spread | None, fmt: str = "{:.3g}") -> str:
    """``a / b`` of the medians, or ``-``."""
    if a is None or b is None or not b.median:
        return "-"
    return fmt.format(a.median / b.median)


# ----------------------------------------------------------------------------------- report


@dataclass
class Report:
    """One script's report: facts about the run, then one table. Created when the script starts
    (the load average before), printed when it ends (the load average after)."""

    title: str
    script: str
    extra_packages: Sequence[str] = ()
    runs: int | None = None
    scenario: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    load_before: str = field(default_factory=load_average)

    def add_fact(self, key: str, value: str) -> None:
        self.facts.append((key, value))

    def add_peer(self, peer: Peer) -> None:
        """A peer's version line, or the line saying it is skipped and why."""
        if peer.python:
            self.add_fact(f"peer {peer.name}", peer.version)
        else:
            self.add_fact(f"skipped {peer.name}", peer.skipped)

    def add_failures(self, failures: dict[str, list[str]]) -> None:
        """A note per target with failed runs: how many, and the first error's first line."""
        for name, errors in failures.items():
            first = (errors[0].strip().splitlines() or ["?"])[0]
            self.notes.append(f"{name}: {len(errors)} run(s) failed, left out of the figures; first error: {first}")

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def add_rows(self, figures: dict[str, Spread], fmt: str) -> None:
        """One row per figure: its name, then its ``cell``."""
        for key, s in figures.items():
            self.add_row(key, cell(s, fmt))

    def finish(self, markdown: bool, failures: dict[str, list[str]]) -> int:
        """Name the failed runs, print the report; the exit status (1 when any run failed)."""
        self.add_failures(failures)
        self.print(markdown)
        return 1 if failures else 0

    def header(self) -> list[tuple[str, str]]:
        lines = [
            ("date", self.started),
            ("machine", machine()),
            ("load avg", f"{self.load_before} before, {load_average()} after (1 / 5 / 15 min)"),
            ("versions", versions([*BASE_PACKAGES, *self.extra_packages])),
            *self.facts,
        ]
        if self.scenario:
            lines.append(("scenario", self.scenario))
        if self.runs is not None:
            lines.append(("figures", f"median of {self.runs} run(s), (min-max) when more than one"))
        return lines

    def render(self, markdown: bool) -> str:
        header = self.header()
        out: list[str] = []
        name = os.path.basename(self.script)
        if markdown:
            out.append(f"### {self.title} (`benchmarks/{name}`)")
            out.append("")
            out += [f"- {key}: {value}" for key, value in header]
            out.append("")
            out += _markdown_table(self.columns, self.rows)
            if self.notes:
                out.append("")
                out += [f"- {note}" for note in self.notes]
        else:
            out.append(f"== {self.title} (benchmarks/{name}) ==")
            out += [f"{key:<12} {value}" for key, value in header]
            out.append("")
            out += _text_table(self.columns, self.rows)
            out += self.notes
        return "\n".join(out)

    def print(self, markdown: bool) -> None:
        print()
        print(self.render(markdown), flush=True)


def _text_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(columns), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)]


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    return [line(columns), rule, *(line(r) for r in rows)]

"""What a deploy is still waiting for, as one line of text: a pure function of a status snapshot
and the clock.

``render(status, apps, started_s, now_s)`` reads the supervisor's status report (the plain dict
``controller.status.render_status`` builds) for the applications being deployed, and returns a
``Line``, for example::

    deploying 'default' (2 s): Model 0/2 up, Ingress 0/1 up
    deploying 'default': Model 0/2 up; constructor of Model still running (5 s)

- An application counts until it is RUNNING or DEPLOY_FAILED (or gone); in it, a deployment
  counts as still starting until it is HEALTHY, and "up" counts its RUNNING replicas of the
  version being deployed, out of its target. With several applications, deployments are
  named ``app/deployment``.
- From ``EXPLAIN_AFTER_S`` into the deploy, the line says what each starting deployment waits
  on, from what the controller already knows (first that applies): a GPU it cannot get; an
  in-place reconfigure still running; a replica that crashed (or failed its health checks) and
  is being replaced; constructors still running (for how long, and how many attempts failed
  before); a constructor that failed and is retried after a backoff; old replicas still
  draining. (A shoal replica is RUNNING once its constructor returned: there is no separate
  first health check to wait for.)
- The line's own clock (seconds since the deploy started) is left out once a reason says for
  how long it has waited, so that the usual line fits 80 columns.
- ``Line.key`` is the text without its clocks: a writer that prints a line per change (output
  that is not a terminal) prints when the key changes, not every second.

Times are wall-clock seconds (``time.time()``), as the report's replica ``start_time_s`` is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXPLAIN_AFTER_S = 3.0  # say what a deploy waits on once it has taken this long
_DONE_APP = ("RUNNING", "DEPLOY_FAILED")
_FINAL_PARENS = re.compile(r"\(([^()]*)\)\s*$")


@dataclass(frozen=True)
class Line:
    """``text``: what to show now ("" once nothing is left to wait for); ``key``: the same
    without its clocks."""

    text: str
    key: str


def render(status: Mapping[str, Any], apps: Sequence[str], started_s: float, now_s: float) -> Line:
    """The progress of deploying ``apps`` ``now_s``, the deploy having started at ``started_s``."""
    return Line(_describe(status, apps, started_s, now_s, clocks=True),
                _describe(status, apps, started_s, now_s, clocks=False))


def _describe(status: Mapping[str, Any], apps: Sequence[str], started_s: float, now_s: float, *, clocks: bool) -> str:
    elapsed_s = now_s - started_s
    explain = elapsed_s >= EXPLAIN_AFTER_S
    applications = status.get("applications") or {}
    waiting = [(name, applications[name]) for name in apps if name in applications]
    waiting = [(name, app) for name, app in waiting if app.get("status") not in _DONE_APP]
    if not waiting:
        return ""
    counts: list[str] = []
    reasons: list[str] = []
    timed = False  # a reason says for how long: the line needs no clock of its own
    for app_name, app in waiting:
        qualify = f"{app_name}/" if len(waiting) > 1 else ""
        for name, d in (app.get("deployments") or {}).items():
            if d.get("status") == "HEALTHY":
                continue
            counts.append(f"{qualify}{name} {_up(d)}/{_target(d)} up")
            reason, has_clock = _reason(qualify + name, d, now_s, clocks) if explain else ("", False)
            if reason:
                reasons.append(reason)
                timed = timed or has_clock
    names = ", ".join(f"'{name}'" for name, _ in waiting)
    head = f"deploying {names}" + (f" ({_seconds(elapsed_s)})" if clocks and not timed else "")
    head += ": " + ", ".join(counts) if counts else ""
    return "; ".join([head, *reasons])


def _reason(name: str, d: Mapping[str, Any], now_s: float, clocks: bool) -> tuple[str, bool]:
    """What deployment ``name`` waits on, from its report ``d`` ("" if nothing is known), and
    whether that says for how long."""
    if d.get("status") == "DEPLOY_FAILED":
        return "", False  # the deploy is about to end with its error
    if d.get("waiting_for_resources"):
        return f"{name} waiting for a GPU ({_detail(d['waiting_for_resources'])})", False
    if d.get("reconfiguring"):
        return f"reconfigure of {name} still running", False
    starting = [r for r in _current(d) if r.get("state") == "STARTING"]
    replaced = _replaced(name, d) if d.get("status") == "UNHEALTHY" else ""
    failed = int(d.get("failed_starts") or 0)
    last_error = _last_line(d.get("last_error") or "")
    if starting:
        started = [float(r["start_time_s"]) for r in starting if r.get("start_time_s") is not None]
        clock = [_seconds(now_s - min(started))] if clocks and started else []
        counted = [f"{len(starting)} replicas"] if len(starting) > 1 else []
        attempts = [f"{failed} failed before: {last_error}"] if failed and last_error else []
        details = ", ".join(counted + clock + attempts)
        constructors = "constructors" if len(starting) > 1 else "constructor"
        running = f"{constructors} of {name} still running" + (f" ({details})" if details else "")
        return (f"{replaced}, {running}" if replaced else running), bool(clock)
    if replaced:
        return replaced, False
    if failed:
        return f"constructor of {name} failed ({last_error or 'no error text'}); retrying", False
    if any(r.get("state") == "STOPPING" for r in d.get("replicas") or []):
        return f"old replicas of {name} still draining", False
    return "", False


def _replaced(name: str, d: Mapping[str, Any]) -> str:
    """An UNHEALTHY deployment's replica being replaced: after a crash or failed health checks."""
    error = str(d.get("last_error") or d.get("message") or "")
    if "died unexpectedly" in error:
        found = _FINAL_PARENS.search(error)
        return f"replica of {name} restarting after a crash" + (f" ({found.group(1)})" if found else "")
    if "unhealthy" in error:
        return f"replica of {name} replaced after failing its health checks"
    return f"replica of {name} being replaced"


def _current(d: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The replicas of the version being deployed (all of them if the report names none)."""
    version = d.get("version")
    return [r for r in d.get("replicas") or [] if version is None or r.get("version") == version]


def _up(d: Mapping[str, Any]) -> int:
    return sum(1 for r in _current(d) if r.get("state") == "RUNNING")


def _target(d: Mapping[str, Any]) -> int:
    target = d.get("target_num_replicas")
    if target is None:  # an older supervisor: the live replicas are the best guess
        return sum(1 for r in d.get("replicas") or [] if r.get("state") in ("STARTING", "RUNNING"))
    return int(target)


def _detail(message: str) -> str:
    """The part of a "waiting for resources" message that says what is missing."""
    detail = message.split("waiting for resources: ", 1)[-1].strip()
    return detail.rstrip(".")


def _last_line(text: str) -> str:
    """The last line of an error (a traceback's last line names the exception)."""
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _seconds(duration_s: float) -> str:
    return f"{max(0, int(duration_s))} s"

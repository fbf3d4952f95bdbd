"""The status report (``serve status``, ``serve.status()``): applications, deployments and
replicas as plain dicts, in the shape ``ServeStatus.from_dict`` reads.

A deployment whose replicas wait for GPUs says so in its message (as long as it has fewer
replicas of its current version than its target).

Beyond what Ray's ``ServeStatus`` has, ``proxy_processes`` lists the HTTP proxy processes, and each deployment carries what a deploy's progress line
(``shoal.serve._progress``) needs: ``version`` (the one being deployed),
``target_num_replicas``, ``failed_starts`` (of that version), ``reconfiguring`` (an in-place config
update is running), ``waiting_for_resources`` (why a replica could not start, "" if nothing
is missing); and each replica its ``start_time_s`` (wall-clock seconds, Ray's name)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from shoal.controller.state import AppState, DeploymentState


def render_status(
    apps: Iterable[AppState],
    proxy_status: str | None,
    target_capacity: float | None = None,
    *,
    wall_s: float | None = None,
    monotonic_s: float | None = None,
    proxies: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``proxy_status`` is the HTTP proxies' status value, None without HTTP; ``proxies`` each
    proxy process's ``index``, ``pid``, ``status`` and ``restarts``; ``target_capacity`` the
    last config file's. ``wall_s`` and ``monotonic_s`` (default: now) are the same instant on
    both clocks: replicas' monotonic start times are reported on the wall clock."""
    wall_offset_s = (time.time() if wall_s is None else wall_s) - (
        time.monotonic() if monotonic_s is None else monotonic_s
    )
    rendered = {
        app.name: {
            "status": app.status.value,
            "message": app.message,
            "last_deployed_time_s": app.deployed_at,
            "deployments": {
                state.name: _deployment(state, wall_offset_s)
                for state in app.deployments.values() if app.deleting or not state.deleting
            },
            "route_prefix": app.route_prefix,
            "ingress": app.ingress,
        }
        for app in apps
    }
    by_node = {"local": proxy_status} if proxy_status is not None else {}
    return {
        "proxies": by_node, "proxy_processes": list(proxies or []), "applications": rendered,
        "target_capacity": target_capacity,
    }


def _deployment(state: DeploymentState, wall_offset_s: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in state.replicas.values():
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return {
        "status": state.status.value,
        "status_trigger": state.trigger.value,
        "replica_states": counts,
        "message": _message(state),
        "replicas": [
            {
                "replica_id": r.replica_id, "state": r.state.value, "pid": r.pid, "version": r.version,
                "start_time_s": r.started_at + wall_offset_s,
                "ready_time_s": r.ready_at + wall_offset_s if r.ready_at is not None else None,
                "start_method": r.start_method,
            }
            for r in state.replicas.values()
        ],
        "restarts": state.restarts,
        "last_error": state.last_error,
        "version": state.version,
        "target_num_replicas": state.target,
        "failed_starts": state.failed_starts,
        "reconfiguring": state.reconfiguring > 0,
        "waiting_for_resources": _waiting(state),
    }


def _message(state: DeploymentState) -> str:
    return "\n".join(m for m in (state.message, _waiting(state)) if m)


def _waiting(state: DeploymentState) -> str:
    return state.resources_wanted if len(state.live(state.version)) < state.target else ""

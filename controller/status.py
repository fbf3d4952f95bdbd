"""The status report (``serve status``, ``serve.status()``): applications, deployments and
replicas as plain dicts, in the shape ``ServeStatus.from_dict`` reads.

A deployment whose replicas wait for GPUs says so in its message (as long as it has fewer
replicas of its current version than its target)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.controller.state import AppState, DeploymentState


def render_status(apps: Iterable[AppState], proxy_status: str | None, target_capacity: float | None = None) -> dict[str, Any]:
    """``proxy_status`` is the proxy's status value, None without HTTP; ``target_capacity`` the
    last config file's."""
    rendered = {
        app.name: {
            "status": app.status.value,
            "message": app.message,
            "last_deployed_time_s": app.deployed_at,
            "deployments": {
                state.name: _deployment(state)
                for state in app.deployments.values() if app.deleting or not state.deleting
            },
            "route_prefix": app.route_prefix,
            "ingress": app.ingress,
        }
        for app in apps
    }
    proxies = {"local": proxy_status} if proxy_status is not None else {}
    return {"proxies": proxies, "applications": rendered, "target_capacity": target_capacity}


def _deployment(state: DeploymentState) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in state.replicas.values():
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return {
        "status": state.status.value,
        "status_trigger": state.trigger.value,
        "replica_states": counts,
        "message": _message(state),
        "replicas": [
            {"replica_id": r.replica_id, "state": r.state.value, "pid": r.pid, "version": r.version}
            for r in state.replicas.values()
        ],
        "restarts": state.restarts,
        "last_error": state.last_error,
    }


def _message(state: DeploymentState) -> str:
    waiting = state.resources_wanted if len(state.live(state.version)) < state.target else ""
    return "\n".join(m for m in (state.message, waiting) if m)

"""The controller's records in Ray's ``ServeInstanceDetails`` shape (``GET /api/serve/applications/``).

``instance_details`` is pure: it reads the records and the instance's facts (``InstanceFacts``)
and returns plain JSON values, field for field as Ray 2.60's controller answers them (with
``exclude_unset``), so Ray's own CLI (``serve status -a``, ``serve shutdown -a``) parses them.

What a single machine has no word for is filled the way Ray fills one node: the node id is
``"local"`` (as ``shoal status`` names the proxy), actor names are Ray's, ``worker_id`` and
``actor_id`` are left out. ``log_file_path`` is the replica's log file relative to the run
directory's ``logs/`` (Ray's is relative to its logs directory). Deployment options are those
the controller runs with (code, config file and defaults merged), in Ray's
``DeploymentSchema`` fields; options shoal keeps that Ray's schema has no field for
(``max_constructor_retry_count``) are left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shoal.controller.state import AppState, DeploymentState, Replica

NODE_ID = "local"
CONTROLLER_ACTOR_NAME = "SERVE_CONTROLLER_ACTOR"  # Ray's names, which its tooling shows
PROXY_ACTOR_NAME = "SERVE_PROXY_ACTOR"
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA"

# Ray's HTTPOptionsSchema fields: the supervisor's http options carry shoal's own beside them.
_HTTP_OPTION_FIELDS = (
    "host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s",
    "ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs",
)
# Deployment options shown as they are (Ray's _deployment_info_to_schema).
_DEPLOYMENT_FIELDS = (
    "max_ongoing_requests", "max_queued_requests", "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s",
    "rolling_update_percentage", "max_surge_percent",
)
_OPTIONAL_DEPLOYMENT_FIELDS = ("gang_scheduling_config", "max_replicas_per_node")
# shoal's default import paths and Ray's for the same thing: Ray's models import them on load.
_RAY_PATHS = {
    "shoal.runtime.request_router:PowerOfTwoChoicesRequestRouter": (
        "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
    ),
    "shoal.serve.autoscaling_policy:default_autoscaling_policy": "ray.serve.autoscaling_policy:default_autoscaling_policy",
}


@dataclass(frozen=True)
class InstanceFacts:
    """What the details say about the instance beside its applications.

    ``http_options``: the HTTP options it serves with (None: no HTTP); ``proxy_status``: the
    HTTP proxies' status value; ``node_ip``: the address shown for this machine.
    """

    supervisor_pid: int
    node_ip: str = "127.0.0.1"
    http_options: dict[str, Any] | None = None
    proxy_status: str | None = None
    target_capacity: float | None = None
    log_file_path: str | None = None


def instance_details(
    apps: Iterable[AppState], facts: InstanceFacts, *, wall_s: float | None = None, monotonic_s: float | None = None,
) -> dict[str, Any]:
    """Ray's ``ServeInstanceDetails`` as JSON values. ``wall_s`` and ``monotonic_s`` (default:
    now) are the same instant on both clocks: replica start times are shown on the wall clock."""
    wall_offset_s = (time.time() if wall_s is None else wall_s) - (time.monotonic() if monotonic_s is None else monotonic_s)
    details: dict[str, Any] = {
        "controller_info": {
            "node_id": NODE_ID, "node_ip": facts.node_ip, "actor_name": CONTROLLER_ACTOR_NAME,
            **({"log_file_path": facts.log_file_path} if facts.log_file_path else {}),
        },
        "proxy_location": "Disabled" if facts.http_options is None else "HeadOnly",
        "proxies": {},
        "applications": {app.name: _application(app, wall_offset_s) for app in apps},
        "target_capacity": facts.target_capacity,
        "target_groups": [],
        "restores_unset_config_options": True,  # a redeploy builds from code, then the file's overrides
    }
    if facts.http_options is not None:
        http = {k: facts.http_options[k] for k in _HTTP_OPTION_FIELDS if k in facts.http_options}
        details["http_options"] = http
        details["proxies"][NODE_ID] = {
            "node_id": NODE_ID, "node_ip": facts.node_ip, "actor_name": f"{PROXY_ACTOR_NAME}-{NODE_ID}",
            "status": facts.proxy_status or "STARTING",
        }
        if http.get("port"):
            details["target_groups"].append({
                "targets": [{"ip": str(http.get("host") or facts.node_ip), "port": int(http["port"]),
                             "instance_id": "", "name": f"{PROXY_ACTOR_NAME}-{NODE_ID}"}],
                "route_prefix": "/", "protocol": "HTTP", "app_name": "",
            })
    return details


def _application(app: AppState, wall_offset_s: float) -> dict[str, Any]:
    source = app.config_source
    out: dict[str, Any] = {
        "name": app.name,
        "route_prefix": app.route_prefix,
        "docs_path": None,
        "status": app.status.value,
        "message": app.message,
        "last_deployed_time_s": app.deployed_at,
        "source": "declarative" if source is not None else "imperative",
        "deployments": {
            state.name: _deployment(state, wall_offset_s)
            for state in app.deployments.values() if app.deleting or not state.deleting
        },
        "external_scaler_enabled": bool((source or {}).get("external_scaler_enabled", False)),
    }
    if source is not None:
        out["deployed_app_config"] = source
    return out


def _deployment(state: DeploymentState, wall_offset_s: float) -> dict[str, Any]:
    return {
        "name": state.name,
        "status": state.status.value,
        "status_trigger": state.trigger.value,
        "message": state.message,
        "deployment_config": ray_paths(deployment_config(state.name, state.config)),
        "target_num_replicas": state.target,
        "required_resources": required_resources(state.config.get("ray_actor_options") or {}),
        "replicas": [_replica(state, r, wall_offset_s) for r in state.replicas.values()],
    }


def deployment_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A deployment's options (``DeploymentConfig.to_wire()`` values) in Ray's ``DeploymentSchema``."""
    out: dict[str, Any] = {"name": name}
    for key in _DEPLOYMENT_FIELDS:
        if config.get(key) is not None:
            out[key] = config[key]
    if isinstance(config.get("backpressure_config"), dict):
        out["backpressure_config"] = config["backpressure_config"]
    user_config = config.get("user_config")
    if user_config is None or isinstance(user_config, dict):
        out["user_config"] = user_config
    out["ray_actor_options"] = dict(config.get("ray_actor_options") or {})
    if isinstance(config.get("request_router_config"), dict):
        out["request_router_config"] = config["request_router_config"]
    if config.get("autoscaling_config") is not None:
        out["autoscaling_config"] = config["autoscaling_config"]
    else:
        out["num_replicas"] = config.get("num_replicas")
    for key in _OPTIONAL_DEPLOYMENT_FIELDS:
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def ray_paths(value: Any) -> Any:
    """``value`` with shoal's default import paths (request router, autoscaling policy) as Ray's:
    Ray's CLI imports them when it reads the details, and has no ``shoal`` to import."""
    if isinstance(value, str):
        return _RAY_PATHS.get(value, value)
    if isinstance(value, dict):
        return {k: ray_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [ray_paths(v) for v in value]
    return value


def required_resources(actor_options: dict[str, Any]) -> dict[str, float]:
    """What one replica asks for, as Ray's ``ReplicaConfig.resource_dict``: CPU (default 1),
    GPU and memory when set, then the custom resources."""
    resources: dict[str, float] = {"CPU": float(actor_options.get("num_cpus", 1) or 0)}
    if actor_options.get("num_gpus"):
        resources["GPU"] = float(actor_options["num_gpus"])
    if actor_options.get("memory"):
        resources["memory"] = float(actor_options["memory"])
    resources.update({k: float(v) for k, v in (actor_options.get("resources") or {}).items()})
    return resources


def _replica(state: DeploymentState, replica: Replica, wall_offset_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node_id": NODE_ID,
        "actor_name": f"{REPLICA_ACTOR_PREFIX}::{replica.replica_id}",  # app#deployment#id, as Ray's
        "replica_id": replica.replica_id.rpartition("#")[2],  # Ray's: the unique part
        "state": replica.state.value,
        "start_time_s": replica.started_at + wall_offset_s,
    }
    if replica.pid is not None:
        out["pid"] = replica.pid
    return out

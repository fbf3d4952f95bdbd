"""Public schemas of ``shoal.serve.schema`` (Ray Serve 2.60's ``ray.serve.schema``).

Three groups live here:

- ``LoggingConfig`` / ``EncodingType``: logging options of a deployment, app or the instance;
- the ``serve.status()`` model: str enums and plain dataclasses, with ``ServeStatus.to_dict()``
  / ``ServeStatus.from_dict()`` for carrying a snapshot between processes as JSON-able dicts;
- the config-file schema (``ServeDeploySchema`` and what it nests), with Ray's validators.

Unlike Ray, the config-file schema forbids unknown keys at every level, so a typo is reported
with its path; ``format_validation_error`` renders a ``pydantic.ValidationError`` as lines of
``path.to.key: message``. Also unlike Ray, the HTTP host defaults to ``127.0.0.1`` in config
files too: serving on every interface must be asked for.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictInt,
    field_validator,
    model_validator,
)

from shoal.serve.config import (
    DEFAULT_METRICS_PORT,
    AutoscalingConfig,
    AutoscalingPolicy,
    BackpressureConfig,
    ControllerOptions,
    DeploymentActorConfig,
    GangSchedulingConfig,
    ProxyLocation,
    RequestRouterConfig,
    _check_import_path,
    check_grpc_servicer_functions,
    check_num_proxies,
    default_num_proxies,
)

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "DeploymentStatusTrigger",
    "EncodingType",
    "HTTPOptionsSchema",
    "LoggingConfig",
    "ProxyDetails",
    "ProxyStatus",
    "RayActorOptionsSchema",
    "ReplicaRank",
    "ReplicaState",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeStatus",
    "format_validation_error",
    "gRPCOptionsSchema",
    "validate_route_prefix",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


# --- logging ---------------------------------------------------------------------------------


class EncodingType(str, Enum):
    """Format of serve log lines."""

    TEXT = "TEXT"
    JSON = "JSON"


_LOG_LEVELS: dict[str, int] = logging.getLevelNamesMapping()
_LOGRECORD_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class LoggingConfig(_Strict):
    """Logging options; ``log_level`` accepts a level name or number and stores the name."""

    encoding: EncodingType = EncodingType.TEXT
    log_level: str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding(cls, v: Any) -> Any:
        if v not in list(EncodingType):
            raise ValueError(
                f"Got '{v}' for encoding. "
                f"Encoding must be one of {[e.value for e in EncodingType]}."
            )
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            if v not in _LOG_LEVELS.values():
                raise ValueError(
                    f'Got "{v}" for log_level. log_level must be one of '
                    f"{sorted(set(_LOG_LEVELS.values()))}."
                )
            return logging.getLevelName(v)
        if v not in _LOG_LEVELS:
            raise ValueError(
                f'Got "{v}" for log_level. log_level must be one of {list(_LOG_LEVELS)}.'
            )
        return str(v)

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _standard_attrs(cls, v: list[str]) -> list[str]:
        for attr in v:
            if attr not in _LOGRECORD_STANDARD_ATTRS:
                raise ValueError(
                    f"Unknown attribute '{attr}'. Additional log standard attributes must be "
                    f"one of {sorted(_LOGRECORD_STANDARD_ATTRS)}."
                )
        return list(dict.fromkeys(v))


# --- serve.status() --------------------------------------------------------------------------


class ApplicationStatus(str, Enum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(str, Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class DeploymentStatusTrigger(str, Enum):
    UNSPECIFIED = "UNSPECIFIED"
    CONFIG_UPDATE_STARTED = "CONFIG_UPDATE_STARTED"
    CONFIG_UPDATE_COMPLETED = "CONFIG_UPDATE_COMPLETED"
    UPSCALE_COMPLETED = "UPSCALE_COMPLETED"
    DOWNSCALE_COMPLETED = "DOWNSCALE_COMPLETED"
    AUTOSCALING = "AUTOSCALING"
    REPLICA_STARTUP_FAILED = "REPLICA_STARTUP_FAILED"
    DEPLOYMENT_ACTOR_FAILED = "DEPLOYMENT_ACTOR_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    DELETING = "DELETING"


class ReplicaState(str, Enum):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    PENDING_MIGRATION = "PENDING_MIGRATION"


class ProxyStatus(str, Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"


@dataclass
class ReplicaDetails:
    """One replica (a shoal extension of Ray's overview): id, state, pid, code version."""

    replica_id: str
    state: ReplicaState
    pid: int | None = None
    version: str = ""


@dataclass
class ProxyDetails:
    """One HTTP proxy process (a shoal extension: ``http_options.num_proxies`` of them serve
    the port): its index, pid (None between a crash and its restart), status and restarts."""

    index: int
    pid: int | None
    status: ProxyStatus
    restarts: int = 0


@dataclass
class DeploymentStatusOverview:
    """Status of one deployment; ``replica_states`` counts replicas per ``ReplicaState``.

    Beyond Ray's fields: ``replicas`` (each with its pid), ``restarts`` (replicas replaced after
    a crash or failed health checks) and ``last_error``.
    """

    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger
    replica_states: dict[str, int]
    message: str = ""
    replicas: list[ReplicaDetails] = field(default_factory=list)
    restarts: int = 0
    last_error: str = ""


@dataclass
class ApplicationStatusOverview:
    """Status of one application; ``last_deployed_time_s`` is a Unix timestamp."""

    status: ApplicationStatus
    message: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatusOverview]
    route_prefix: str | None = None
    ingress: str = ""


@dataclass(eq=True)
class ServeStatus:
    """What ``serve.status()`` returns: proxies by node id, applications by name."""

    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    target_capacity: float | None = None
    proxy_processes: list[ProxyDetails] = field(default_factory=list)  # shoal: each proxy process

    def to_dict(self) -> dict[str, Any]:
        """This snapshot as plain JSON-able values (enums as their string values)."""
        return {
            "proxies": {node: ProxyStatus(s).value for node, s in self.proxies.items()},
            "proxy_processes": [
                {"index": p.index, "pid": p.pid, "status": ProxyStatus(p.status).value, "restarts": p.restarts}
                for p in self.proxy_processes
            ],
            "applications": {
                name: {
                    "status": ApplicationStatus(app.status).value,
                    "message": app.message,
                    "last_deployed_time_s": app.last_deployed_time_s,
                    "deployments": {
                        dname: {
                            "status": DeploymentStatus(dep.status).value,
                            "status_trigger": DeploymentStatusTrigger(dep.status_trigger).value,
                            "replica_states": {
                                ReplicaState(state).value: count
                                for state, count in dep.replica_states.items()
                            },
                            "message": dep.message,
                            "replicas": [
                                {"replica_id": r.replica_id, "state": ReplicaState(r.state).value,
                                 "pid": r.pid, "version": r.version}
                                for r in dep.replicas
                            ],
                            "restarts": dep.restarts,
                            "last_error": dep.last_error,
                        }
                        for dname, dep in app.deployments.items()
                    },
                    "route_prefix": app.route_prefix,
                    "ingress": app.ingress,
                }
                for name, app in self.applications.items()
            },
            "target_capacity": self.target_capacity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeStatus:
        """Inverse of ``to_dict``; raises ValueError on an unknown status string."""
        return cls(
            proxies={node: ProxyStatus(s) for node, s in d.get("proxies", {}).items()},
            applications={
                name: ApplicationStatusOverview(
                    status=ApplicationStatus(app["status"]),
                    message=app["message"],
                    last_deployed_time_s=app["last_deployed_time_s"],
                    deployments={
                        dname: DeploymentStatusOverview(
                            status=DeploymentStatus(dep["status"]),
                            status_trigger=DeploymentStatusTrigger(dep["status_trigger"]),
                            replica_states={
                                ReplicaState(s): n for s, n in dep["replica_states"].items()
                            },
                            message=dep.get("message", ""),
                            replicas=[
                                ReplicaDetails(r["replica_id"], ReplicaState(r["state"]), r.get("pid"), r.get("version", ""))
                                for r in dep.get("replicas", [])
                            ],
                            restarts=dep.get("restarts", 0),
                            last_error=dep.get("last_error", ""),
                        )
                        for dname, dep in app["deployments"].items()
                    },
                    route_prefix=app.get("route_prefix"),
                    ingress=app.get("ingress", ""),
                )
                for name, app in d.get("applications", {}).items()
            },
            target_capacity=d.get("target_capacity"),
            proxy_processes=[
                ProxyDetails(p["index"], p.get("pid"), ProxyStatus(p["status"]), p.get("restarts", 0))
                for p in d.get("proxy_processes", [])
            ],
        )


# --- config file -----------------------------------------------------------------------------


def validate_route_prefix(route_prefix: str | None) -> str | None:
    """Return ``route_prefix`` if valid: None, ``"/"``, or ``"/x..."`` without ``{}`` or a trailing
    ``/``; else raise ValueError."""
    if route_prefix is None:
        return None
    if not route_prefix.startswith("/"):
        raise ValueError(
            f'Got "{route_prefix}" for route_prefix. Route prefix must start with "/".'
        )
    if len(route_prefix) > 1 and route_prefix.endswith("/"):
        raise ValueError(
            f'Got "{route_prefix}" for route_prefix. Route prefix cannot end with "/" unless '
            'the entire prefix is just "/".'
        )
    if "{" in route_prefix or "}" in route_prefix:
        raise ValueError(
            f'Got "{route_prefix}" for route_prefix. Route prefix cannot contain wildcards, '
            'so it cannot contain "{" or "}".'
        )
    return route_prefix


EXTERNAL_SCALER_UNSUPPORTED = (
    "external_scaler_enabled: shoal has no REST scaling endpoint for an external scaler; scale "
    "by deploying the config again with new num_replicas (no restart)."
)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _check_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    uris = list(runtime_env.get("py_modules") or [])
    if runtime_env.get("working_dir") is not None:
        uris.append(runtime_env["working_dir"])
    for uri in uris:
        if not (isinstance(uri, str) and _URI.match(uri)):
            raise ValueError(
                "runtime_envs in the Serve config support only remote URIs (or local://) in "
                f"working_dir and py_modules. Got {uri!r}."
            )
    return runtime_env


def _check_num_replicas(v: Any) -> Any:
    if v is None or v == "auto":
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        if v <= 0:
            raise ValueError("num_replicas is expected to larger than 0")
        return v
    raise ValueError(f'`num_replicas` must be an int or "auto", but got: {v}')


class ReplicaRank(BaseModel):
    """A replica's rank in its deployment (Ray's ``ReplicaRank``): ``rank`` is contiguous from 0
    across the deployment's replicas; on one machine ``node_rank`` is 0 and ``local_rank``
    equals ``rank``."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    rank: int = Field(description="Global rank of the replica across all nodes scoped to the deployment.")
    node_rank: int = Field(description="Rank of the node in the deployment.")
    local_rank: int = Field(description="Rank of the replica on the node scoped to the deployment.")


class RayActorOptionsSchema(_Strict):
    """Per-replica resource options (what each does in shoal: ``shoal.controller.actor_options``)."""

    runtime_env: dict[str, Any] = Field(default_factory=dict)
    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: NonNegativeFloat | None = None
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    accelerator_type: str | None = None
    label_selector: dict[str, str] | None = None
    fallback_strategy: list[dict[str, Any]] | None = None

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env_uris(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_runtime_env(v)


class DeploymentSchema(_Strict):
    """Config-file overrides for one deployment, matched by ``name``.

    A key left out keeps the value set in code; ``to_options()`` gives the keys that were
    written (an explicit ``null`` included), ready for ``DeploymentConfig.merged``.
    """

    name: str
    num_replicas: Any = None
    max_ongoing_requests: PositiveInt | None = None
    max_queued_requests: StrictInt | None = None
    backpressure_config: BackpressureConfig | None = None
    user_config: dict[str, Any] | None = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: NonNegativeFloat | None = None
    graceful_shutdown_timeout_s: NonNegativeFloat | None = None
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None
    ray_actor_options: RayActorOptionsSchema | None = None
    placement_group_bundles: list[dict[str, NonNegativeFloat]] | None = None
    placement_group_strategy: str | None = None
    placement_group_bundle_label_selector: list[dict[str, str]] | None = None
    max_replicas_per_node: int | None = Field(default=None, ge=1, le=100)
    logging_config: LoggingConfig | None = None
    request_router_config: RequestRouterConfig | None = None
    max_constructor_retry_count: PositiveInt | None = None
    gang_scheduling_config: GangSchedulingConfig | None = None
    deployment_actors: list[DeploymentActorConfig] | None = None
    rolling_update_percentage: float | None = Field(default=None, gt=0, le=1)
    max_surge_percent: int | None = Field(default=None, ge=0, le=100)

    @field_validator("num_replicas")
    @classmethod
    def _num_replicas_value(cls, v: Any) -> Any:
        return _check_num_replicas(v)

    @field_validator("max_queued_requests")
    @classmethod
    def _max_queued(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v != -1:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer.")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> DeploymentSchema:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError(
                "Manually setting num_replicas is not allowed when autoscaling_config is provided."
            )
        if self.max_replicas_per_node is not None and self.placement_group_bundles is not None:
            raise ValueError(
                "Setting max_replicas_per_node is not allowed when "
                "placement_group_bundles is provided."
            )
        return self

    def is_autoscaling_configured(self) -> bool:
        return self.num_replicas == "auto" or self.autoscaling_config is not None

    def to_options(self) -> dict[str, Any]:
        """The options written in the file (except ``name``), nested models as dicts of set keys."""
        options: dict[str, Any] = {}
        for key in type(self).model_fields:
            if key == "name" or key not in self.model_fields_set:
                continue
            value = getattr(self, key)
            if isinstance(value, BaseModel):
                value = value.model_dump(exclude_unset=True)
            elif isinstance(value, list):
                value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
            options[key] = value
        return options


class ServeApplicationSchema(_Strict):
    """One application of a config file."""

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    logging_config: LoggingConfig | None = None
    autoscaling_policy: AutoscalingPolicy | None = None
    external_scaler_enabled: bool = False
    host: str | None = None  # legacy single-app field; rejected by ServeDeploySchema
    port: int | None = None  # legacy single-app field; rejected by ServeDeploySchema

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_shape(cls, v: str | None) -> str | None:
        return validate_route_prefix(v)

    @field_validator("import_path")
    @classmethod
    def _import_path_shape(cls, v: str) -> str:
        return _check_import_path(v)

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env_uris(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_runtime_env(v)

    @model_validator(mode="after")
    def _external_scaler(self) -> ServeApplicationSchema:
        if self.external_scaler_enabled:
            names = [d.name for d in self.deployments if d.is_autoscaling_configured()]
            if names:
                quoted = ", ".join(f'"{n}"' for n in names)
                raise ValueError(
                    "external_scaler_enabled is set to True, but the following deployment(s) "
                    f"have autoscaling configured: {quoted}. When using an external autoscaler, "
                    "Serve's built-in autoscaling must be disabled for all deployments in the "
                    "application."
                )
            raise ValueError(EXTERNAL_SCALER_UNSUPPORTED)
        return self

    @property
    def deployment_names(self) -> list[str]:
        return [d.name for d in self.deployments]


class gRPCOptionsSchema(_Strict):
    """gRPC options of a config file (see ``shoal.serve.config.gRPCOptions``)."""

    port: int = Field(default=9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: PositiveFloat | None = None
    enable_reflection: bool = True

    @field_validator("grpc_servicer_functions")
    @classmethod
    def _servicers(cls, v: list[str]) -> list[str]:
        return check_grpc_servicer_functions(v)


class HTTPOptionsSchema(_Strict):
    """HTTP options of a config file. ``host`` defaults to ``127.0.0.1`` (Ray: ``0.0.0.0``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: PositiveFloat | None = None
    keep_alive_timeout_s: NonNegativeInt = 90
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    max_request_body_bytes: PositiveInt = 100 * 1024 * 1024
    graceful_shutdown_timeout_s: NonNegativeFloat = 20.0
    max_header_bytes: PositiveInt = 64 * 1024
    max_header_count: PositiveInt = 100
    request_header_timeout_s: PositiveFloat = 10.0
    max_connections: PositiveInt = 10_000
    metrics_port: int | None = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)  # None: no metrics endpoint
    num_proxies: int = Field(default_factory=lambda: default_num_proxies())  # HTTP proxy processes on the port

    @field_validator("num_proxies", mode="before")
    @classmethod
    def _num_proxies(cls, v: Any) -> int:
        return check_num_proxies(v)

    @model_validator(mode="after")
    def _ssl_pair(self) -> HTTPOptionsSchema:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError(
                "Both ssl_keyfile and ssl_certfile must be provided together to enable HTTPS."
            )
        return self


class ServeDeploySchema(_Strict):
    """A whole config file (``serve deploy`` / ``serve run config.yaml``)."""

    proxy_location: ProxyLocation = ProxyLocation.EveryNode
    http_options: HTTPOptionsSchema = Field(default_factory=HTTPOptionsSchema)
    grpc_options: gRPCOptionsSchema = Field(default_factory=gRPCOptionsSchema)
    controller_options: ControllerOptions | None = None
    logging_config: LoggingConfig | None = None
    tracing_config: dict[str, Any] | None = None  # accepted for porting; no effect
    applications: list[ServeApplicationSchema]
    target_capacity: float | None = Field(default=None, ge=0, le=100)

    @field_validator("applications")
    @classmethod
    def _applications(cls, apps: list[ServeApplicationSchema]) -> list[ServeApplicationSchema]:
        names = [app.name for app in apps]
        duplicates = sorted({f'"{n}"' for n in names if names.count(n) > 1})
        if duplicates:
            noun = "application " if len(duplicates) == 1 else "applications "
            raise ValueError(
                f"Found multiple configs for {noun}{', '.join(duplicates)}. "
                "Please remove all duplicates."
            )
        routes = [app.route_prefix for app in apps if app.route_prefix is not None]
        duplicates = sorted({f'"{r}"' for r in routes if routes.count(r) > 1})
        if duplicates:
            noun = "route prefix " if len(duplicates) == 1 else "route prefixes "
            raise ValueError(
                f"Found duplicate applications for {noun}{', '.join(duplicates)}. "
                "Please ensure each application's route_prefix is unique."
            )
        if any(len(name) == 0 for name in names):
            raise ValueError("Application names must be nonempty.")
        for app in apps:
            if app.host is not None:
                raise ValueError(
                    f'Host "{app.host}" is set in the config for application `{app.name}`. '
                    "Please remove it and set host in the top level deploy config only."
                )
            if app.port is not None:
                raise ValueError(
                    f"Port {app.port} is set in the config for application `{app.name}`. "
                    "Please remove it and set port in the top level deploy config only."
                )
        return apps


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """One line per error: ``dotted.path.to.key: message`` (the path is omitted at top level)."""
    lines = []
    for error in exc.errors():
        message = error["msg"]
        cause = (error.get("ctx") or {}).get("error")
        if error["type"] == "value_error" and cause is not None:
            message = str(cause)
        path = ".".join(str(part) for part in error["loc"])
        lines.append(f"{path}: {message}" if path else message)
    return "\n".join(lines)

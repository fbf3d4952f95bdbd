"""Public configuration models of ``shoal.serve.config`` (Ray Serve 2.60's ``ray.serve.config``).

Field names, defaults and validation messages follow Ray Serve so that ported code and configs
keep working. Where shoal differs on purpose:

- every model forbids unknown keys, so a typo fails with the key's name instead of being ignored;
- ``HTTPOptions`` always defaults to ``127.0.0.1`` and adds ``max_request_body_bytes`` and
  ``graceful_shutdown_timeout_s``; no option is read from environment variables;
- deprecated fields Ray only warns about (``metrics_interval_s``, ``location``) are accepted
  silently; removed ones (``middlewares``, ``num_cpus``) raise ``ValueError``;
- placement groups, gang scheduling and deployment actors are validated but have no effect
  on one machine.

Every validation failure is a ``pydantic.ValidationError``, which is a ``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "ControllerOptions",
    "DeploymentActorConfig",
    "DeploymentID",
    "DeploymentMode",
    "GangPlacementStrategy",
    "GangRuntimeFailurePolicy",
    "GangSchedulingConfig",
    "HTTPOptions",
    "ProxyLocation",
    "RequestRouterConfig",
    "gRPCOptions",
]

DEFAULT_AUTOSCALING_POLICY_PATH = "shoal.serve.autoscaling_policy:default_autoscaling_policy"
DEFAULT_REQUEST_ROUTER_PATH = "shoal.runtime.request_router:PowerOfTwoChoicesRequestRouter"
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0


def _check_import_path(path: str) -> str:
    """Return ``path`` if shaped ``"mod.sub:attr"`` or ``"mod.sub.attr"``; else raise ValueError."""
    if ":" in path:
        if path.count(":") > 1:
            raise ValueError(
                f'Got invalid import path "{path}". An import path may have at most one colon.'
            )
        if path.startswith(":") or path.endswith(":"):
            raise ValueError(
                f'Got invalid import path "{path}". '
                "An import path may not start or end with a colon."
            )
        return path
    if "." not in path:
        raise ValueError(
            f'Got invalid import path "{path}". An import path must contain at least one dot '
            "or colon separating the module (and potentially submodules) from the attribute. "
            'E.g.: "module.attribute" or "module:attribute".'
        )
    if path.startswith(".") or path.endswith("."):
        raise ValueError(
            f'Got invalid import path "{path}". An import path may not start or end with a dot.'
        )
    return path


def _check_import_path_or_callable(value: str | Callable[..., Any]) -> str | Callable[..., Any]:
    return _check_import_path(value) if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


# --- autoscaling -----------------------------------------------------------------------------


class AggregationFunction(str, Enum):
    """How autoscaling metrics are reduced over the look-back window."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


class AutoscalingPolicy(_Strict):
    """A deployment's autoscaling policy: an import path (``"mod:fn"``/``"mod.fn"``) or a callable.

    Classes are constructed with ``policy_kwargs`` and then called once per control-loop tick.
    """

    policy_function: str | Callable[..., Any] = DEFAULT_AUTOSCALING_POLICY_PATH
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy_function")
    @classmethod
    def _policy_path_shape(cls, v: str | Callable[..., Any]) -> str | Callable[..., Any]:
        return _check_import_path_or_callable(v)

    def is_default_policy_function(self) -> bool:
        return self.policy_function == DEFAULT_AUTOSCALING_POLICY_PATH


class AutoscalingConfig(_Strict):
    """Autoscaling parameters of one deployment (Ray Serve section 5.1 defaults)."""

    min_replicas: NonNegativeInt = 1
    initial_replicas: NonNegativeInt | None = None
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = DEFAULT_TARGET_ONGOING_REQUESTS
    metrics_interval_s: PositiveFloat = 10.0  # deprecated in Ray; accepted for compatibility
    look_back_period_s: PositiveFloat = 30.0
    smoothing_factor: PositiveFloat = 1.0  # deprecated
    upscale_smoothing_factor: PositiveFloat | None = None  # deprecated
    downscale_smoothing_factor: PositiveFloat | None = None  # deprecated
    upscaling_factor: PositiveFloat | None = None
    downscaling_factor: PositiveFloat | None = None
    upscale_delay_s: NonNegativeFloat = 30.0
    downscale_delay_s: NonNegativeFloat = 600.0
    downscale_to_zero_delay_s: NonNegativeFloat | None = None
    aggregation_function: AggregationFunction = AggregationFunction.MEAN
    policy: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)

    @field_validator("aggregation_function", mode="before")
    @classmethod
    def _lower_aggregation(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) and not isinstance(v, Enum) else v

    @field_validator("max_replicas")
    @classmethod
    def _replica_bounds(cls, max_replicas: int, info: ValidationInfo) -> int:
        min_replicas = info.data.get("min_replicas")
        initial_replicas = info.data.get("initial_replicas")
        if min_replicas is not None and max_replicas < min_replicas:
            raise ValueError(
                f"max_replicas ({max_replicas}) must be greater than "
                f"or equal to min_replicas ({min_replicas})!"
            )
        if initial_replicas is not None:
            if min_replicas is not None and initial_replicas < min_replicas:
                raise ValueError(
                    f"min_replicas ({min_replicas}) must be less than "
                    f"or equal to initial_replicas ({initial_replicas})!"
                )
            if initial_replicas > max_replicas:
                raise ValueError(
                    f"max_replicas ({max_replicas}) must be greater than "
                    f"or equal to initial_replicas ({initial_replicas})!"
                )
        return max_replicas

    @classmethod
    def default(cls) -> AutoscalingConfig:
        """The config ``num_replicas="auto"`` starts from: target 2, min 1, max 100."""
        return cls(
            target_ongoing_requests=DEFAULT_TARGET_ONGOING_REQUESTS,
            min_replicas=1,
            max_replicas=100,
        )

    def get_upscaling_factor(self) -> float:
        """``upscaling_factor``, else ``upscale_smoothing_factor`` or ``smoothing_factor``."""
        if self.upscaling_factor:
            return self.upscaling_factor
        return self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        """``downscaling_factor``, else ``downscale_smoothing_factor`` or ``smoothing_factor``."""
        if self.downscaling_factor:
            return self.downscaling_factor
        return self.downscale_smoothing_factor or self.smoothing_factor

    def get_downscale_to_zero_delay_s(self) -> float:
        """Delay of the 1 -> 0 step: ``downscale_to_zero_delay_s`` if set (even 0), else
        ``downscale_delay_s``."""
        if self.downscale_to_zero_delay_s is not None:
            return self.downscale_to_zero_delay_s
        return self.downscale_delay_s

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests


@dataclass(frozen=True)
class DeploymentID:
    """Identifies a deployment within an application."""

    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"Deployment(name='{self.name}', app='{self.app_name}')"

    __repr__ = __str__


@dataclass
class AutoscalingContext:
    """What an autoscaling policy sees on each tick (Ray Serve section 5.3).

    ``running_replicas`` holds replica ids; metrics maps are ``{metric: {replica_id: value}}``;
    times are seconds on the controller's clock; ``policy_state`` is the dict the policy
    returned on its previous call.
    """

    deployment_id: DeploymentID
    deployment_name: str
    app_name: str | None
    current_num_replicas: int
    target_num_replicas: int
    running_replicas: list[Any]
    total_num_requests: float
    total_queued_requests: float | None
    aggregated_metrics: dict[str, dict[Any, float]] | None
    raw_metrics: dict[str, dict[Any, Any]] | None
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    last_scale_up_time: float | None
    last_scale_down_time: float | None
    current_time: float | None
    config: Any | None

    @property
    def total_running_requests(self) -> float:
        """Approximately ``total_num_requests - total_queued_requests``, never below 0."""
        return max(0.0, self.total_num_requests - (self.total_queued_requests or 0.0))


# --- per-deployment options ------------------------------------------------------------------


class BackpressureConfig(_Strict):
    """What a caller with a full queue gets: HTTP ``status_code`` and optional ``Retry-After``."""

    status_code: Literal[503, 429] = 503
    retry_after_s: NonNegativeFloat | None = None


class RequestRouterConfig(_Strict):
    """Which request router a deployment's callers use, and its probing/backoff parameters."""

    request_router_class: str | Callable[..., Any] = DEFAULT_REQUEST_ROUTER_PATH
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: PositiveFloat = 10.0
    request_routing_stats_timeout_s: PositiveFloat = 30.0
    initial_backoff_s: PositiveFloat = 0.025
    backoff_multiplier: PositiveFloat = 2.0
    max_backoff_s: PositiveFloat = 0.5

    @field_validator("request_router_class")
    @classmethod
    def _router_path_shape(cls, v: str | Callable[..., Any]) -> str | Callable[..., Any]:
        return _check_import_path_or_callable(v)

    @field_validator("request_router_kwargs")
    @classmethod
    def _kwargs_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(v)
        except TypeError as exc:
            raise ValueError(f"request_router_kwargs is not JSON-serializable: {exc}.") from None
        return v


class GangPlacementStrategy(str, Enum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class GangRuntimeFailurePolicy(str, Enum):
    RESTART_GANG = "RESTART_GANG"
    RESTART_REPLICA = "RESTART_REPLICA"


class GangSchedulingConfig(_Strict):
    """Groups of ``gang_size`` replicas scheduled together (validated; no effect on one machine)."""

    gang_size: PositiveInt
    gang_timeout_s: PositiveFloat = 300.0
    gang_placement_strategy: GangPlacementStrategy = GangPlacementStrategy.PACK
    max_retries: NonNegativeInt = 3
    runtime_failure_policy: GangRuntimeFailurePolicy = GangRuntimeFailurePolicy.RESTART_GANG


class DeploymentActorConfig(BaseModel):
    """A Ray deployment-scoped shared actor. Accepted for porting only; shoal never starts it.

    Only ``name`` is checked; other keys are kept as given.
    """

    model_config = ConfigDict(extra="allow", defer_build=True)

    name: str


# --- cluster-level options -------------------------------------------------------------------


class ProxyLocation(str, Enum):
    """Where proxies run. On one machine ``HeadOnly`` and ``EveryNode`` both mean one proxy."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


class DeploymentMode(str, Enum):
    """Deprecated spelling of ``ProxyLocation`` used by ``HTTPOptions.location``."""

    NoServer = "NoServer"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


DEFAULT_METRICS_PORT = 8080  # Ray's default metrics export port


class HTTPOptions(_Strict):
    """Options of the HTTP proxy.

    ``host=None`` disables HTTP. ``port=0`` binds a free port (the real one is reported after
    bind). Request bodies above ``max_request_body_bytes`` get 413. ``graceful_shutdown_timeout_s``
    bounds how long the proxy drains in-flight requests on shutdown (then they get 503).
    Limits on clients: a request head over ``max_header_bytes`` or with more than
    ``max_header_count`` headers gets 431; a head not received in full within
    ``request_header_timeout_s`` closes the connection, as does ``keep_alive_timeout_s`` of
    idleness between requests; over ``max_connections`` open connections, requests get 503.

    HTTPS: ``ssl_keyfile`` and ``ssl_certfile`` (both, or neither) make the proxy serve TLS, with
    ``ssl_keyfile_password`` decrypting an encrypted key; ``ssl_ca_certs`` (as Ray documents it:
    "for verifying client certificates") makes the proxy require a client certificate signed by
    one of those CAs. A missing file, a key that does not match or decrypt, or a password or CA
    file without a key and certificate is an error at start naming the option.

    Proxies (a shoal extension): ``num_proxies`` HTTP proxy processes share the port (one
    listening socket, which the supervisor binds and every proxy accepts from), each with its
    own routers; default ``default_num_proxies()``: 1 on a machine with fewer than 4 cores,
    else ``min(4, cores // 2)``. A whole number of at least 1, else an error naming it.

    Metrics (a shoal extension, as Ray's metrics export port): the instance serves Prometheus
    metrics on ``metrics_port`` (default 8080; 0 picks a free one; None serves none), on ``host``
    (127.0.0.1 when HTTP is off); ``serve.get_metrics_url()`` and ``shoal status`` say where. If
    the default port is taken (say, by another instance), a free port is used; any other port
    that cannot be bound is an error at start.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)

    host: str | None = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: PositiveFloat | None = None
    keep_alive_timeout_s: NonNegativeInt = 90
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    middlewares: list[Any] = Field(default_factory=list)
    location: DeploymentMode | None = None
    num_cpus: int = 0
    root_url: str = ""
    max_request_body_bytes: PositiveInt = 100 * 1024 * 1024
    graceful_shutdown_timeout_s: NonNegativeFloat = 20.0
    max_header_bytes: PositiveInt = 64 * 1024
    max_header_count: PositiveInt = 100
    request_header_timeout_s: PositiveFloat = 10.0
    max_connections: PositiveInt = 10_000
    metrics_port: int | None = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    num_proxies: int = Field(default_factory=lambda: default_num_proxies())

    @field_validator("num_proxies", mode="before")
    @classmethod
    def _num_proxies(cls, v: Any) -> int:
        return check_num_proxies(v)

    @field_validator("middlewares")
    @classmethod
    def _no_middlewares(cls, v: list[Any]) -> list[Any]:
        if v:
            raise ValueError(
                "`middlewares` in HTTPOptions has been removed. Add middlewares to a FastAPI "
                "app and wrap the deployment with `@serve.ingress(app)` instead."
            )
        return v

    @field_validator("num_cpus")
    @classmethod
    def _no_num_cpus(cls, v: int) -> int:
        if v:
            raise ValueError(
                "`num_cpus` in HTTPOptions has been removed; the proxy reserves no CPUs."
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_server(cls, data: Any) -> Any:
        """``location="NoServer"`` (deprecated) means what ``host=None`` means: no HTTP."""
        if isinstance(data, dict) and data.get("location") in ("NoServer", DeploymentMode.NoServer):
            data = {**data, "host": None}
        return data

    @field_validator("root_url")
    @classmethod
    def _no_root_url(cls, v: str) -> str:
        if v:
            raise ValueError(
                "`root_url` in HTTPOptions is not supported by shoal (Ray uses it only to report "
                "the URL); shoal reports the address it listens on (serve.get_http_url())."
            )
        return v

    @model_validator(mode="after")
    def _ssl_pair(self) -> HTTPOptions:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError(
                "Both ssl_keyfile and ssl_certfile must be provided together to enable HTTPS."
            )
        return self


DEFAULT_NUM_PROXIES_ENV = "SHOAL_DEFAULT_NUM_PROXIES"


def default_num_proxies() -> int:
    """How many HTTP proxies an instance runs unless told: 1 on a machine with fewer than 4
    cores this process may use (a second proxy would compete with the replicas for them), else
    ``min(4, cores // 2)``. ``SHOAL_DEFAULT_NUM_PROXIES``, read when this is called (not at
    import), replaces that default (the test suite sets it to 1, so that its results do not
    depend on the machine's cores); ValueError naming it if it is not a whole number >= 1."""
    override = os.environ.get(DEFAULT_NUM_PROXIES_ENV)
    if override:
        try:
            return check_num_proxies(int(override))
        except ValueError:
            raise ValueError(
                f"{DEFAULT_NUM_PROXIES_ENV}={override!r}: the default num_proxies must be a whole number of at least 1"
            ) from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores < 4 else min(4, cores // 2)


def check_num_proxies(value: Any) -> int:
    """``value`` as a number of proxies: a whole number of at least 1 (not a bool, a float or
    a string), else ValueError naming ``num_proxies``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"num_proxies must be a whole number of at least 1, got {value!r}")
    if value < 1:
        raise ValueError(f"num_proxies must be at least 1 (the number of HTTP proxy processes), got {value}")
    return value


def check_grpc_servicer_functions(functions: list[str]) -> list[str]:
    """Each of ``grpc_servicer_functions`` must look like an import path (``module.function``
    or ``module:function``); whether it imports and serves is checked when the instance starts
    (where it runs: ``controller/grpc_listen.py``)."""
    for function in functions:
        module, _, attr = function.partition(":") if ":" in function else function.rpartition(".")
        if not module or not attr:
            raise ValueError(
                f"grpc_servicer_functions: {function!r} is not an import path; give the generated "
                "function, e.g. 'my_pb2_grpc.add_MyServiceServicer_to_server'."
            )
    return functions


class gRPCOptions(_Strict):
    """gRPC proxy options (Ray's). With ``grpc_servicer_functions`` (import paths of generated
    ``add_<Service>Servicer_to_server`` functions) every proxy serves gRPC on ``port`` (0: a free
    one, see ``serve.get_grpc_url()``), on the HTTP host; without them, no gRPC server runs and
    the other fields have no effect, as in Ray."""

    port: int = Field(default=9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: PositiveFloat | None = None
    enable_reflection: bool = True

    @field_validator("grpc_servicer_functions")
    @classmethod
    def _servicers(cls, v: list[str]) -> list[str]:
        return check_grpc_servicer_functions(v)


class ControllerOptions(_Strict):
    """Controller options (experimental in Ray): only ``runtime_env={"env_vars": {...}}``."""

    runtime_env: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("runtime_env")
    @classmethod
    def _only_env_vars(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        unsupported = sorted(set(v) - {"env_vars"})
        if unsupported:
            raise ValueError(
                f"ControllerOptions.runtime_env supports only 'env_vars'; got {unsupported}."
            )
        return v

    @property
    def env_vars(self) -> dict[str, str]:
        return dict(self.runtime_env.get("env_vars", {}))


def check_no_controller_env_vars(options: ControllerOptions | None) -> None:
    """ValueError if ``options`` sets env vars: shoal's supervisor is configured by its options."""
    if options is not None and options.env_vars:
        raise ValueError(
            "controller_options.runtime_env.env_vars is not supported by shoal: its supervisor "
            "reads no RAY_SERVE_* environment variables (set the supervisor's environment when "
            f"you start it instead); got {sorted(options.env_vars)}."
        )

"""The checks behind ``serve.start``'s and ``serve.run``'s instance- and app-wide arguments.

Each argument either takes effect or is refused here, naming it (see docs/options.md):

- ``proxy_location``: ``HeadOnly`` and ``EveryNode`` both mean the one proxy of this machine;
  ``Disabled`` means no HTTP proxy (as ``http_options.host=None``).
- ``http_options``: validated as ``HTTPOptions``.
- ``grpc_options``: validated as ``gRPCOptions``; passed on (as plain values) only when it names
  servicer functions (else no gRPC server runs, as in Ray).
- ``logging_config``: validated as ``LoggingConfig``, returned as plain values.
- ``tracing_config``: refused unless None (no tracing yet).
- ``controller_options``: validated as ``ControllerOptions``; env vars are refused.
- ``external_scaler_enabled``: refused when True (no REST scaling endpoint).
- anything else: TypeError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.serve.config import (
    ControllerOptions,
    HTTPOptions,
    ProxyLocation,
    check_no_controller_env_vars,
    gRPCOptions,
)
from shoal.serve.schema import EXTERNAL_SCALER_UNSUPPORTED, LoggingConfig

__all__ = ["InstanceOptions", "app_options", "instance_options", "logging_config_dict"]


@dataclass(frozen=True)
class InstanceOptions:
    """What ``serve.start`` passes on: HTTP options (None: no proxy), the logging config, and
    the gRPC options (plain values; None: no gRPC server)."""

    http_options: Any
    logging_config: dict[str, Any] | None
    grpc_options: dict[str, Any] | None = None


def logging_config_dict(logging_config: Any) -> dict[str, Any] | None:
    """A ``LoggingConfig`` (or dict) as validated plain values; None stays None."""
    if logging_config is None:
        return None
    if not isinstance(logging_config, LoggingConfig):
        logging_config = LoggingConfig.model_validate(dict(logging_config))
    plain: dict[str, Any] = logging_config.model_dump(mode="json")
    return plain


def _model(model: type[Any], value: Any) -> Any:
    return value if value is None or isinstance(value, model) else model.model_validate(dict(value))


def instance_options(
    *,
    proxy_location: Any,
    http_options: Any,
    grpc_options: Any,
    logging_config: Any,
    tracing_config: Any,
    controller_options: Any,
    extra: dict[str, Any],
) -> InstanceOptions:
    """Check ``serve.start``'s arguments (module docstring)."""
    if extra:
        raise TypeError(f"serve.start() got unexpected keyword arguments {sorted(extra)}")
    if tracing_config is not None:
        raise ValueError("tracing_config: shoal does not support tracing yet; pass None.")
    grpc = _model(gRPCOptions, grpc_options)
    check_no_controller_env_vars(_model(ControllerOptions, controller_options))
    location = ProxyLocation(proxy_location) if proxy_location is not None else None
    http = _model(HTTPOptions, http_options)
    if location is ProxyLocation.Disabled:
        http = (http or HTTPOptions()).model_copy(update={"host": None})
    grpc_plain = grpc.model_dump(mode="json") if grpc is not None and grpc.grpc_servicer_functions else None
    if grpc_plain is not None and http is not None and http.host is None:
        raise ValueError(
            "grpc_options.grpc_servicer_functions needs the proxy, which serves gRPC beside HTTP: "
            "do not disable HTTP (proxy_location='Disabled' or http_options.host=None) to serve gRPC."
        )
    return InstanceOptions(http, logging_config_dict(logging_config), grpc_plain)


def app_options(logging_config: Any, external_scaler_enabled: bool, controller_options: Any) -> dict[str, Any] | None:
    """Check ``serve.run``'s app-wide arguments; returns its logging config as plain values."""
    if external_scaler_enabled:
        raise ValueError(EXTERNAL_SCALER_UNSUPPORTED)
    check_no_controller_env_vars(_model(ControllerOptions, controller_options))
    return logging_config_dict(logging_config)

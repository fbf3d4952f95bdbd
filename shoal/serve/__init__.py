"""``shoal.serve``: the API of ``ray.serve``, for one machine.

``deployment`` (with ``Application`` and ``Deployment``) and ``ingress`` are imported with the
package: every application module uses them, and their names are also the names of submodules.
The rest is imported on first use (a module ``__getattr__``): a replica importing its application
module does not pay for the driver's API (``run``, ``status``, the supervisor launcher), nor the
supervisor, which imports ``shoal.serve.config`` and ``shoal.serve.schema``, for any of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shoal.serve.deployment import Application, Deployment, deployment
from shoal.serve.ingress import ingress

if TYPE_CHECKING:
    from shoal.runtime.context import ReplicaContext
    from shoal.serve.api import (
        RunTarget,
        delete,
        get_app_handle,
        get_deployment_handle,
        get_grpc_url,
        get_http_url,
        get_metrics_url,
        get_replica_context,
        run,
        run_many,
        shutdown,
        shutdown_async,
        start,
        status,
    )
    from shoal.serve.api import _run as _run  # Ray's internal entries, in dir(ray.serve) too
    from shoal.serve.api import _run_many as _run_many
    from shoal.serve.batching import batch
    from shoal.serve.config import HTTPOptions
    from shoal.serve.multiplex import get_multiplexed_model_id, multiplexed

# name -> the module it is imported from on first use
_LAZY = {
    "ReplicaContext": "shoal.runtime.context",
    **dict.fromkeys(
        (
            "RunTarget", "delete", "get_app_handle", "get_deployment_handle", "get_grpc_url", "get_http_url", "get_metrics_url",
            "get_replica_context", "run", "run_many", "shutdown", "shutdown_async", "start", "status", "_run",
            "_run_many",
        ),
        "shoal.serve.api",
    ),
    "batch": "shoal.serve.batching",
    "HTTPOptions": "shoal.serve.config",
    "get_multiplexed_model_id": "shoal.serve.multiplex",
    "multiplexed": "shoal.serve.multiplex",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal.serve' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Application",
    "Deployment",
    "HTTPOptions",
    "ReplicaContext",
    "RunTarget",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_grpc_url",
    "get_http_url",
    "get_metrics_url",
    "get_multiplexed_model_id",
    "get_replica_context",
    "ingress",
    "multiplexed",
    "run",
    "run_many",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]

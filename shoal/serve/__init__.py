"""``shoal.serve``: the API of ``ray.serve``, for one machine."""

from shoal.runtime.context import ReplicaContext
from shoal.serve.api import (
    RunTarget,
    delete,
    get_app_handle,
    get_deployment_handle,
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
from shoal.serve.deployment import Application, Deployment, deployment
from shoal.serve.ingress import ingress
from shoal.serve.multiplex import get_multiplexed_model_id, multiplexed

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

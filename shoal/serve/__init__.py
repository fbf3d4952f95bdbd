"""``shoal.serve``: the API of ``ray.serve``, for one machine."""

from shoal.runtime.context import ReplicaContext
from shoal.serve.api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    get_http_url,
    get_replica_context,
    run,
    shutdown,
    start,
    status,
)
from shoal.serve.batching import batch
from shoal.serve.config import HTTPOptions
from shoal.serve.deployment import Application, Deployment, deployment
from shoal.serve.ingress import ingress

__all__ = [
    "Application",
    "Deployment",
    "HTTPOptions",
    "ReplicaContext",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_http_url",
    "get_replica_context",
    "ingress",
    "run",
    "shutdown",
    "start",
    "status",
]

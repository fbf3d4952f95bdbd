"""``shoal.serve.exceptions``: Ray Serve's exception names (the tree is in ``shoal.runtime.errors``)."""

from shoal.runtime.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaDiedError,
    ReplicaUnavailableError,
    RequestCancelledError,
    ShoalConnectionError,
    TaskCancelledError,
    gRPCStatusError,
)

__all__ = [
    "BackPressureError",
    "DeploymentUnavailableError",
    "RayServeException",
    "ReplicaDiedError",
    "ReplicaUnavailableError",
    "RequestCancelledError",
    "ShoalConnectionError",
    "TaskCancelledError",
    "gRPCStatusError",
]

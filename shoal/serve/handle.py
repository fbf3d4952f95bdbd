"""``shoal.serve.handle``: Ray Serve's handle classes."""

from shoal.runtime.broadcast import DeploymentBroadcastResponse
from shoal.runtime.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

__all__ = [
    "DeploymentBroadcastResponse",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
]

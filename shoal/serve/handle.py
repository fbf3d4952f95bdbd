"""``shoal.serve.handle``: Ray Serve's handle classes."""

from shoal.runtime.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]

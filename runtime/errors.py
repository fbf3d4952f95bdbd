"""shoal's exception tree, with Ray Serve's names so that code catching them keeps working.

    Exception
    ├── TaskCancelledError                Ray's ``ray.exceptions.TaskCancelledError``
    │   └── RequestCancelledError         (also a RayServeException, below)
    ├── RayServeException                 any serve-level error (bad method, app not found, ...)
    │   ├── BackPressureError             the caller's queue for a deployment is full
    │   ├── RequestCancelledError         the response was cancelled with ``.cancel()``
    │   ├── gRPCStatusError               user code raises it to answer a gRPC call with its
    │   │                                 status code and details (the proxy sends them)
    │   ├── DeploymentUnavailableError    the deployment failed to deploy or was deleted
    │   ├── ReplicaUnavailableError       the replica a request was on is gone
    │   │   └── ReplicaDiedError          ... because its process died mid-request
    │   └── ShoalConnectionError          no supervisor answers at the instance's address
    └── (user exception types)            re-raised in the caller through ``as_remote_error``

A user exception raised in a replica reaches the caller as an instance of a subclass of the
user's own exception type, whose message carries the remote traceback, so ``except ValueError``
keeps working across processes (Ray's ``RayTaskError`` does the same).
"""

from __future__ import annotations

import math
from typing import Any


class RayServeException(Exception):
    """Base of every error shoal raises on its own account."""


class BackPressureError(RayServeException):
    """Raised when a caller's queue for a deployment already holds ``max_queued_requests``."""

    def __init__(
        self,
        *,
        num_queued_requests: int,
        max_queued_requests: int,
        status_code: int = 503,
        retry_after_s: float | None = None,
    ) -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return (
            "Request dropped due to backpressure "
            f"(num_queued_requests={self.num_queued_requests}, "
            f"max_queued_requests={self.max_queued_requests})."
        )

    @property
    def retry_after_header(self) -> str | None:
        """The ``Retry-After`` header value (whole seconds, rounded up), or None."""
        if self.retry_after_s is None:
            return None
        return str(math.ceil(self.retry_after_s))

    def __reduce__(self) -> Any:
        return (_rebuild_backpressure, (self.num_queued_requests, self.max_queued_requests,
                                        self.status_code, self.retry_after_s))


def _rebuild_backpressure(n: int, m: int, code: int, retry: float | None) -> BackPressureError:
    return BackPressureError(num_queued_requests=n, max_queued_requests=m, status_code=code,
                             retry_after_s=retry)


class TaskCancelledError(Exception):
    """Ray's ``ray.exceptions.TaskCancelledError`` (what ``ray.serve.exceptions`` re-exports):
    the base of ``RequestCancelledError``, so ``except TaskCancelledError`` keeps working."""

    def __init__(self, task_id: Any = None, error_message: str | None = None) -> None:
        self.task_id = task_id
        self.error_message = error_message
        super().__init__(task_id, error_message)

    def __str__(self) -> str:
        msg = f"Task: {self.task_id} was cancelled. " if self.task_id else ""
        return msg + (self.error_message or "")


class gRPCStatusError(RayServeException):
    """An exception carrying the gRPC status code and details a user set before raising it
    (the gRPC proxy answers the call with them; empty details: ``str(original_exception)``).
    shoal never raises it itself."""

    def __init__(self, original_exception: BaseException, code: Any = None, details: str | None = None) -> None:
        self._original_exception = original_exception
        self._grpc_code = code
        self._grpc_details = details
        super().__init__(str(original_exception))

    @property
    def original_exception(self) -> BaseException:
        return self._original_exception

    @property
    def grpc_code(self) -> Any:
        return self._grpc_code

    @property
    def grpc_details(self) -> str | None:
        return self._grpc_details

    def __str__(self) -> str:
        return str(self._original_exception)

    def __reduce__(self) -> Any:
        return (gRPCStatusError, (self._original_exception, self._grpc_code, self._grpc_details))


class RequestCancelledError(RayServeException, TaskCancelledError):
    """The result of a request that was cancelled before it finished (as in Ray, also a
    ``TaskCancelledError``)."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.task_id = None
        self.error_message = None
        Exception.__init__(self, f"Request {request_id} was cancelled." if request_id else "Request was cancelled.")

    def __str__(self) -> str:
        return f"Request {self.request_id} was cancelled." if self.request_id else "Request was cancelled."

    def __reduce__(self) -> Any:
        return (RequestCancelledError, (self.request_id,))


class DeploymentUnavailableError(RayServeException):
    """The deployment cannot take requests: it failed to deploy or no longer exists."""

    def __init__(self, deployment_id: str, reason: str = "because it failed to deploy") -> None:
        self.deployment_id = deployment_id
        self.reason = reason
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.deployment_id} is unavailable {self.reason}."

    def __reduce__(self) -> Any:
        return (DeploymentUnavailableError, (self.deployment_id, self.reason))


class ReplicaUnavailableError(RayServeException):
    """The replica a request was sent to is gone."""


class ReplicaDiedError(ReplicaUnavailableError):
    """The replica's process died while it held the request; the request did not complete."""


class ShoalConnectionError(RayServeException):
    """No shoal supervisor answers at the address the client was given."""


class RemoteError:
    """Mixin of the exception classes built by ``as_remote_error``.

    ``cause`` is the exception raised in the replica and ``remote_traceback`` its formatted
    traceback (including the tracebacks of any deployments further down the call chain).
    """

    cause: BaseException
    remote_traceback: str

    def __str__(self) -> str:
        return f"{self.cause}\n\n{self.remote_traceback.rstrip()}"

    def __reduce__(self) -> Any:
        # Travel as the original exception plus the traceback text; rebuilt on arrival.
        return (as_remote_error, (self.cause, self.remote_traceback))


_remote_classes: dict[type, type] = {}


def as_remote_error(cause: BaseException, remote_traceback: str) -> BaseException:
    """Return an exception that is an instance of ``type(cause)`` and shows ``remote_traceback``.

    The returned object's class subclasses both ``type(cause)`` and ``RemoteError``; its
    attributes and ``args`` are those of ``cause``. If the cause's class cannot be subclassed,
    a ``RayServeException`` carrying the same text is returned instead.
    """
    cls = type(cause)
    if isinstance(cause, RemoteError):
        return cause
    remote_cls: Any = _remote_classes.get(cls)
    if remote_cls is None:
        try:
            remote_cls = type(cls.__name__, (RemoteError, cls), {"__module__": cls.__module__})
        except TypeError:
            return RayServeException(f"{cls.__name__}: {cause}\n\n{remote_traceback}")
        _remote_classes[cls] = remote_cls
    try:
        err: Any = remote_cls.__new__(remote_cls)
    except TypeError:
        return RayServeException(f"{cls.__name__}: {cause}\n\n{remote_traceback}")
    err.args = cause.args
    if hasattr(cause, "__dict__"):
        err.__dict__.update(cause.__dict__)
    err.cause = cause
    err.remote_traceback = remote_traceback
    made: BaseException = err
    return made

"""Where code is running: the replica context (per process) and the request context (per call).

``get_replica_context()`` answers inside a replica only; ``current_request()`` is a contextvar,
so it follows a request into threads that run sync user code and into tasks it starts.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.runtime.errors import RayServeException

if TYPE_CHECKING:
    from shoal.serve.schema import ReplicaRank


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str
    deployment_name: str
    app_name: str

    def to_full_id_str(self) -> str:
        return f"{self.app_name}#{self.deployment_name}#{self.unique_id}"


@dataclass
class ReplicaContext:
    """What a replica knows about itself (Ray's ``ReplicaContext``).

    ``rank`` (a ``shoal.serve.schema.ReplicaRank``) and ``world_size`` (the deployment's target
    number of replicas) are kept up to date by the controller while the replica runs; ``rank``
    is None only outside a replica process (local testing mode has rank 0).
    """

    replica_id: ReplicaID
    servable_object: Any = None
    world_size: int = 1
    code_version: str = ""
    max_ongoing_requests: int = 5  # kept current by the replica (``@serve.batch`` warns against it)
    rank: ReplicaRank | None = None

    @property
    def app_name(self) -> str:
        return self.replica_id.app_name

    @property
    def deployment(self) -> str:
        return self.replica_id.deployment_name

    @property
    def replica_tag(self) -> str:
        return self.replica_id.unique_id


@dataclass(frozen=True)
class RequestContext:
    """Per-request facts (Ray's ``_RequestContext``)."""

    request_id: str = ""
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    session_id: str = ""
    is_http_request: bool = False


_replica_context: ReplicaContext | None = None
_request_context: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "shoal_request_context", default=RequestContext()  # noqa: B039 (frozen: never mutated)
)


def set_replica_context(ctx: ReplicaContext) -> None:
    global _replica_context
    _replica_context = ctx


def get_replica_context() -> ReplicaContext:
    """The context of the replica this code runs in; RayServeException outside a replica."""
    if _replica_context is None:
        raise RayServeException(
            "`serve.get_replica_context()` may only be called from within a shoal deployment."
        )
    return _replica_context


def in_replica() -> bool:
    return _replica_context is not None


def current_request() -> RequestContext:
    return _request_context.get()


def set_request(ctx: RequestContext) -> contextvars.Token[RequestContext]:
    return _request_context.set(ctx)


def reset_request(token: contextvars.Token[RequestContext]) -> None:
    _request_context.reset(token)

"""``shoal.serve.request_router``: what a custom request router is written with (Ray's
``ray.serve.request_router``).

Subclass ``RequestRouter`` (with the mixins you want) and implement
``async choose_replicas(candidate_replicas, pending_request) -> list[list[RunningReplica]]``;
deploy it with ``request_router_config=RequestRouterConfig(request_router_class=...)``.
On one machine every replica is on the caller's node: ``LocalityMixin``'s tiers are one tier.
"""

from shoal.runtime.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

__all__ = [
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "ReplicaID",
    "ReplicaResult",
    "RequestRouter",
    "RunningReplica",
]

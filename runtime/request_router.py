"""Request routers: Ray Serve's ``RequestRouter`` interface, its mixins, and the built-in
power-of-two-choices router.

A request router is the policy half of routing: given the replicas of one deployment and a
request waiting to be sent, ``choose_replicas`` returns ranked tiers of candidates. The
mechanism half stays in ``router.Router`` (one per caller process and deployment): connections,
the FIFO queue, ``max_ongoing_requests``, the REJECTED protocol, cancellation, replica deaths.
The router picks, within the first tier that has one, the candidate with the lowest queue length
below its limit (queue lengths as this caller knows them: its own requests in flight, or the
replica's own count from a recent reply, whichever is higher), and backs off
(``initial_backoff_s`` doubling by ``backoff_multiplier`` up to ``max_backoff_s``) when none has
room.

The built-in ``PowerOfTwoChoicesRequestRouter`` is a ``RequestRouter`` like any other; the
router core also uses its synchronous ``choose_now`` directly (no task, no future per request),
so the default routing costs what it did before routers became pluggable.

One machine: every replica runs on the machine of every caller, so ``node_id`` is the same for
all of them and ``availability_zone`` is None. ``LocalityMixin``'s tiers (same node, same zone,
all) therefore collapse into one: all replicas.
"""

from __future__ import annotations

import asyncio
import math
import platform
import random
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from shoal.runtime import p2c, wire
from shoal.runtime.context import ReplicaID
from shoal.runtime.imports import import_attr

__all__ = [
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "PowerOfTwoChoicesRequestRouter",
    "ReplicaID",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RequestRoutingContext",
    "RunningReplica",
]

T = TypeVar("T")

NODE_ID = platform.node() or "localhost"  # the one node: this machine
MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S = 1.0  # Ray's RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S


class DeploymentHandleSource(str, Enum):
    """Who routes: the HTTP proxy, a replica (composition) or another process (the driver)."""

    PROXY = "PROXY"
    REPLICA = "REPLICA"
    UNKNOWN = "UNKNOWN"


class LocalityScope(str, Enum):
    NODE = "NODE"
    AVAILABILITY_ZONE = "AVAILABILITY_ZONE"


@dataclass
class RequestMetadata:
    """What a router knows about a request besides its arguments (Ray's ``RequestMetadata``)."""

    request_id: str
    internal_request_id: str
    call_method: str = "__call__"
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    session_id: str = ""
    is_streaming: bool = False
    is_http_request: bool = False


@dataclass
class RequestRoutingContext:
    """Per-request routing progress kept by the mixins between ``choose_replicas`` calls."""

    multiplexed_start_matching_time: float | None = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


@dataclass(eq=False)
class PendingRequest:
    """A request waiting for a replica.

    ``args``/``kwargs`` are the call's arguments, decoded on first access (for an HTTP request
    they are empty: routers never decode what an HTTP client sent). ``future`` is done once the
    request was given a replica (or ended, e.g. cancelled).
    """

    metadata: RequestMetadata
    created_at: float
    future: asyncio.Future[Any]
    routing_context: RequestRoutingContext = field(default_factory=RequestRoutingContext)
    _decode: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None = None
    _decoded: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._decoded is None:
            self._decoded = self._decode() if self._decode is not None else ((), {})
        return self._decoded

    @property
    def args(self) -> list[Any]:
        return list(self._arguments()[0])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self._arguments()[1])

    def reset_future(self) -> None:
        """A fresh future, for a request routed again (after a replica rejected it)."""
        self.future = self.future.get_loop().create_future()


class ReplicaResult:
    """A request sent to a replica, as ``on_request_routed`` sees it."""

    def __init__(self, request_id: str, replica_id: ReplicaID, cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self._cancel = cancel

    def cancel(self) -> None:
        """Cancel the request (its caller gets RequestCancelledError)."""
        self._cancel()


class RunningReplica:
    """A replica a request router may choose (Ray's ``RunningReplica``).

    ``multiplexed_model_ids`` are the models the replica has loaded or is loading, as last
    reported; ``routing_stats`` what its ``record_routing_stats()`` last returned ({} before
    the first call). ``node_id`` is this machine's, ``availability_zone`` None (one machine).
    """

    def __init__(
        self,
        replica_id: ReplicaID,
        max_ongoing_requests: int,
        queue_len: Callable[[], int],
        conn: Any = None,
    ) -> None:
        self._replica_id = replica_id
        self._max_ongoing_requests = max_ongoing_requests
        self._queue_len = queue_len
        self._conn = conn  # the router core's connection to the replica
        self._model_ids: frozenset[str] = frozenset()
        self._stats_encoded: tuple[int, bytes] | None = None
        self._stats: dict[str, Any] | None = None

    def _update(self, max_ongoing_requests: int, model_ids: Collection[str], stats: tuple[int, bytes] | None) -> None:
        self._max_ongoing_requests = max_ongoing_requests
        self._model_ids = frozenset(model_ids)
        if stats != self._stats_encoded:
            self._stats_encoded, self._stats = stats, None

    @property
    def replica_id(self) -> ReplicaID:
        return self._replica_id

    @property
    def actor_id(self) -> str:
        """The replica's full id (there are no actors: one process per replica)."""
        return self._replica_id.to_full_id_str()

    @property
    def node_id(self) -> str:
        return NODE_ID

    @property
    def availability_zone(self) -> str | None:
        return None

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set(self._model_ids)

    @property
    def routing_stats(self) -> dict[str, Any]:
        if self._stats is None:
            if self._stats_encoded is None:
                return {}
            enc, data = self._stats_encoded
            self._stats = wire.loads(enc, data)
        return dict(self._stats or {})

    @property
    def max_ongoing_requests(self) -> int:
        return self._max_ongoing_requests

    @property
    def is_cross_language(self) -> bool:
        return False

    @property
    def replica_metadata(self) -> dict[str, Any]:
        return {}

    async def get_queue_len(self, *, deadline_s: float) -> int:
        """The replica's queue length as this caller knows it (no round trip: see the module)."""
        return self._queue_len()

    def __repr__(self) -> str:
        return f"RunningReplica({self._replica_id.to_full_id_str()})"


class LocalityMixin:
    """Prefer replicas on this node, then in this availability zone, then any.

    On one machine every replica is on this node, so the tiers are all the same set.
    """

    def __init__(
        self,
        self_node_id: str | None = NODE_ID,
        prefer_local_node_routing: bool = False,
        prefer_local_az_routing: bool = False,
        self_availability_zone: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._self_node_id = self_node_id
        self._prefer_local_node_routing = prefer_local_node_routing
        self._prefer_local_az_routing = prefer_local_az_routing
        self._self_availability_zone = self_availability_zone
        self._colocated_replica_ids: defaultdict[LocalityScope, set[ReplicaID]] = defaultdict(set)

    def _update_colocated_replica_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        colocated: defaultdict[LocalityScope, set[ReplicaID]] = defaultdict(set)
        for r in replicas:
            if self._self_node_id is not None and r.node_id == self._self_node_id:
                colocated[LocalityScope.NODE].add(r.replica_id)
            if self._self_availability_zone is not None and r.availability_zone == self._self_availability_zone:
                colocated[LocalityScope.AVAILABILITY_ZONE].add(r.replica_id)
        self._colocated_replica_ids = colocated

    def _discard_colocated_replica_ids_on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        for ids in self._colocated_replica_ids.values():
            ids.discard(replica_id)

    def apply_locality_routing(self, pending_request: PendingRequest | None = None) -> set[ReplicaID]:
        """Candidate ids for this attempt: same node (once), same zone (once), then all."""
        all_ids: set[ReplicaID] = getattr(self, "_replica_id_set", set())
        if pending_request is None:
            return all_ids
        ctx = pending_request.routing_context
        node = self._colocated_replica_ids[LocalityScope.NODE]
        zone = self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        if self._prefer_local_node_routing and not ctx.tried_same_node and node:
            ctx.tried_same_node, ctx.should_backoff = True, False
            return node
        if self._prefer_local_az_routing and not ctx.tried_same_az and zone:
            ctx.tried_same_az, ctx.should_backoff = True, False
            return zone
        ctx.should_backoff = True
        return all_ids

    def rank_replicas_via_locality(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Three tiers: on this node, in this zone, the rest (on one machine: all in the first)."""
        ranked: list[list[RunningReplica]] = [[], [], []]
        node = self._colocated_replica_ids[LocalityScope.NODE]
        zone = self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        for r in replicas:
            ranked[0 if r.replica_id in node else 1 if r.replica_id in zone else 2].append(r)
        return ranked


class MultiplexMixin:
    """Prefer replicas that hold the request's multiplexed model.

    For a matching timeout (random in [1, 2) s) a request tries the replicas holding its model;
    when none does (the first request for a model), or they had no room the first time, the
    replicas with the fewest models loaded; after the timeout, those once more, then all.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._multiplexed_model_id_to_replica_ids: defaultdict[str, set[ReplicaID]] = defaultdict(set)
        self._multiplexed_model_id_fallback_match: set[str] = set()

    def _update_multiplexed_model_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        by_model: defaultdict[str, set[ReplicaID]] = defaultdict(set)
        for r in replicas:
            for model_id in r.multiplexed_model_ids:
                by_model[model_id].add(r.replica_id)
        self._multiplexed_model_id_to_replica_ids = by_model

    def _get_replica_ids_with_fewest_multiplexed_models(self) -> set[ReplicaID]:
        replicas: dict[ReplicaID, RunningReplica] = getattr(self, "_replicas", {})
        if not replicas:
            return set()
        fewest = min(len(r.multiplexed_model_ids) for r in replicas.values())
        return {rid for rid, r in replicas.items() if len(r.multiplexed_model_ids) == fewest}

    @property
    def _multiplexed_matching_timeout(self) -> float:
        return random.uniform(MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S, 2 * MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S)

    def apply_multiplex_routing(self, pending_request: PendingRequest | None = None) -> set[ReplicaID]:
        """Candidate ids for this attempt of a multiplexed request (see the class docstring)."""
        all_ids: set[ReplicaID] = getattr(self, "_replica_id_set", set())
        if pending_request is None:
            return all_ids
        now: float = getattr(self, "_get_curr_time_s", time.time)()
        ctx = pending_request.routing_context
        if ctx.multiplexed_start_matching_time is None:
            ctx.multiplexed_start_matching_time = now
        model_id = pending_request.metadata.multiplexed_model_id
        ctx.should_backoff = True
        if now - ctx.multiplexed_start_matching_time < self._multiplexed_matching_timeout:
            holders = self._multiplexed_model_id_to_replica_ids.get(model_id)
            first_for_model = not holders and model_id not in self._multiplexed_model_id_fallback_match
            if first_for_model or ctx.tried_first_multiplexed_models:
                candidates = self._get_replica_ids_with_fewest_multiplexed_models()
                self._multiplexed_model_id_fallback_match.add(model_id)
            else:
                candidates = set(holders or ())
                if holders:
                    self._multiplexed_model_id_fallback_match.discard(model_id)
            ctx.tried_first_multiplexed_models = True
            return candidates
        if not ctx.tried_fewest_multiplexed_models:
            ctx.tried_fewest_multiplexed_models = True
            return self._get_replica_ids_with_fewest_multiplexed_models()
        return all_ids

    def rank_replicas_via_multiplex(self, replicas: list[RunningReplica], multiplexed_model_id: str) -> list[list[RunningReplica]]:
        """Three tiers: holding the model, with the fewest models, the rest."""
        holders = self._multiplexed_model_id_to_replica_ids.get(multiplexed_model_id, set())
        fewest = self._get_replica_ids_with_fewest_multiplexed_models()
        ranked: list[list[RunningReplica]] = [[], [], []]
        for r in replicas:
            ranked[0 if r.replica_id in holders else 1 if r.replica_id in fewest else 2].append(r)
        return ranked


class FIFOMixin:
    """Requests get replicas in arrival order: a replica found by any routing task goes to the
    oldest waiting request with the same multiplexed model id, else to the oldest waiting
    request. Without this mixin, a replica goes to the request it was chosen for."""


class RequestRouter(ABC):
    """Chooses replicas for one caller process's requests to one deployment.

    Subclasses implement ``choose_replicas``; ``initialize_state`` receives
    ``RequestRouterConfig.request_router_kwargs``. The hooks (``on_request_routed``,
    ``on_request_completed``, ``on_new_queue_len_info``, ``on_replica_actor_died``) run on the
    caller's runtime loop and must not block.
    """

    max_num_routing_tasks_cap = 50

    def __init__(
        self,
        deployment_id: Any,
        handle_source: DeploymentHandleSource = DeploymentHandleSource.UNKNOWN,
        self_actor_id: str | None = None,
        self_actor_handle: Any = None,
        use_replica_queue_len_cache: bool = True,
        get_curr_time_s: Callable[[], float] | None = None,
        create_replica_wrapper_func: Callable[..., RunningReplica] | None = None,
        initial_backoff_s: float = 0.025,
        backoff_multiplier: float = 2.0,
        max_backoff_s: float = 0.5,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._deployment_id = deployment_id
        self._handle_source = handle_source
        self._self_actor_id = self_actor_id
        self._get_curr_time_s: Callable[[], float] = get_curr_time_s or time.time
        self.initial_backoff_s = initial_backoff_s
        self.backoff_multiplier = backoff_multiplier
        self.max_backoff_s = max_backoff_s
        self._replicas: dict[ReplicaID, RunningReplica] = {}
        self._replica_id_set: set[ReplicaID] = set()
        self._replicas_list: list[RunningReplica] = []

    # -- what subclasses implement or override ---------------------------------------------------

    def initialize_state(self, **kwargs: Any) -> None:  # noqa: B027 (an optional hook)
        """Called once after construction with ``request_router_kwargs``."""

    @abstractmethod
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranked tiers of replicas for ``pending_request`` (most preferred first); the router
        sends to the least loaded replica with room in the first tier that has one, else
        backs off and asks again."""

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:  # noqa: B027 (an optional hook)
        """A request was sent to ``replica_id``."""

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:  # noqa: B027 (an optional hook)
        """A request sent to ``replica_id`` ended (any outcome)."""

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:  # noqa: B027 (an optional hook)
        """A replica said how many requests it runs (on every reply that ends a request)."""

    def on_send_request(self, replica_id: ReplicaID) -> None:  # noqa: B027 (an optional hook)
        """A request is being sent to ``replica_id``."""

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """The replica's process exited: it is no longer a candidate."""
        self._replicas.pop(replica_id, None)
        self._replica_id_set.discard(replica_id)
        self._replicas_list = list(self._replicas.values())
        discard = getattr(self, "_discard_colocated_replica_ids_on_replica_actor_died", None)
        if discard is not None:
            discard(replica_id)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:  # noqa: B027 (an optional hook)
        """The replica could not be reached for now (no effect: queue lengths are not cached
        apart from the router's own counts)."""

    # -- helpers ---------------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replicas that may be chosen from now on (from the controller's snapshots)."""
        update_colocated = getattr(self, "_update_colocated_replica_ids_with_replicas", None)
        if update_colocated is not None:
            update_colocated(replicas)
        update_models = getattr(self, "_update_multiplexed_model_ids_with_replicas", None)
        if update_models is not None:
            update_models(replicas)
        self._replicas = {r.replica_id: r for r in replicas}
        self._replica_id_set = set(self._replicas)
        self._replicas_list = list(replicas)

    def select_available_replicas(self, candidates: list[RunningReplica] | None = None) -> list[RunningReplica]:
        """The ``candidates`` (default: all replicas) whose queue length is below their
        ``max_ongoing_requests``, as this caller knows it."""
        pool = self._replicas_list if candidates is None else candidates
        return [r for r in pool if r._queue_len() < r.max_ongoing_requests]

    def _compute_backoff_s(self, attempt: int) -> float:
        try:
            return min(self.initial_backoff_s * self.backoff_multiplier**attempt, self.max_backoff_s)
        except OverflowError:
            return self.max_backoff_s

    def update_backoff_params(self, initial_backoff_s: float, backoff_multiplier: float, max_backoff_s: float) -> None:
        self.initial_backoff_s = initial_backoff_s
        self.backoff_multiplier = backoff_multiplier
        self.max_backoff_s = max_backoff_s

    @property
    def curr_replicas(self) -> dict[ReplicaID, RunningReplica]:
        return self._replicas

    @property
    def replica_id_set(self) -> set[ReplicaID]:
        return self._replica_id_set

    @property
    def app_name(self) -> str:
        return str(getattr(self._deployment_id, "app_name", ""))

    @property
    def max_num_routing_tasks(self) -> int:
        return min(self.max_num_routing_tasks_cap, 2 * len(self._replicas))


class PowerOfTwoChoicesRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Two random candidates, the one with the shorter queue (Ray Serve's default router).

    A multiplexed request first considers the replicas holding its model (``MultiplexMixin``);
    any other request, every replica (``LocalityMixin``, one tier on one machine).
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request)
        else:
            ids = self.apply_locality_routing(pending_request)
        pool = [self._replicas[i] for i in ids if i in self._replicas]
        n = len(pool)
        if n <= 2:
            random.shuffle(pool)
            return [pool] if pool else []
        i = random.randrange(n)
        j = random.randrange(n - 1)
        return [[pool[i], pool[j + 1 if j >= i else j]]]

    @staticmethod
    def choose_now(
        available: Sequence[T],
        multiplexed_model_id: str,
        model_ids: Callable[[T], Collection[str]],
        load: Callable[[T], int],
        rng: random.Random,
    ) -> T | None:
        """The router core's synchronous choice among replicas with room (``available``).

        Without a model id: power of two choices. With one: among the replicas holding the
        model; if none of those has room, among those with the fewest models loaded (where a
        new model is best loaded). Unlike ``choose_replicas`` it never waits for a holder to
        free up: a request goes to a replica with room at once, as Ray's does once its
        matching attempt failed.
        """
        if not multiplexed_model_id or not available:
            return p2c.choose(available, load, rng)
        holders = [r for r in available if multiplexed_model_id in model_ids(r)]
        if not holders:
            fewest = min(len(model_ids(r)) for r in available)
            holders = [r for r in available if len(model_ids(r)) == fewest]
        return p2c.choose(holders, load, rng)


def lowest_queue_len(candidates: Sequence[RunningReplica]) -> RunningReplica | None:
    """The candidate with the lowest queue length below its limit (ties: the first), or None."""
    best: RunningReplica | None = None
    best_len = math.inf
    for r in candidates:
        queue_len = r._queue_len()
        if queue_len < r.max_ongoing_requests and queue_len < best_len:
            best, best_len = r, queue_len
    return best


def router_class(spec: str | bytes) -> type[RequestRouter]:
    """The request router class a ``RouterSpec`` names: the built-in one for its path (or an
    empty spec), an imported class for another path, an unpickled one for bytes (a class
    pickled by value at deploy). ValueError naming it if it is not a ``RequestRouter``."""
    if not spec or spec == wire.DEFAULT_ROUTER:
        return PowerOfTwoChoicesRequestRouter
    if isinstance(spec, bytes):
        import cloudpickle

        cls = cloudpickle.loads(spec)
        name = getattr(cls, "__qualname__", repr(cls))
    else:
        cls = import_class(spec)
        name = spec
    if not (isinstance(cls, type) and issubclass(cls, RequestRouter)):
        raise ValueError(f"request_router_class {name!r} is not a subclass of RequestRouter.")
    return cls


def import_class(path: str) -> Any:
    """The attribute an import path (``module:attr`` or ``module.attr``) names; ValueError
    saying why if it does not import."""
    try:
        return import_attr(path)
    except ImportError as exc:
        raise ValueError(f"request_router_class {path!r} could not be imported: {exc}") from exc

"""Request routers and multiplexed deployments for ``test_request_routing.py`` (importable by
path, as a config file names them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shoal import serve
from shoal.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class PinnedRouter(FIFOMixin, RequestRouter):
    """Every request to the replica whose id sorts first (or last, with ``pick="last"``)."""

    def initialize_state(self, pick: str = "first") -> None:
        self.pick = pick

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        return [[ordered[0] if self.pick == "first" else ordered[-1]]]


class HighestStatRouter(RequestRouter):
    """Every request to the replica whose routing stats say the highest ``score``, once every
    replica has reported its stats (until then nothing is chosen: the router backs off)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas or any("score" not in r.routing_stats for r in candidate_replicas):
            return []
        return [[max(candidate_replicas, key=lambda r: r.routing_stats["score"])]]


@serve.deployment(num_replicas=3)
class Whoami:
    def __call__(self, *args: Any) -> str:
        return serve.get_replica_context().replica_tag


@serve.deployment(num_replicas=2)
class Scored:
    def record_routing_stats(self) -> dict[str, Any]:
        return {"score": int(serve.get_replica_context().replica_tag, 16)}

    async def __call__(self) -> str:
        return serve.get_replica_context().replica_tag


class Model:
    def __init__(self, model_id: str, log: Path) -> None:
        self.model_id = model_id
        self.log = log
        self.unloaded = False
        self._append(f"load {model_id}")

    def _append(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"{line} {os.getpid()}\n")

    def __del__(self) -> None:
        if not self.unloaded:  # the cache calls it; the garbage collector may call it again
            self.unloaded = True
            self._append(f"del {self.model_id}")


@serve.deployment
class Multiplexed:
    def __init__(self, log: str) -> None:
        self.log = Path(log)

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        return Model(model_id, self.log)

    async def __call__(self, *args: Any) -> list[Any]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return [model.model_id, os.getpid()]


app = Whoami.bind()

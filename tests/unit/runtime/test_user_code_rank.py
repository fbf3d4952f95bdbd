"""UserCallable.construct/reconfigure with ranks, by Ray's rules (``call_reconfigure``): a
``reconfigure`` with a ``rank`` parameter is called with the rank even without a user_config;
one without it is called only for a user_config. No process is started."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal.runtime.errors import RayServeException
from shoal.runtime.user_code import UserCallable
from shoal.serve.schema import ReplicaRank


class WantsRank:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    async def reconfigure(self, user_config: Any, rank: ReplicaRank) -> None:
        self.calls.append((user_config, rank))


class ConfigOnly:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def reconfigure(self, user_config: Any) -> None:
        self.calls.append(user_config)


class NoReconfigure:
    pass


def constructed(target: Any, user_config: Any = None, rank: Any = 0, then: Any = None) -> UserCallable:
    """``target`` constructed (then ``then(user)`` awaited) on one event loop."""
    user = UserCallable(deployment_name="D", func_or_class=target, init_args=(), init_kwargs={}, max_ongoing_requests=1)

    async def run() -> None:
        try:
            await user.construct(user_config, rank=rank)
            if then is not None:
                await then(user)
        finally:
            await user.destroy()

    asyncio.run(run())
    return user


def test_a_reconfigure_taking_rank_gets_it_without_a_user_config() -> None:
    rank = ReplicaRank(rank=2, node_rank=0, local_rank=2)
    new = ReplicaRank(rank=1, node_rank=0, local_rank=1)
    user = constructed(WantsRank, rank=rank, then=lambda u: u.reconfigure({"a": 1}, new))
    assert user.instance.calls == [(None, rank), ({"a": 1}, new)]


def test_a_reconfigure_without_rank_runs_only_for_a_user_config() -> None:
    assert constructed(ConfigOnly).instance.calls == []
    assert constructed(ConfigOnly, {"a": 1}).instance.calls == [{"a": 1}]


def test_a_user_config_needs_a_reconfigure_method_and_a_class() -> None:
    with pytest.raises(RayServeException, match="user_config or rank specified"):
        constructed(NoReconfigure, {"a": 1})
    constructed(NoReconfigure)  # nothing to call: fine

    def function() -> str:
        return "ok"

    with pytest.raises(ValueError, match="deployment_def must be a class to use user_config or rank"):
        constructed(function, {"a": 1})

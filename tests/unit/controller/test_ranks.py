"""shoal.controller.ranks: assignment and minimal compaction (Ray's DeploymentRankManager)."""

from __future__ import annotations

from shoal.controller.ranks import compact, next_rank, next_ranks, replica_rank
from shoal.serve.schema import ReplicaRank


def test_a_new_replica_takes_the_smallest_free_rank() -> None:
    assert next_rank([]) == 0
    assert next_rank([0, 1, 2]) == 3
    assert next_rank([0, 2, 3]) == 1  # the smallest released one is reused
    assert next_ranks([1], 3) == [0, 2, 3]


def test_compact_keeps_the_ranks_in_range_and_moves_the_rest_in_order() -> None:
    assert compact({"a": 0, "b": 1, "c": 2}) == {}
    assert compact({"a": 0, "c": 2}) == {"c": 1}
    assert compact({"a": 5, "b": 1, "c": 7}) == {"a": 0, "c": 2}
    assert compact({"a": 1, "b": 1}) == {"b": 0}  # a duplicate moves (never happens, but is repaired)
    assert compact({}) == {}


def test_on_one_machine_node_rank_is_zero_and_local_rank_is_the_rank() -> None:
    assert replica_rank(3) == ReplicaRank(rank=3, node_rank=0, local_rank=3)

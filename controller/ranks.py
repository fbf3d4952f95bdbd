"""Replica ranks, as pure functions (Ray Serve's ``DeploymentRankManager``, on one node).

Each replica of a deployment holds a rank from the moment it starts until its process has
exited (so a draining replica keeps it), and ranks are kept contiguous from 0:

- a starting replica takes the smallest rank no replica of the deployment holds (Ray reuses
  the smallest released rank, else the next new one: the same number);
- once the deployment is stable (HEALTHY, every replica running), ranks that left a gap are
  reassigned with as few changes as possible: a replica whose rank is below the replica count
  keeps it, the others take the missing ranks in ascending order (``compact``); each changed
  replica is told through its reconfigure path.

On one machine the node rank is always 0 and the local rank equals the rank (Ray keeps local
ranks per node by the same rules, so on a single node they are the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shoal.serve.schema import ReplicaRank

NODE_RANK = 0


def replica_rank(rank: int) -> ReplicaRank:
    """The full rank of a replica of global rank ``rank`` on this machine."""
    return ReplicaRank(rank=rank, node_rank=NODE_RANK, local_rank=rank)


def next_rank(held: Iterable[int]) -> int:
    """The rank a starting replica takes when the deployment's replicas hold ``held``."""
    taken = set(held)
    rank = 0
    while rank in taken:
        rank += 1
    return rank


def next_ranks(held: Iterable[int], count: int) -> list[int]:
    """The ranks ``count`` replicas starting one after another take."""
    taken = set(held)
    ranks = []
    for _ in range(count):
        rank = next_rank(taken)
        taken.add(rank)
        ranks.append(rank)
    return ranks


def compact(ranks: Mapping[str, int]) -> dict[str, int]:
    """The minimal reassignment that makes ``ranks`` (replica id -> rank, in the replicas' order)
    exactly ``0..n-1``: only the replicas whose rank changes, with their new rank."""
    n = len(ranks)
    free = set(range(n))
    movers = []
    for replica_id, rank in ranks.items():
        if rank in free:
            free.discard(rank)
        else:  # out of range, or a duplicate of an earlier replica's
            movers.append(replica_id)
    return dict(zip(movers, sorted(free), strict=True))

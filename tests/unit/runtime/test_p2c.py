"""shoal.runtime.p2c.choose: power of two choices, with a seeded random.Random."""

from __future__ import annotations

import collections
import random

import pytest

from shoal.runtime.p2c import choose


def _load_of(loads: dict[str, int]):  # type: ignore[no-untyped-def]
    return lambda name: loads[name]


def test_no_candidates_gives_none() -> None:
    assert choose([], _load_of({}), random.Random(0)) is None


def test_one_candidate_is_chosen_whatever_its_load() -> None:
    assert choose(["a"], _load_of({"a": 1000}), random.Random(0)) == "a"


@pytest.mark.parametrize("seed", range(20))
def test_of_two_the_less_loaded_is_chosen(seed: int) -> None:
    # With two candidates both are always sampled, so the lower load always wins.
    loads = {"a": 3, "b": 1}
    assert choose(["a", "b"], _load_of(loads), random.Random(seed)) == "b"
    assert choose(["b", "a"], _load_of(loads), random.Random(seed)) == "b"


@pytest.mark.parametrize("seed", range(20))
def test_the_pick_is_never_the_worse_of_the_two_sampled(seed: int) -> None:
    # Replay the two samples with an identically seeded rng: the pick is the lower-loaded of
    # them (ties: the first sampled), and it is never the most loaded candidate overall.
    candidates = [f"r{i}" for i in range(6)]
    loads = {name: (i * 7) % 5 for i, name in enumerate(candidates)}
    shadow = random.Random(seed)
    i = shadow.randrange(len(candidates))
    j = shadow.randrange(len(candidates) - 1)
    j = j + 1 if j >= i else j
    first, second = candidates[i], candidates[j]
    expected = second if loads[second] < loads[first] else first
    picked = choose(candidates, _load_of(loads), random.Random(seed))
    assert picked == expected
    assert loads[picked] == min(loads[first], loads[second])


def test_two_distinct_candidates_are_sampled() -> None:
    # If the two samples could coincide, the most loaded candidate would sometimes be picked.
    candidates = ["a", "b", "c"]
    loads = {"a": 9, "b": 0, "c": 0}
    rng = random.Random(1234)
    picks = collections.Counter(choose(candidates, _load_of(loads), rng) for _ in range(3000))
    assert picks["a"] == 0
    assert picks["b"] > 0 and picks["c"] > 0


def test_deterministic_for_a_seed() -> None:
    candidates = list("abcdefgh")
    loads = dict.fromkeys(candidates, 0)

    def picks(seed: int) -> list[str | None]:
        rng = random.Random(seed)
        return [choose(candidates, _load_of(loads), rng) for _ in range(50)]

    assert picks(42) == picks(42)
    assert picks(42) != picks(43)


def test_equal_loads_spread_roughly_evenly() -> None:
    candidates = [f"r{i}" for i in range(4)]
    loads = dict.fromkeys(candidates, 0)
    rng = random.Random(7)
    n = 8000
    picks = collections.Counter(choose(candidates, _load_of(loads), rng) for _ in range(n))
    assert set(picks) == set(candidates)
    for name in candidates:
        assert abs(picks[name] - n / 4) < 0.1 * n / 4, picks


def test_simulated_routing_keeps_queues_balanced() -> None:
    # Route 4000 requests to 5 replicas that each finish one queued request per two arrivals
    # overall; with p2c on queue length, the longest queue stays within a small band of the
    # shortest, and every replica serves a similar share.
    rng = random.Random(2024)
    candidates = [f"r{i}" for i in range(5)]
    queue = dict.fromkeys(candidates, 0)
    served: collections.Counter[str] = collections.Counter()
    worst_spread = 0
    for step in range(4000):
        picked = choose(candidates, _load_of(queue), rng)
        assert picked is not None
        queue[picked] += 1
        served[picked] += 1
        if step % 2 == 1:
            for name in candidates:
                queue[name] = max(0, queue[name] - 1) if rng.random() < 0.5 else queue[name]
        worst_spread = max(worst_spread, max(queue.values()) - min(queue.values()))
    assert worst_spread <= 4
    shares = [served[name] / 4000 for name in candidates]
    assert max(shares) - min(shares) < 0.05, shares

"""Power of two choices: the replica choice of every router (proxy and handles).

``choose`` samples two distinct candidates at random and returns the one with the lower load
(ties go to the first sampled). With one candidate it returns that one; with none, None. Picking
the better of two random replicas keeps queue lengths within a small band of the best replica
without the herd effect of always picking the least loaded one (Mitzenmacher, "The Power of Two
Choices in Randomized Load Balancing"; Ray Serve's ``PowerOfTwoChoicesRequestRouter``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def choose(candidates: Sequence[T], load: Callable[[T], int], rng: random.Random) -> T | None:
    """Return the less loaded of two random ``candidates``; pure apart from ``rng``."""
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = candidates[i], candidates[j]
    return b if load(b) < load(a) else a

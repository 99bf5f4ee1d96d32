"""How a simulated trainer ranks K replies: gold scores plus Gaussian noise, calibrated per task.

Replies with equal gold scores form one tied level and share one noise draw; levels are sorted by
score + sigma * N(0, 1). For two levels whose scores differ by d, the noisy order keeps their gold
order with probability Phi(d / (sigma * sqrt 2)), so close replies are swapped more often than
distant ones. Sigma is solved per task so that the expected fraction of pairs (of replies whose
scores differ) kept in gold order equals `agreement`: about 75% by default, as for InstructGPT's labelers.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SimRanking:
    """Candidate indices best first, ties between neighbours, and whether every reply is bad."""

    order: list[int]
    ties: list[list[int]]
    all_bad: bool


def _expected_agreement(diffs: Sequence[float], sigma: float) -> float:
    if sigma == 0:
        return 1.0
    return sum(0.5 * (1 + math.erf(d / (2 * sigma))) for d in diffs) / len(diffs)


def noise_scale(scores: Sequence[float], agreement: float) -> float:
    """The sigma at which the noisy order agrees with the gold order on `agreement` of the differing pairs."""
    if not 0.5 < agreement <= 1:
        raise ValueError(f"agreement must be in (0.5, 1]: 0.5 is a random order; got {agreement}")
    diffs = [abs(a - b) for a, b in itertools.combinations(scores, 2) if a != b]
    if not diffs or agreement == 1:
        return 0.0
    low, high = 0.0, max(diffs)
    while _expected_agreement(diffs, high) > agreement:
        high *= 2
    for _ in range(100):  # bisection: the expected agreement falls as sigma grows
        mid = (low + high) / 2
        if _expected_agreement(diffs, mid) > agreement:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def noisy_ranking(scores: Sequence[float], rng: random.Random, agreement: float = 0.75) -> SimRanking:
    """A ranking of candidates 0..K-1 that follows `scores` with noise; equal scores are tied."""
    sigma = noise_scale(scores, agreement)
    levels = sorted(set(scores))
    noisy = {level: level + sigma * rng.gauss(0.0, 1.0) for level in levels}
    order: list[int] = []
    ties: list[list[int]] = []
    for level in sorted(levels, key=lambda v: -noisy[v]):
        members = [i for i, s in enumerate(scores) if s == level]
        rng.shuffle(members)  # tied replies: their order says nothing
        ties.extend([a, b] for a, b in itertools.pairwise(members))
        order.extend(members)
    return SimRanking(order, ties, all_bad=max(scores) <= 0)

"""Simulated rankings: gold order plus calibrated noise, ties on equal scores, all-bad when nothing scores."""

from __future__ import annotations

import itertools
import random

import pytest

from dialoop.collect.agreement import pair_agreement
from dialoop.sim.ranking import noise_scale, noisy_ranking

SCORE_LEVELS = [-0.5, -0.25, 0.0, 0.25, 0.5, 2 / 3, 0.75, 1.0, 0.9]


def _gold(scores: list[float]) -> tuple[list[int], list[list[int]]]:
    """The noise-free order as (order, ties)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ties = [[a, b] for a, b in itertools.pairwise(order) if scores[a] == scores[b]]
    return order, ties


def _agreement(target: float, trials: int, seed: int) -> float:
    rng = random.Random(seed)
    agreed = compared = 0
    for _ in range(trials):
        scores = [rng.choice(SCORE_LEVELS) for _ in range(4)]
        r = noisy_ranking(scores, rng, target)
        a, c = pair_agreement((r.order, r.ties), _gold(scores))
        agreed, compared = agreed + a, compared + c
    return agreed / compared


def test_default_agreement_with_the_gold_order_is_about_75_percent() -> None:
    assert 0.72 <= _agreement(0.75, 3000, seed=0) <= 0.78


@pytest.mark.parametrize("target", [0.6, 0.9])
def test_agreement_is_configurable(target: float) -> None:
    assert _agreement(target, 2000, seed=1) == pytest.approx(target, abs=0.03)


def test_calibration_does_not_depend_on_the_score_spread() -> None:
    rng = random.Random(2)
    for scores in ([0.0, 0.01, 0.02, 0.03], [-3.0, 0.0, 10.0, 100.0]):
        agreed = compared = 0
        for _ in range(3000):
            r = noisy_ranking(scores, rng)
            a, c = pair_agreement((r.order, r.ties), _gold(scores))
            agreed, compared = agreed + a, compared + c
        assert 0.72 <= agreed / compared <= 0.78, scores


def test_close_replies_are_swapped_more_often_than_distant_ones() -> None:
    rng = random.Random(3)
    scores = [1.0, 0.9, 0.0, -0.5]
    swaps_close = swaps_far = 0
    for _ in range(2000):
        order = noisy_ranking(scores, rng).order
        swaps_close += order.index(1) < order.index(0)
        swaps_far += order.index(3) < order.index(0)
    assert swaps_close > 3 * swaps_far


def test_equal_scores_are_tied_neighbours() -> None:
    rng = random.Random(4)
    for _ in range(200):
        r = noisy_ranking([0.5, 1.0, 0.5, 0.5], rng)
        assert sorted(r.order) == [0, 1, 2, 3]
        assert len(r.ties) == 2 and all(1 not in t for t in r.ties)
        positions = sorted(r.order.index(i) for i in (0, 2, 3))
        assert positions == list(range(positions[0], positions[0] + 3))  # contiguous
        assert all(abs(r.order.index(a) - r.order.index(b)) == 1 for a, b in r.ties)
    assert len(noisy_ranking([0.3] * 4, rng).ties) == 3


def test_all_bad_when_every_reply_scores_zero_or_less() -> None:
    rng = random.Random(5)
    assert noisy_ranking([0.0, -0.25, -0.5, 0.0], rng).all_bad
    assert not noisy_ranking([0.0, -0.25, 0.25, 0.0], rng).all_bad


def test_perfect_agreement_and_invalid_targets() -> None:
    rng = random.Random(6)
    scores = [0.2, 1.0, -0.25, 0.5]
    assert noisy_ranking(scores, rng, 1.0).order == [1, 3, 0, 2]
    assert noise_scale(scores, 1.0) == 0.0
    assert noise_scale([0.5, 0.5], 0.75) == 0.0
    for bad in (0.5, 0.3, 1.2):
        with pytest.raises(ValueError, match="agreement must be in"):
            noise_scale(scores, bad)

"""PPO math against hand-computed values: rewards, GAE, whitening, clipped losses, KL control, EOS penalty."""

from __future__ import annotations

import math

import pytest
import torch

from dialoop.modeling.scoring import token_logprobs
from dialoop.train.common import length_buckets
from dialoop.train.losses import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_moments,
    masked_whiten,
)
from dialoop.train.rollout import apply_missing_eos_score

T = torch.tensor


def close(actual: torch.Tensor, expected: list) -> bool:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32))
    return True


def test_kl_shaped_rewards_add_the_score_at_each_replys_last_token() -> None:
    logprobs = T([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = T([[-1.5, -2.0, -2.0], [-1.0, -0.25, -0.5]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = kl_shaped_rewards(logprobs, ref, T([5.0, -2.0]), mask, beta=0.1)
    assert close(kl, [[0.5, 0.0, 0.0], [0.5, -0.25, 0.0]])
    # row 0 ends at its second token: the score lands there, the padding gets nothing
    assert close(rewards, [[-0.05, 5.0, 0.0], [-0.05, 0.025, -2.0]])


def test_gae_matches_a_hand_computation_with_padding() -> None:
    rewards = T([[1.0, 0.0, 2.0], [1.0, 3.0, 0.0]])
    values = T([[0.5, 0.2, 0.1], [0.4, 0.6, 9.0]])  # 9.0 sits on padding and must be ignored
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: d2 = 2 - 0.1 = 1.9; d1 = 0 + 0.1 - 0.2 = -0.1, A1 = -0.1 + 0.95 * 1.9; d0 = 1 + 0.2 - 0.5
    a2, a1 = 1.9, -0.1 + 0.95 * 1.9
    a0 = 0.7 + 0.95 * a1
    # row 1 ends at t=1: the value after it is 0
    b1 = 3.0 - 0.6
    b0 = (1.0 + 0.6 - 0.4) + 0.95 * b1
    assert close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    assert close(ret, [[a0 + 0.5, a1 + 0.2, a2 + 0.1], [b0 + 0.4, b1 + 0.6, 0.0]])


def test_gae_discounts_with_gamma() -> None:
    adv, _ = gae_advantages(T([[0.0, 1.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), gamma=0.5, lam=1.0)
    assert close(adv, [[0.5, 1.0]])


def test_whitening_uses_masked_positions_only_and_accepts_global_moments() -> None:
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # moments summed over two "processes" give what one process holding both halves computes
    a, b = T([[1.0, 2.0]]), T([[3.0, 5.0]])
    ones = torch.ones(1, 2)
    moments = masked_moments(a, ones) + masked_moments(b, ones)
    both = masked_whiten(torch.cat([a, b], 1), torch.ones(1, 4))
    assert close(
        torch.cat([masked_whiten(a, ones, moments), masked_whiten(b, ones, moments)], 1), both.tolist()
    )


def test_clipped_policy_loss_matches_a_hand_computation() -> None:
    logprobs = T([[0.5, -0.1, 7.0]])
    old = T([[0.0, 0.0, 0.0]])
    adv = T([[1.0, -2.0, 3.0]])
    mask = T([[1.0, 1.0, 0.0]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logprobs, old, adv, mask, clip=0.2)
    r0, r1 = math.exp(0.5), math.exp(-0.1)
    # token 0: ratio 1.65 > 1.2 with A > 0 -> the clipped term (-1.2) wins; token 1: inside the range
    assert float(loss) == pytest.approx((-1.2 + 2.0 * r1) / 2)
    assert float(clip_frac) == pytest.approx(0.5)
    assert float(approx_kl) == pytest.approx(((r0 - 1 - 0.5) + (r1 - 1 + 0.1)) / 2)
    # a global token count replaces the local mean (several micro-batches or processes)
    loss_sum, _, _ = clipped_policy_loss(logprobs, old, adv, mask, clip=0.2, num_tokens=4.0)
    assert float(loss_sum) == pytest.approx((-1.2 + 2.0 * r1) / 4)


def test_clipped_policy_loss_gradient_vanishes_outside_the_trust_region() -> None:
    logprobs = T([[0.5, 0.0]], requires_grad=True)
    loss, _, _ = clipped_policy_loss(logprobs, T([[0.0, 0.0]]), T([[1.0, 1.0]]), T([[1.0, 1.0]]))
    loss.backward()
    assert logprobs.grad is not None
    assert close(logprobs.grad, [[0.0, -0.5]])  # clipped token: no push further


def test_clipped_value_loss_matches_a_hand_computation() -> None:
    values = T([[1.0, 0.0]])
    old = T([[0.5, 0.1]])
    returns = T([[2.0, 0.0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0 may move only to 0.7: error (0.7 - 2)^2 = 1.69 beats (1 - 2)^2 = 1; token 1: no error
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.0) / 2)
    assert float(clip_frac) == pytest.approx(0.5)


def test_log_probs_and_entropy_use_the_sampling_temperature() -> None:
    logits = T([[2.0, 1.0, 0.0]])
    lp = token_logprobs(logits, T([1]), temperature=0.5)
    assert float(lp) == pytest.approx(2.0 - math.log(math.exp(4.0) + math.exp(2.0) + 1.0))
    assert float(entropy_from_logits(torch.zeros(1, 8))) == pytest.approx(math.log(8))
    assert float(entropy_from_logits(T([[0.0, 50.0]]), temperature=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_ignores_padding() -> None:
    assert float(masked_mean(T([1.0, 2.0, 9.0]), T([1.0, 1.0, 0.0]))) == pytest.approx(1.5)


def test_adaptive_kl_controller_follows_ziegler() -> None:
    fixed = KLController(beta=0.02)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.02
    adaptive = KLController(beta=0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 100)  # error clipped to +0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.beta == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 100 / 10000))
    adaptive.update(float("nan"), 100)  # a skipped step does not move beta
    assert adaptive.beta == pytest.approx(0.1 * 1.002 * 0.999)


def test_replies_without_eos_score_at_most_the_penalty_score() -> None:
    scores = apply_missing_eos_score(T([0.7, 2.5, -0.3, -2.4]), T([True, False, True, False]), -1.0)
    # a cut reply the RM scored above the cap gets the cap; one it scored below keeps its lower score
    assert scores.tolist() == pytest.approx([0.7, -1.0, -0.3, -2.4])
    kept = apply_missing_eos_score(T([0.7, 2.5]), T([True, False]), None)
    assert kept.tolist() == pytest.approx([0.7, 2.5])


def test_length_buckets_cut_where_padding_would_cost_more_than_a_pass() -> None:
    lengths = [100, 50, 98, 52, 51, 101]
    groups = length_buckets(lengths, max_rows=6, overhead_tokens=16)
    assert sorted(sorted(lengths[i] for i in g) for g in groups) == [[50, 51, 52], [98, 100, 101]]
    assert length_buckets(lengths, max_rows=6, overhead_tokens=10_000) == [[5, 0, 2, 3, 4, 1]]
    assert all(len(g) <= 2 for g in length_buckets(lengths, max_rows=2, overhead_tokens=0))
    assert sorted(i for g in length_buckets(lengths, 4, 16) for i in g) == list(range(6))

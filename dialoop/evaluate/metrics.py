"""The report card's numbers: win rate, RM pairwise accuracy against the gold order, KL to a reference.

Pure functions over scores, plus `sequence_kl`, which scores replies with two models (no training).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from dialoop.modeling.scoring import SampledReply, pack_rollouts, response_logprobs
from dialoop.modeling.trunk import TrunkCache, shared_depth


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; NaN for no values (a report shows it as missing)."""
    return sum(values) / len(values) if values else math.nan


def stderr(values: Sequence[float]) -> float:
    """The standard error of the mean (sample standard deviation / sqrt n); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where `scores` beats `baseline` (same prompt order); a tie counts half."""
    if len(scores) != len(baseline):
        raise ValueError(f"{len(scores)} scores against {len(baseline)} baseline scores")
    if not scores:
        return math.nan
    points = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return points / len(scores)


def pair_accuracy(
    predicted: Sequence[Sequence[float]],
    gold: Sequence[Sequence[float]],
    keep: Callable[[int, int, int], bool] | None = None,
) -> tuple[float, int]:
    """Over every group (the candidates of one prompt), the pairs with different gold scores that
    `predicted` orders the same way (a predicted tie counts half): (accuracy, number of pairs).

    With `keep`, only the pairs (i, j) of group g for which `keep(g, i, j)` holds count."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} groups of predictions against {len(gold)} gold groups")
    points, pairs = 0.0, 0
    for group, (p, g) in enumerate(zip(predicted, gold, strict=True)):
        if len(p) != len(g):
            raise ValueError(f"a group has {len(p)} predictions for {len(g)} gold scores")
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] == g[j] or (keep is not None and not keep(group, i, j)):
                continue
            pairs += 1
            if p[i] == p[j]:
                points += 0.5
            elif (p[i] > p[j]) == (g[i] > g[j]):
                points += 1.0
    return (points / pairs if pairs else math.nan), pairs


@torch.no_grad()
def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[SampledReply],
    *,
    temperature: float = 1.0,
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> list[float]:
    """Per reply, sum over its tokens of log pi(token) - log pi_ref(token) under softmax(logits / T).

    On replies sampled from `policy` at temperature T, the mean is a Monte Carlo estimate of
    KL(pi || pi_ref) per reply, the quantity PPO's KL penalty holds down.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts for {len(replies)} replies")
    device = next(policy.parameters()).device
    policy.eval()
    reference.eval()
    # a policy trained above frozen blocks runs on the reference's output of those blocks
    trunk = TrunkCache()
    depth = shared_depth(policy, reference)
    if trunk.add(reference, depth):
        trunk.add(policy, depth, like=reference)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        exp = pack_rollouts(
            # right padding under an attention mask: which id pads does not change the log-probs
            prompts[start : start + batch_size],
            replies[start : start + batch_size],
            pad_token_id,
            device,
        )
        ref = response_logprobs(reference, exp, temperature, trunk)
        diff = response_logprobs(policy, exp, temperature, trunk) - ref
        out.extend(float(x) for x in (diff * exp.response_mask).sum(dim=1))
        trunk.clear()
    return out

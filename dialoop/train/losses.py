"""The PPO losses and math, one small named function each: masked means, KL-shaped rewards, GAE, whitening,
clipped policy and value losses, entropy, KL control.

Every function works on right-aligned per-token tensors of shape [batch, response_len] with a 0/1 `mask`
marking the reply's tokens (its EOS included); positions past a reply's end are padding and count nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is 1."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0 when the mask is empty)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """[sum, sum of squares, count] of `x` over the masked positions: add them up across processes."""
    return torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]).float()


def masked_whiten(x: Tensor, mask: Tensor, moments: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Shift and scale `x` to zero mean, unit (Bessel-corrected) variance over the masked positions.

    `moments` (see `masked_moments`) may come from a larger batch, e.g. summed over every process.
    """
    total, total_sq, n = masked_moments(x, mask) if moments is None else moments
    mean = total / n
    var = (total_sq / n - mean * mean) * n / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var.clamp(min=0) + eps) * mask


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, in nats."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_shaped_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards -beta * (log pi - log pi_ref), plus the RM score at each reply's last token.

    Returns (rewards, kl) where kl is the per-token estimate log pi - log pi_ref (0 on padding).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each reply; returns (advantages, returns = advantages + values).

    The value after a reply's last token is 0 (the episode ends there); padding gets 0 advantage.
    """
    values = values * mask
    rewards = rewards * mask
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def _token_mean(x: Tensor, mask: Tensor, num_tokens: Tensor | float | None) -> Tensor:
    """Masked mean, or masked sum / `num_tokens` when the denominator spans more than this batch."""
    return masked_mean(x, mask) if num_tokens is None else masked_sum(x, mask) / num_tokens


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    *,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate loss; returns (loss, clip fraction, approx KL = mean((ratio-1) - log ratio)).

    Means run over the masked tokens, or divide by `num_tokens` (the mini-batch's tokens over every
    micro-batch and process, so that accumulation and DDP give the loss of the whole mini-batch).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clip_frac = _token_mean((clipped > unclipped).float(), mask, num_tokens)
        # the k3 estimator of KL(old || new): unbiased and always >= 0
        approx_kl = _token_mean((ratio - 1) - log_ratio, mask, num_tokens)
    return loss, clip_frac, approx_kl


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    *,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2) where v_clipped stays within `clip` of the rollout's value."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped_err, clipped_err), mask, num_tokens)
    with torch.no_grad():
        clip_frac = _token_mean((clipped_err > unclipped_err).float(), mask, num_tokens)
    return loss, clip_frac


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted (Ziegler et al. 2019) to keep the KL near a target."""

    beta: float = 0.02
    target: float | None = None  # per-reply KL (nats) to aim for; None keeps beta fixed
    horizon: int = 10000  # episodes over which beta may change by a factor e

    def update(self, current_kl: float, n_episodes: int) -> None:
        """Adapt beta after a batch of `n_episodes` whose mean per-reply KL was `current_kl`."""
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_episodes / self.horizon

"""Making PPO's experience: sample one reply per prompt, score it, and turn the scores into advantages.

- `sample_rollouts`: replies from the policy (or its whole copy) through the generation engine
  (`dialoop.engine`, built once by `rollout_engine` and kept across steps: the weights it reads are the
  model's own, updated in place), seeded per row of the global batch (`row_seed`), packed right-padded
  (`dialoop.modeling.scoring.Experience`);
- `score_rollouts`: the reward (a frozen reward model, a function, or the value model with its LoRA adapters
  disabled), capped for replies without EOS (`apply_missing_eos_score`), the reference log-probs and, unless
  the learner's first pass gives them, the policy's log-probs and the values at sampling time;
- `compute_advantages`: per-token rewards -beta * KL + score at the last token, GAE, whitening.

Learning from the experience is `dialoop.train.learner`'s; the math `dialoop.train.losses`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dialoop.engine import Engine, EngineConfig, SamplingParams
from dialoop.modeling.scoring import Experience, pack_rollouts, response_logprobs, reward_model_scores
from dialoop.modeling.trunk import TrunkCache
from dialoop.train.losses import gae_advantages, kl_shaped_rewards, masked_moments, masked_whiten
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.strategy import Strategy

# (prompt ids, reply ids without padding, its EOS included when it has one) -> one score per reply
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Sequence[float]]


def function_scores(reward_fn: RewardFn, exp: Experience) -> Tensor:
    """[B] scores of a programmatic reward (tests, simulations) on the prompt and reply token ids."""
    prompts, replies = [], []
    for b in range(len(exp)):
        p, r = int(exp.prompt_lens[b]), int(exp.response_mask[b].sum())
        ids = exp.input_ids[b].tolist()
        prompts.append(ids[:p])
        replies.append(ids[p : p + r])
    scores = list(reward_fn(prompts, replies))
    if len(scores) != len(exp):
        raise ValueError(f"the reward function returned {len(scores)} scores for {len(exp)} replies")
    return torch.tensor([float(s) for s in scores], device=exp.input_ids.device)


def apply_missing_eos_score(raw_scores: Tensor, finished: Tensor, no_eos_score: float | None) -> Tensor:
    """Replies cut at the token limit (no EOS) score at most `no_eos_score` (None: keep their score).

    A cap, not a replacement: a reward model that already scores a cut reply below it (one trained on
    rankings that put cut replies last) keeps that score, so the penalty never lifts a cut reply and the
    differences between cut replies stay."""
    if no_eos_score is None:
        return raw_scores
    return torch.where(finished, raw_scores, raw_scores.clamp(max=no_eos_score))


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one rollout: a function of (run seed, step, row of the global batch) only, so
    rollouts do not depend on the number of processes and a resumed run samples what the first would have."""
    return (seed * 1_000_003 + step * 10_007 + row) % 2**62


def rollout_engine(
    model: torch.nn.Module, *, rows: int, max_prompt_len: int, config: PPOConfig, eos_ids: Sequence[int]
) -> Engine:
    """An engine over `model` itself (no copy): `rows` replies at once, KV memory for the longest prompt plus
    `max_new_tokens`. Whatever updates the model's weights in place, the next rollout samples from."""
    max_len = max_prompt_len + config.max_new_tokens
    return Engine(model, eos_token_ids=eos_ids, config=EngineConfig(max_rows=rows, max_len=max_len))


def sample_rollouts(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    *,
    config: PPOConfig,
    step: int,
    first_row: int,
    pad_id: int,
    device: torch.device,
) -> Experience:
    """One reply per prompt (rows `first_row`.. of step `step`'s global batch), packed for scoring."""
    params = [
        SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=row_seed(config.seed, step, first_row + j),
        )
        for j in range(len(prompts))
    ]
    completions = engine.generate(prompts, params)
    return pack_rollouts(prompts, completions, pad_id, device)


@dataclass
class CurrentModels:
    """The trained models as scoring sees them (no gradients)."""

    policy: Any  # adapters disabled: the reference, when there is no reference model
    value: Any  # adapters disabled: the reward model, when there is none
    policy_pass: (
        Callable[..., dict[str, Tensor]] | None
    )  # None: the learner's first pass gives the old log-probs
    value_pass: Callable[[Experience], Tensor] | None  # None: the learner's first pass gives the old values


@torch.no_grad()
def score_rollouts(
    exp: Experience,
    passes: Sequence[list[int]],
    current: CurrentModels,
    *,
    strategy: Strategy,
    reward: torch.nn.Module | RewardFn | None,
    ref: torch.nn.Module | None,
    trunk: TrunkCache | None,
    config: PPOConfig,
) -> None:
    """Reward scores, reference log-probs and (unless `current` leaves them out) old log-probs and values,
    one forward pass of each model per group of rows in `passes`."""
    acc = strategy.accelerator
    raw = torch.zeros(len(exp), device=strategy.device)
    if not isinstance(reward, torch.nn.Module) and reward is not None:
        raw = function_scores(reward, exp)
    for rows in passes:
        part = exp.rows(rows)
        idx = torch.tensor(rows, device=strategy.device)
        # frozen models are stored in the compute dtype; LoRA views and fp32 master weights need autocast
        if isinstance(reward, torch.nn.Module):
            raw[idx] = reward_model_scores(reward, part, trunk)
        elif reward is None:
            with acc.autocast(), current.value.disable_adapter():
                raw[idx] = reward_model_scores(current.value, part)
        if ref is None:
            with acc.autocast(), current.policy.disable_adapter():
                exp.put_rows(
                    "ref_logprobs", rows, response_logprobs(current.policy, part, config.temperature)
                )
        else:
            exp.put_rows("ref_logprobs", rows, response_logprobs(ref, part, config.temperature, trunk))
        with acc.autocast():
            if current.value_pass is not None:
                exp.put_rows("old_values", rows, current.value_pass(part))
            if current.policy_pass is not None:
                out = current.policy_pass(part, config.temperature)
                exp.put_rows("old_logprobs", rows, out["logprobs"])
    exp.raw_scores = raw.float()
    exp.scores = apply_missing_eos_score(exp.raw_scores, exp.finished, config.no_eos_score)


@torch.no_grad()
def compute_advantages(exp: Experience, strategy: Strategy, config: PPOConfig, beta: float) -> None:
    """KL-shaped rewards, GAE, and advantages whitened over the global batch."""
    assert exp.old_logprobs is not None and exp.ref_logprobs is not None and exp.old_values is not None
    assert exp.scores is not None
    mask = exp.response_mask
    rewards, _ = kl_shaped_rewards(exp.old_logprobs, exp.ref_logprobs, exp.scores, mask, beta)
    advantages, exp.returns = gae_advantages(rewards, exp.old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        # over the global batch, so N processes compute what one process would
        moments = strategy.accelerator.reduce(masked_moments(advantages, mask), "sum")
        advantages = masked_whiten(advantages, mask, moments)
    exp.advantages = advantages

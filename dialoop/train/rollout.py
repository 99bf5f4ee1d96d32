"""Making PPO's experience: sample replies (left padding), then score them (right padding) with the frozen
models: the reference policy's log-probs and the reward; optionally the policy's log-probs and the values.

Learning from the experience lives in `dialoop.train.ppo`; the math in `dialoop.train.ppo_math`.
Sequences for scoring are prompt + reply + pad, right-padded, so positions are simply 0..n-1 and a reply's
token t sits at column prompt_len + t, predicted by the logits at column prompt_len + t - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from dialoop.modeling.generation import Completion
from dialoop.modeling.heads import last_token_scores, per_token_values
from dialoop.train.ppo_math import token_logprobs

# (prompt ids, reply ids without padding, its EOS included when it has one) -> one score per reply
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Sequence[float]]


@dataclass
class Experience:
    """A batch of rollouts as right-padded tensors; per-token tensors cover the reply columns only."""

    input_ids: Tensor  # [B, L] prompt + reply, then pad
    attention_mask: Tensor  # [B, L] 1 on prompt and reply tokens
    prompt_lens: Tensor  # [B]
    response_ids: Tensor  # [B, R] reply tokens, then pad
    response_mask: Tensor  # [B, R] float, 1 on reply tokens (EOS included)
    finished: Tensor  # [B] bool, the reply ended with EOS
    scores: Tensor | None = None  # [B] reward-model score after the missing-EOS penalty
    raw_scores: Tensor | None = None  # [B] reward-model score as the model gave it
    ref_logprobs: Tensor | None = None  # [B, R]
    old_logprobs: Tensor | None = None  # [B, R] policy log-probs at sampling time
    old_values: Tensor | None = None  # [B, R]
    advantages: Tensor | None = None  # [B, R]
    returns: Tensor | None = None  # [B, R]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: Sequence[int]) -> Experience:
        """The sub-batch of rows `index`, trimmed to its own longest sequence and reply."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        mask = self.response_mask[idx]
        width_r = max(1, int(mask.sum(1).max()))
        width = int(self.attention_mask[idx].sum(1).max())
        picked: dict[str, Tensor | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
                continue
            value = value[idx]
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, :width]
            elif value.dim() == 2:
                value = value[:, :width_r]
            picked[f.name] = value
        return Experience(**picked)  # type: ignore[arg-type]


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    pad_token_id: int,
    device: torch.device,
) -> Experience:
    """Right-padded prompt + reply tensors of a batch of sampled replies."""
    if not completions or any(not c.token_ids for c in completions):
        raise ValueError("every rollout needs at least one generated token")
    lengths = [len(p) + len(c.token_ids) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    width_r = max(len(c.token_ids) for c in completions)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_ids = torch.full((len(prompts), width_r), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width_r))
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = list(prompt) + completion.token_ids
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        response_ids[b, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
        response_mask[b, : len(completion.token_ids)] = 1
    return Experience(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        prompt_lens=torch.tensor([len(p) for p in prompts], device=device),
        response_ids=response_ids.to(device),
        response_mask=response_mask.to(device),
        finished=torch.tensor([c.finished for c in completions], device=device),
    )


def response_columns(exp: Experience) -> Tensor:
    """[B, R] column of the hidden state that predicts each reply token (clamped on padding)."""
    steps = torch.arange(exp.response_ids.shape[1], device=exp.prompt_lens.device)
    cols = exp.prompt_lens.unsqueeze(1) - 1 + steps.unsqueeze(0)
    return cols.clamp(max=exp.input_ids.shape[1] - 1)


def response_logits(model: torch.nn.Module, exp: Experience) -> Tensor:
    """[B, R, V] logits predicting each reply token; the vocabulary projection runs on reply columns only."""
    first = int(exp.prompt_lens.min()) - 1
    keep = torch.arange(first, exp.input_ids.shape[1] - 1, device=exp.input_ids.device)
    # right padding: positions are 0..n-1 and causal attention never reaches the padding after a row
    out = model(
        input_ids=exp.input_ids, attention_mask=exp.attention_mask, logits_to_keep=keep, use_cache=False
    )
    cols = (response_columns(exp) - first).clamp(max=keep.numel() - 1)
    return out.logits.gather(1, cols.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))


def response_logprobs(model: torch.nn.Module, exp: Experience, temperature: float) -> Tensor:
    """[B, R] log-probs of the reply tokens under softmax(logits / temperature), the sampling distribution."""
    return token_logprobs(response_logits(model, exp), exp.response_ids, temperature) * exp.response_mask


def response_values(value_model: torch.nn.Module, exp: Experience) -> Tensor:
    """[B, R] value of the state before each reply token."""
    values = per_token_values(value_model, exp.input_ids, exp.attention_mask)
    return values.gather(1, response_columns(exp)) * exp.response_mask


def reward_model_scores(reward_model: torch.nn.Module, exp: Experience) -> Tensor:
    """[B] reward-model score of each prompt + reply, read at its last token."""
    return last_token_scores(reward_model, exp.input_ids, exp.attention_mask)


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
    """Replies cut at the token limit (no EOS) get the fixed `no_eos_score` (None: keep their score)."""
    if no_eos_score is None:
        return raw_scores
    return torch.where(finished, raw_scores, torch.full_like(raw_scores, no_eos_score))


def in_chunks(exp: Experience, size: int) -> list[Experience]:
    """The batch cut into consecutive sub-batches of at most `size` rows (for bounded memory)."""
    return [exp.rows(range(start, min(start + size, len(exp)))) for start in range(0, len(exp), size)]


def concat_columns(parts: Sequence[Tensor], width: int) -> Tensor:
    """Stack per-chunk [b, r] tensors into one [B, width] tensor, zero-padded on the right."""
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

"""Scoring sequences of prompt + reply with a model: reply log-probs, per-token values, reward-model scores.

Sequences are prompt + reply + pad, right-padded (`Experience`), so positions are simply 0..n-1 and a
reply's token t sits at column prompt_len + t, predicted by the hidden state at column prompt_len + t - 1. The
vocabulary projection runs on those reply columns only. The prefix that all rows of a pass share (the chat
template's system prompt, say) runs once and its keys and values serve every row, gradients included
(`backbone_states`): in the PPO benchmark's workload that is 30 of ~70 tokens per row. Used by PPO
(`dialoop.train.rollout`, `dialoop.train.learner`) and by the report card's KL (`dialoop.evaluate`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from dialoop.modeling.heads import reward_bias
from dialoop.modeling.trunk import TrunkCache

MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a forward pass of their own


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens common to all `prompts` (2 or more), short of the shortest one's last token (each row
    needs a token of its own to predict from); 0 when fewer than MIN_SHARED_PREFIX. Scoring runs such a
    prefix once for all rows (the generation engine shares prefixes the same way)."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


class SampledReply(Protocol):
    """A sampled reply as scoring needs it (the engine's `Completion`, a chat `Reply`)."""

    @property
    def token_ids(self) -> list[int]: ...  # with the final EOS when it ended on one

    @property
    def finished(self) -> bool: ...  # ended with EOS


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

    @property
    def lengths(self) -> list[int]:
        """Prompt + reply tokens of each row."""
        return [int(n) for n in self.attention_mask.sum(1)]

    def rows(self, index: Sequence[int]) -> Experience:
        """The sub-batch of rows `index`, trimmed to its own longest sequence and reply."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        width = int(self.attention_mask[idx].sum(1).max())
        width_r = max(1, int(self.response_mask[idx].sum(1).max()))
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value[idx]
                if f.name in ("input_ids", "attention_mask"):
                    value = value[:, :width]
                elif value.dim() == 2:
                    value = value[:, :width_r]
            picked[f.name] = value
        return Experience(**picked)

    def put_rows(self, name: str, index: Sequence[int], values: Tensor) -> None:
        """Write per-token `values` [len(index), r] of rows `index` into field `name` (created as zeros)."""
        current = getattr(self, name)
        if current is None:
            current = torch.zeros_like(self.response_mask)
            setattr(self, name, current)
        idx = torch.as_tensor(list(index), dtype=torch.long, device=current.device)
        current[idx, : values.shape[1]] = values.to(current.dtype)


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[SampledReply],
    pad_token_id: int,
    device: torch.device,
) -> Experience:
    """Right-padded prompt + reply tensors of a batch of sampled replies."""
    if not completions or any(not c.token_ids for c in completions):
        raise ValueError("every rollout needs at least one generated token")
    width = max(len(p) + len(c.token_ids) for p, c in zip(prompts, completions, strict=True))
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


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature), computed in fp32: the sampling distribution."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _hf_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (its adapters stay active unless disabled)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def shared_prefix_len(exp: Experience) -> int:
    """Leading prompt tokens common to every row (`common_prefix_len`)."""
    lengths = exp.prompt_lens.tolist()
    return common_prefix_len([exp.input_ids[i, :n].tolist() for i, n in enumerate(lengths)])


def _is_sharded(module: torch.nn.Module) -> bool:
    """Whether each forward gathers the module's weights from all processes: FSDP's DTensors, or DeepSpeed
    ZeRO-3's partitioned parameters (they carry a `ds_id`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters())


def trunk_rows(exp: Experience, shared: int) -> tuple[list[bytes], list[int]]:
    """Each row's `TrunkCache` key (its tokens and where its pass starts), and its real columns there."""
    lengths = exp.lengths
    keys = [
        shared.to_bytes(4, "little") + exp.input_ids[i, :n].cpu().numpy().tobytes()
        for i, n in enumerate(lengths)
    ]
    return keys, [n - shared for n in lengths]


def backbone_states(model: Any, exp: Experience, trunk: TrunkCache | None = None) -> tuple[Tensor, int]:
    """Last hidden states of columns P..L-1 ([B, L-P, H]) and P, the length of the rows' shared prefix.

    The prefix runs once; the rows continue from its keys and values (so gradients flow into it once per
    row, as in a full forward). Right padding and causal attention: real tokens never see the padding after
    them, so no mask is needed and positions are 0..n-1, as for each sequence alone. With `trunk`, the rows'
    pass keeps (or reuses) what leaves the model's frozen bottom blocks.
    """
    hf = _hf_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    # gradient checkpointing recomputes layers without a cache: no shared prefix then; nor under FSDP or
    # ZeRO-3, where each call of a block gathers its weights with the other processes (rows of other prefixes)
    checkpointing = getattr(backbone, "gradient_checkpointing", False) and backbone.training
    shared = 0 if checkpointing or _is_sharded(backbone) else shared_prefix_len(exp)
    reuse = trunk.reuse(hf, *trunk_rows(exp, shared)) if trunk is not None else nullcontext()
    if not shared:
        with reuse:
            return backbone(input_ids=exp.input_ids, use_cache=False).last_hidden_state, 0
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    kwarg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    backbone(input_ids=exp.input_ids[:1, :shared], use_cache=True, **{kwarg: cache})
    cache.batch_repeat_interleave(len(exp))
    # the prefix (one row) runs in full, so every block's cache holds it; a skipped block's stays unread
    with reuse:
        out = backbone(input_ids=exp.input_ids[:, shared:], use_cache=True, **{kwarg: cache})
    return out.last_hidden_state, shared


def reply_token_index(exp: Experience) -> tuple[Tensor, Tensor]:
    """(row, step) of every real reply token, row-major."""
    rows, steps = exp.response_mask.nonzero(as_tuple=True)
    return rows, steps


def reply_logits(model: Any, exp: Experience, trunk: TrunkCache | None = None) -> Tensor:
    """[N, V] logits predicting the N real reply tokens (order of `reply_token_index`); the vocabulary
    projection runs on those columns only."""
    hidden, shared = backbone_states(model, exp, trunk)
    rows, steps = reply_token_index(exp)
    return _hf_model(model).get_output_embeddings()(hidden[rows, exp.prompt_lens[rows] - 1 + steps - shared])


def scatter_replies(values: Tensor, exp: Experience) -> Tensor:
    """[N] per-reply-token values (order of `reply_token_index`) -> [B, R], zeros on padding."""
    out = torch.zeros(exp.response_mask.shape, dtype=values.dtype, device=values.device)
    rows, steps = reply_token_index(exp)
    out[rows, steps] = values
    return out


def response_logprobs(
    model: Any, exp: Experience, temperature: float, trunk: TrunkCache | None = None
) -> Tensor:
    """[B, R] log-probs of the reply tokens under softmax(logits / temperature), the sampling distribution."""
    rows, steps = reply_token_index(exp)
    logprobs = token_logprobs(reply_logits(model, exp, trunk), exp.response_ids[rows, steps], temperature)
    return scatter_replies(logprobs, exp)


def _score_head(model: Any, hidden: Tensor) -> Tensor:
    # the reward head as `dialoop.modeling.heads` defines it: the `score` module, minus the reward bias
    return _hf_model(model).score(hidden).squeeze(-1).float() - reward_bias(model)


def response_values(value_model: Any, exp: Experience, trunk: TrunkCache | None = None) -> Tensor:
    """[B, R] value of the state before each reply token (`heads.per_token_values` at those columns)."""
    hidden, shared = backbone_states(value_model, exp, trunk)
    values = _score_head(value_model, hidden)
    steps = torch.arange(exp.response_ids.shape[1], device=values.device)
    cols = exp.prompt_lens.unsqueeze(1) - 1 + steps.unsqueeze(0) - shared
    return values.gather(1, cols.clamp(max=values.shape[1] - 1)) * exp.response_mask


def reward_model_scores(reward_model: Any, exp: Experience, trunk: TrunkCache | None = None) -> Tensor:
    """[B] reward of each prompt + reply, read at its last token (`heads.last_token_scores`)."""
    hidden, shared = backbone_states(reward_model, exp, trunk)
    last = exp.attention_mask.sum(1) - 1 - shared
    return _score_head(reward_model, hidden[torch.arange(len(exp), device=hidden.device), last])

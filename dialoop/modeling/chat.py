"""Chat on top of `generation.sample`: chat templates in, decoded replies out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dialoop.modeling.generation import SamplingParams, sample
from dialoop.records import ChatMessage


@dataclass
class Reply:
    text: str  # the reply without its EOS token
    finished: bool  # True when the model ended the turn itself (EOS), False when cut at max_new_tokens
    token_ids: list[int]  # generated ids, including the final EOS when finished


def encode_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Token ids of `messages` through the chat template, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: load it through "
            "dialoop.modeling.load_tokenizer (or ensure_special_tokens), which installs ChatML"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template already writes every special token it wants; adding BOS again would change the prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_config = getattr(model, "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    for t in [extra] if isinstance(extra, int) else list(extra or []):
        if int(t) not in ids:
            ids.append(int(t))
    if not ids:
        raise ValueError(
            "neither the tokenizer nor the model defines an EOS token (see ensure_special_tokens)"
        )
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; fails clearly when it is missing (see ensure_special_tokens)."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer has no pad token: load it through dialoop.modeling (ensure_special_tokens)"
        )
    return int(tokenizer.pad_token_id)


def generate_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[list[ChatMessage]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    batch_size: int = 16,
) -> list[Reply]:
    """Sample the next assistant turn of each conversation, `batch_size` conversations per batch.

    One seeded `params` gives every row the same seed (equal prompts, equal replies): pass one per row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(conversations)
    row_params = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(row_params) != n:
        raise ValueError(f"got {len(row_params)} SamplingParams for {n} conversations")
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer)
    # batching prompts of similar length wastes less compute on padding; seeded rows do not depend on batching
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    replies: list[Reply | None] = [None] * n
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        done = sample(
            model,
            [prompts[i] for i in chunk],
            [row_params[i] for i in chunk],
            eos_token_ids=eos,
            pad_token_id=pad,
        )
        for i, c in zip(chunk, done, strict=True):
            body = c.token_ids[:-1] if c.finished else c.token_ids
            replies[i] = Reply(
                text=tokenizer.decode(body, skip_special_tokens=True),
                finished=c.finished,
                token_ids=c.token_ids,
            )
    return [r for r in replies if r is not None]

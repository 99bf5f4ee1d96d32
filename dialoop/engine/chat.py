"""Chat replies on the engine: conversations through the chat template in, decoded `Reply`s out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dialoop.engine.engine import Engine, EngineConfig
from dialoop.engine.params import SamplingParams
from dialoop.modeling.chat import Reply, decode_reply, encode_prompt, eos_token_ids
from dialoop.records import ChatMessage


def generate_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[list[ChatMessage]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    batch_size: int = 16,
) -> list[Reply]:
    """The next assistant turn of each conversation, `batch_size` decoding at once (continuous batching:
    a finished reply's slot goes to the next conversation at once). Conversations that share a start (K
    candidates for one context, a common system prompt) prefill it once.

    One seeded `params` gives every row the same seed (equal prompts, equal replies): pass one per row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(conversations)
    row_params = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(row_params) != n:
        raise ValueError(f"got {len(row_params)} SamplingParams for {n} conversations")
    if not n:
        return []
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    longest = max(len(p) + r.max_tokens for p, r in zip(prompts, row_params, strict=True))
    engine = Engine(
        model,
        eos_token_ids=eos_token_ids(model, tokenizer),
        config=EngineConfig(max_rows=min(batch_size, n), max_len=longest, max_queue=n),
    )
    replies = []
    for c in engine.generate(prompts, row_params):
        ended = c.finish_reason == "stop"
        body = c.token_ids[:-1] if ended else c.token_ids
        replies.append(Reply(text=decode_reply(tokenizer, body), finished=ended, token_ids=c.token_ids))
    return replies

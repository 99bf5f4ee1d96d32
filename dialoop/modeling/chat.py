"""Chat templates: conversations to prompt ids, the end-of-turn and pad ids, and the decoded `Reply`
(sampled by `dialoop.engine.chat.generate_replies`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


def decode_reply(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """A reply's text: its ids decoded without special tokens, and without NUL characters, which a model
    can write (a byte-level vocabulary has a token for it) but neither store can hold (PostgreSQL refuses
    them in text, and the web edge refuses them in what people write)."""
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=True)).replace("\x00", "")

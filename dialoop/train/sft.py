"""Supervised fine-tuning on demonstrations: the loss covers the assistant turns only.

    dialoop train sft --out runs/sft                                    # demonstrations from the store
    dialoop train sft --data demos.jsonl --format messages --out runs/sft
    dialoop train sft --model base-model-dir --lora-r 16 --out runs/sft  # LoRA; a base model gets ChatML
    accelerate launch --multi_gpu --num_processes 2 -m dialoop.cli train sft ...  # 2 processes, same curve

Each conversation goes through the model's chat template; the target tokens of an assistant turn are its
content and its end-of-turn token (EOS), never the role header, the template's system prompt, or what the
template writes after EOS. Packing (optional) concatenates conversations into rows of `max_length` with
position ids restarting per conversation; transformers then masks attention across conversations.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dialoop.records import ChatExample, ChatMessage
from dialoop.train.common import (
    SUMMARY_FILE,
    add_lora,
    disable_dropout,
    enable_gradient_checkpointing,
    freeze_lower_layers,
    load_causal_lm_for_training,
    load_training_tokenizer,
    merge_lora,
    prepare_run_dir,
    resolve_base_model,
    seed_everything,
    write_json_atomic,
)
from dialoop.train.config import SFTConfig
from dialoop.train.fit import finish_checkpoints, fit
from dialoop.train.strategy import make_strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedChat:
    """One training row: token ids and, per token, whether it is a target (an assistant token)."""

    input_ids: list[int]
    target: list[bool]
    position_ids: list[int] | None = None  # set for packed rows (restarting per conversation)

    @property
    def num_targets(self) -> int:
        return sum(self.target)


def _render(tokenizer: Any, messages: list[ChatMessage], *, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    # the template writes every special token it wants (BOS included); the tokenizer must not add more
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokenize_chat(
    tokenizer: Any, messages: list[ChatMessage], *, max_length: int | None = None
) -> TokenizedChat:
    """Token ids of a conversation through its chat template, with the assistant-token target mask.

    The rendered text is cut where each assistant reply starts (after the template's generation prompt) and
    where it ends (after its EOS), and the pieces are tokenized apart: a reply's context has exactly the
    tokens `encode_prompt` gives at inference, and no token straddles a prompt/reply boundary.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    eos = tokenizer.eos_token
    targets: list[tuple[int, int]] = []  # character spans of the replies, each with its EOS
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant turn")
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError("the chat template does not render a conversation's turns as prefixes of it")
        end = through.find(eos, len(prompt)) if eos else -1
        # what the template writes after EOS (ChatML's newline) is never generated: not a target
        targets.append((len(prompt), end + len(eos) if end >= 0 else len(through)))
    ids: list[int] = []
    target: list[bool] = []
    position = 0
    for start, end in [*targets, (len(text), len(text))]:
        for piece, is_target in ((text[position:start], False), (text[start:end], True)):
            piece_ids = _ids(tokenizer, piece)
            ids += piece_ids
            target += [is_target] * len(piece_ids)
        position = end
    if max_length is not None and len(ids) > max_length:
        ids, target = ids[:max_length], target[:max_length]
    return TokenizedChat(ids, target)


def pack_chats(rows: Sequence[TokenizedChat], max_length: int, seed: int) -> list[TokenizedChat]:
    """Greedily concatenate shuffled conversations into rows of at most `max_length` tokens."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    packs: list[TokenizedChat] = []
    ids: list[int] = []
    target: list[bool] = []
    positions: list[int] = []
    for i in order:
        row = rows[i]
        if ids and len(ids) + len(row.input_ids) > max_length:
            packs.append(TokenizedChat(ids, target, positions))
            ids, target, positions = [], [], []
        ids = ids + row.input_ids
        target = target + row.target
        positions = positions + list(range(len(row.input_ids)))
    if ids:
        packs.append(TokenizedChat(ids, target, positions))
    return packs


def collate(
    rows: Sequence[TokenizedChat], pad_token_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input ids, attention mask or packed position ids, and the target mask."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        target[b, :n] = torch.tensor(row.target)
        mask[b, :n] = 1
        # the padding tail restarts at 0, so for packed rows it is a separate (masked-out) sequence
        positions[b, :n] = torch.tensor(row.position_ids) if row.position_ids is not None else torch.arange(n)
        positions[b, n:] = torch.arange(width - n)
    batch = {"input_ids": ids.to(device), "target": target.to(device)}
    if any(r.position_ids is not None for r in rows):
        # no attention mask + position ids restarting per conversation = block-diagonal causal attention
        batch["position_ids"] = positions.to(device)
    else:
        batch["attention_mask"] = mask.to(device)
    return batch


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over the target tokens, and the count of correctly predicted ones."""
    target = batch["target"][:, 1:]
    # logits only where some row predicts a target: the vocabulary projection dominates the cost otherwise
    keep = target.any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "target"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    labels = batch["input_ids"][:, 1:][:, keep]
    mask = target[:, keep]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    correct = (logits.argmax(-1) == labels) & mask
    return (losses * mask).sum(), correct.sum()


def build_rows(config: SFTConfig, tokenizer: Any, examples: Sequence[ChatExample]) -> list[TokenizedChat]:
    """Tokenize (and optionally pack) the conversations; those left with no assistant token are dropped."""
    rows = [tokenize_chat(tokenizer, e.messages, max_length=config.max_length) for e in examples]
    kept = [r for r in rows if r.num_targets > 0]
    if len(kept) < len(rows):
        logger.warning(
            "%d conversation(s) without assistant tokens (within max_length) dropped", len(rows) - len(kept)
        )
    if not kept:
        raise ValueError("no conversation has an assistant turn to learn from")
    return pack_chats(kept, config.max_length, config.seed) if config.packing else kept


def train_sft(config: SFTConfig, examples: Sequence[ChatExample]) -> Path:
    """Fine-tune `config.model` on `examples` and write an AutoModelForCausalLM dir to the run dir."""
    started = time.time()
    strategy = make_strategy(config)
    accelerator = strategy.accelerator
    run_dir = prepare_run_dir(config, "sft", accelerator)
    seed_everything(config.seed)
    base = resolve_base_model(config.model)
    tokenizer = load_training_tokenizer(base, config.chat_template)
    rows = build_rows(config, tokenizer, examples)
    logger.info("SFT on %d rows (%d target tokens)", len(rows), sum(r.num_targets for r in rows))
    model = load_causal_lm_for_training(base, tokenizer, config=config)
    disable_dropout(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora_r > 0:
        strategy.check_lora(config.lora_r)
        model = add_lora(model, config)
    else:
        freeze_lower_layers(model, config.trainable_layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = accelerator.device

    def loss_fn(
        model: torch.nn.Module, batch_rows: list[TokenizedChat]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum, correct = causal_lm_loss(model, collate(batch_rows, pad, device))
        return loss_sum, {"accuracy": correct}

    model, state = fit(
        config,
        strategy,
        model,
        rows,
        loss_fn=loss_fn,
        weight_fn=lambda r: r.num_targets,
        length_fn=lambda r: len(r.input_ids),
        run_dir=run_dir,
        description="SFT",
    )
    if config.lora_r > 0:  # the adapters to RUN/adapter; the run dir holds the merged model
        model = merge_lora(
            accelerator.unwrap_model(model),
            run_dir,
            main_process=accelerator.is_main_process,
            # QLoRA: the adapters are merged into full-precision base weights, not the 4-bit ones
            full_precision_base=(lambda: load_causal_lm_for_training(base, tokenizer))
            if config.load_in_4bit
            else None,
        )
    strategy.save_model(model, tokenizer, run_dir)
    if accelerator.is_main_process:
        write_json_atomic(
            run_dir / SUMMARY_FILE,
            {
                "stage": "sft",
                "steps": state.step,
                "skipped_steps": state.skipped_steps,
                "rows": len(rows),
                "wall_seconds": round(time.time() - started, 1),
            },
        )
    finish_checkpoints(config, run_dir, accelerator)
    return run_dir

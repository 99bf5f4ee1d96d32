"""The reward model: K-way rankings -> a scalar reward per (prompt, reply), InstructGPT's loss.

    dialoop train rm --sft runs/sft --out runs/rm                        # rankings from the store
    dialoop train rm --data harmless-base-dev.jsonl.gz --format hh-rlhf --out runs/rm-hh

The RM is an `AutoModelForSequenceClassification` with one label on the SFT model's backbone. A candidate is
scored exactly as PPO will score a sample: the prompt through the chat template with the generation prompt,
the reply, and EOS (none when the reply was cut off at a token limit); the reward is read at the last token.
One ranking is one batch element (`kway_ranking_loss`): its K candidates are scored in one forward pass, as
one row that holds the prompt once and then the K replies, each reply attending to the prompt and to itself
only, its positions continuing the prompt's; the scores equal those of each prompt + reply alone (right
padding), at a fraction of the cost.
After training, the bias (`config.dialoop_reward_bias`, see dialoop.modeling.heads) makes the mean reward of
the reference replies 0; held-out pairwise accuracy (ties excluded) goes to the run's metrics.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from transformers import PreTrainedModel

from dialoop.formats.pairs import ordered_pairs
from dialoop.modeling import encode_prompt
from dialoop.modeling.heads import reward_model_from_lm, set_reward_bias
from dialoop.records import ChatExample, ChatMessage, RankingExample
from dialoop.train.common import (
    SUMMARY_FILE,
    disable_dropout,
    freeze_lower_layers,
    load_training_tokenizer,
    make_accelerator,
    prepare_run_dir,
    resolve_base_model,
    save_model,
    seed_everything,
    write_json_atomic,
)
from dialoop.train.config import RewardConfig
from dialoop.train.data import split_heldout
from dialoop.train.fit import finish_checkpoints, fit
from dialoop.train.metrics import MetricsLogger
from dialoop.train.trunk import TrunkCache, frozen_depth

logger = logging.getLogger(__name__)


def kway_ranking_loss(rewards: torch.Tensor, better: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """InstructGPT's K-way loss: per ranking, the mean over its (better, worse) pairs of -log σ(r_b - r_w).

    rewards [B, K]; better [B, K, K] bool, True where candidate i is ranked above j (tied pairs and all-bad
    rankings have none). reduction "none" gives one loss per ranking (0 without pairs); "sum" adds them;
    "mean" averages over the rankings that have pairs.
    """
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # diff[b, i, j] = r_i - r_j
    pair_losses = -F.logsigmoid(diff) * better
    n_pairs = better.sum(dim=(1, 2))
    per_ranking = pair_losses.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    if reduction == "none":
        return per_ranking
    if reduction == "sum":
        return per_ranking.sum()
    if reduction == "mean":
        has_pairs = n_pairs > 0
        return per_ranking[has_pairs].mean() if bool(has_pairs.any()) else per_ranking.sum() * 0.0
    raise ValueError(f"reduction must be none, sum or mean, got {reduction!r}")


def pairwise_accuracy(rewards: torch.Tensor, better: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ranking: how many of its ordered pairs the rewards order correctly, and how many pairs it has."""
    correct = (rewards.unsqueeze(2) > rewards.unsqueeze(1)) & better
    return correct.sum(dim=(1, 2)), better.sum(dim=(1, 2))


def encode_candidates(
    tokenizer: Any,
    prompt: list[ChatMessage],
    replies: Sequence[str],
    max_length: int,
    truncated: Collection[int] = (),
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per reply, as the RM (and PPO) score them: the prompt through the chat
    template with the generation prompt, then the reply, then EOS, where the reward is read. A reply cut off
    at the token limit (its index in `truncated`) gets no EOS, as PPO's samples without one: the reward is
    read at its last token, so the RM sees what trainers see ("cut off") and can rank it lower.

    A reply longer than 3/4 of `max_length` loses its end; a long prompt loses its oldest tokens so that it
    and the longest reply fit in `max_length`. All replies share that prompt.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    cap = max(1, max_length - min(len(prompt_ids), max_length // 4) - 1)
    eos = int(tokenizer.eos_token_id)
    reply_ids = []
    for k, reply in enumerate(replies):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"][:cap]
        reply_ids.append(ids if k in truncated and ids else [*ids, eos])
    keep = max(0, max_length - max(len(r) for r in reply_ids))
    if keep < len(prompt_ids):
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return [(prompt_ids, r) for r in reply_ids]


def encode_reply(
    tokenizer: Any, prompt: list[ChatMessage], reply: str, max_length: int, *, finished: bool = True
) -> list[int]:
    """One candidate's token ids (see `encode_candidates`)."""
    [(prompt_ids, reply_ids)] = encode_candidates(
        tokenizer, prompt, [reply], max_length, () if finished else (0,)
    )
    return prompt_ids + reply_ids


@dataclass(frozen=True)
class EncodedRanking:
    """The K candidates of a ranking as (prompt ids, reply ids), and its (better, worse) pairs."""

    candidates: list[tuple[list[int], list[int]]]
    pairs: list[tuple[int, int]]


def encode_ranking(
    tokenizer: Any, example: RankingExample, max_length: int, *, all_bad_orders: bool = False
) -> EncodedRanking:
    return EncodedRanking(
        encode_candidates(tokenizer, example.prompt, example.completions, max_length, set(example.truncated)),
        ordered_pairs(example, all_bad_orders=all_bad_orders),
    )


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and position ids (counting real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


@dataclass
class _Row:
    """One model input row: token ids, positions, and per token its prompt group and segment."""

    ids: list[int]
    positions: list[int]
    group: list[int]
    segment: list[int]  # 0: a prompt; k + 1: candidate k's reply
    score_at: dict[int, int]  # candidate index -> position of its last token in the row


def _rows(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]], share_prompt: bool
) -> tuple[list[_Row], list[tuple[int, int]]]:
    """Rows for groups of candidates, and where each candidate's score is read, as (row, column).

    With `share_prompt`, the candidates of a group that have the same prompt ids sit in one row behind one
    copy of the prompt; each reply attends to the prompt and to itself only (see `_collate_rows`), so its
    score equals the score of prompt + reply alone, at a fraction of the cost.
    """
    rows: list[_Row] = []
    where: list[tuple[int, int]] = []
    for candidates in groups:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for k, (prompt, _) in enumerate(candidates):
            by_prompt.setdefault(tuple(prompt), []).append(k)
        parts = list(by_prompt.values()) if share_prompt else [[k] for k in range(len(candidates))]
        start = len(rows)
        row = _Row([], [], [], [], {})
        rows_of_group = [row] if share_prompt else []
        for g, members in enumerate(parts):
            if not share_prompt:
                row = _Row([], [], [], [], {})
                rows_of_group.append(row)
            prompt = candidates[members[0]][0]
            row.ids += prompt
            row.positions += list(range(len(prompt)))
            row.group += [g] * len(prompt)
            row.segment += [0] * len(prompt)
            for k in members:
                reply = candidates[k][1]
                row.ids += reply
                row.positions += list(range(len(prompt), len(prompt) + len(reply)))
                row.group += [g] * len(reply)
                row.segment += [k + 1] * len(reply)
                row.score_at[k] = len(row.ids) - 1
        rows += rows_of_group
        for k in range(len(candidates)):
            r = next(i for i, row in enumerate(rows_of_group) if k in row.score_at)
            where.append((start + r, rows_of_group[r].score_at[k]))
    return rows, where


def _collate_rows(
    rows: Sequence[_Row], pad_id: int, shared: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        positions[i, :n] = torch.tensor(r.positions)
        group[i, :n] = torch.tensor(r.group)
        segment[i, :n] = torch.tensor(r.segment)
    if not shared:
        mask = (group >= 0).long()  # one candidate per row: the usual right-padded 2-D mask
    else:
        # query q sees key k when k is not after q, in the same group, and k is a prompt token or q's reply
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        same_group = (group.unsqueeze(2) == group.unsqueeze(1)) & (group.unsqueeze(2) >= 0)
        visible = (segment.unsqueeze(1) == 0) | (segment.unsqueeze(2) == segment.unsqueeze(1))
        # padding sees itself only, which keeps softmax (and its gradient) finite
        mask = (causal & same_group & visible) | torch.eye(width, dtype=torch.bool)
        mask = mask.unsqueeze(1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


class RankingScorer(torch.nn.Module):
    """What training wraps (DDP/FSDP): the RM's backbone and head, with scores read at given positions."""

    def __init__(self, model: PreTrainedModel, trunk: TrunkCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.trunk = trunk
        # FSDP's auto-wrap policy looks for the transformer block classes here, and accelerate for the hidden
        # size (DeepSpeed configs with "auto" bucket sizes) in `config`
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.config = model.config

    @property
    def hf_model(self) -> PreTrainedModel:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        score_rows: torch.Tensor,
        score_cols: torch.Tensor,
        trunk_rows: tuple[list[bytes], list[int]] | None = None,
    ) -> torch.Tensor:
        """`trunk_rows`: each row's `TrunkCache` key and real length (`_trunk_rows`)."""
        if attention_mask.dim() == 4 and self.model.config._attn_implementation == "eager":
            # eager attention adds its mask to the scores: a boolean mask must become 0 / -inf
            blocked = torch.finfo(torch.float32).min
            attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
                ~attention_mask, blocked
            )
        backbone = getattr(self.model, self.model.base_model_prefix)
        reuse = (
            self.trunk.reuse(self.model, *trunk_rows)
            if self.trunk is not None and trunk_rows is not None
            else nullcontext()
        )
        with reuse:
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        head = getattr(self.model, "score")  # noqa: B009 (the attribute is typed Tensor | Module)
        return head(hidden[score_rows, score_cols]).squeeze(-1).float()


def score_groups(
    scorer: torch.nn.Module,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    share_prompt: bool,
    device: torch.device,
) -> torch.Tensor:
    """Raw rewards (before the bias) of every candidate of every group, flat, in order; one forward pass."""
    rows, where = _rows(groups, share_prompt)
    batch = _collate_rows(rows, pad_id, share_prompt, device)
    index = torch.tensor(where, device=device)
    trunk_rows = _trunk_rows(rows, share_prompt)
    return scorer(**batch, score_rows=index[:, 0], score_cols=index[:, 1], trunk_rows=trunk_rows)


def _trunk_rows(rows: Sequence[_Row], share_prompt: bool) -> tuple[list[bytes], list[int]]:
    """Each row's `TrunkCache` key: what decides what its tokens see (ids, positions, groups, segments, and
    the kind of mask), and its real length."""
    keys = [
        bytes([share_prompt]) + np.array([r.ids, r.positions, r.group, r.segment], dtype=np.int64).tobytes()
        for r in rows
    ]
    return keys, [len(r.ids) for r in rows]


def ranking_tensors(
    batch: Sequence[EncodedRanking], rewards: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat candidate rewards -> [B, Kmax] rewards and the [B, Kmax, Kmax] `better` mask."""
    k_max = max(len(r.candidates) for r in batch)
    table = rewards.new_zeros((len(batch), k_max))
    better = torch.zeros((len(batch), k_max, k_max), dtype=torch.bool, device=rewards.device)
    offset = 0
    for b, ranking in enumerate(batch):
        k = len(ranking.candidates)
        table[b, :k] = rewards[offset : offset + k]
        offset += k
        for i, j in ranking.pairs:
            better[b, i, j] = True
    return table, better


def score_all(
    accelerator: Accelerator | None,
    scorer: torch.nn.Module,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    share_prompt: bool,
    batch_size: int,
) -> list[list[float]]:
    """Raw rewards of many groups without gradients, spread over the processes (every process gets all);
    without an `accelerator`, in this process on the scorer's device."""
    n_proc, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    device = accelerator.device if accelerator else next(scorer.parameters()).device
    per_proc = -(-len(groups) // n_proc)
    mine = list(range(rank * per_proc, min(len(groups), (rank + 1) * per_proc)))
    # similar lengths together waste less compute on padding
    mine.sort(key=lambda i: sum(len(p) + len(r) for p, r in groups[i]))
    n_batches = -(-per_proc // batch_size)  # equal on every process: FSDP/ZeRO forwards are collectives
    results: list[tuple[int, list[float]]] = []
    scorer.eval()
    with torch.no_grad():
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            batch = [groups[i] for i in chunk] or [groups[0]]  # an idle process still joins the forward
            flat = score_groups(scorer, batch, pad_id, share_prompt, device).tolist()
            offset = 0
            for i in chunk:
                results.append((i, flat[offset : offset + len(groups[i])]))
                offset += len(groups[i])
    everything = gather_object(results) if n_proc > 1 else results
    by_index = dict(everything)
    return [by_index[i] for i in range(len(groups))]


def reference_replies(
    rankings: Sequence[RankingExample], references: Sequence[ChatExample] | None
) -> list[tuple[list[ChatMessage], str]]:
    """(prompt, reply) pairs whose mean reward defines 0: every assistant turn of the demonstrations when
    given, else the best-ranked reply of each ranking not marked all bad (of each, when all are)."""
    if references is not None:
        out = [
            (ex.messages[:i], m["content"])
            for ex in references
            for i, m in enumerate(ex.messages)
            if m["role"] == "assistant" and i > 0
        ]
        if not out:
            raise ValueError("the reference demonstrations have no assistant turn")
        return out
    ranked = [r for r in rankings if r.ranking]
    chosen = [r for r in ranked if not r.all_bad] or ranked
    return [(r.prompt, r.completions[r.ranking[0]]) for r in chosen]


def train_reward_model(
    config: RewardConfig,
    rankings: Sequence[RankingExample],
    *,
    references: Sequence[ChatExample] | None = None,
) -> Path:
    """Train the RM on `rankings`, centre it on the references, write it and its metrics to the run dir."""
    started = time.time()
    accelerator = make_accelerator(config)
    run_dir = prepare_run_dir(config, "rm", accelerator)
    seed_everything(config.seed)
    with_bad = config.all_bad_orders
    usable = [r for r in rankings if ordered_pairs(r, all_bad_orders=with_bad)]
    if len(usable) < len(rankings):
        logger.info(
            "%d ranking(s) without an ordered pair (all bad or all tied) skipped", len(rankings) - len(usable)
        )
    train, heldout = split_heldout(usable, config.heldout_fraction, config.seed)
    if not train:
        raise ValueError("no ranking with an ordered pair to train on")
    base = resolve_base_model(config.model)
    tokenizer = load_training_tokenizer(base)
    pad_id = int(tokenizer.pad_token_id)
    encoded = [encode_ranking(tokenizer, r, config.max_length, all_bad_orders=with_bad) for r in train]
    logger.info("RM on %d rankings (%d held out), initialised from %s", len(train), len(heldout), base)
    hf_model = reward_model_from_lm(base, dtype=torch.float32, device="cpu", tokenizer=tokenizer).train()
    disable_dropout(hf_model)
    freeze_lower_layers(hf_model, config.trainable_layers)
    if config.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable()
    trunk = None
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if config.frozen_trunk_cache and not (config.gradient_checkpointing or sharded):
        trunk = TrunkCache()
        trunk.add(hf_model, frozen_depth(hf_model))
    share = config.share_prompt
    if share and hf_model.config._attn_implementation not in ("sdpa", "eager"):
        logger.warning(
            "%s attention takes no custom mask: scoring candidates without a shared prompt",
            hf_model.config._attn_implementation,
        )
        share = False
    device = accelerator.device

    def loss_fn(
        model: torch.nn.Module, batch: list[EncodedRanking]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = score_groups(model, [r.candidates for r in batch], pad_id, share, device)
        table, better = ranking_tensors(batch, rewards)
        correct, n_pairs = pairwise_accuracy(table.detach(), better)
        # per-ranking accuracy, so that its sum over the batch divided by the rankings is the mean
        accuracy = (correct.float() / n_pairs.clamp(min=1)).sum()
        return kway_ranking_loss(table, better, reduction="sum"), {"accuracy": accuracy}

    model, state = fit(
        config,
        accelerator,
        RankingScorer(hf_model, trunk),
        encoded,
        loss_fn=loss_fn,
        weight_fn=lambda r: 1.0,
        length_fn=lambda r: sum(len(p) + len(c) for p, c in r.candidates),
        run_dir=run_dir,
        description="reward model",
    )
    if trunk is not None:
        logger.info("frozen trunk: %d passes started above it, %d ran it", trunk.hits, trunk.misses)
        trunk.clear()

    summary: dict[str, Any] = {
        "stage": "rm",
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_rankings": len(train),
        "heldout_rankings": len(heldout),
    }
    if heldout:
        held = [encode_ranking(tokenizer, r, config.max_length, all_bad_orders=with_bad) for r in heldout]
        scores = score_all(
            accelerator, model, [r.candidates for r in held], pad_id, share, config.eval_batch_size
        )
        table, better = ranking_tensors(held, torch.tensor([x for group in scores for x in group]))
        correct, n_pairs = pairwise_accuracy(table, better)
        summary["heldout_pairs"] = int(n_pairs.sum())
        summary["heldout_accuracy"] = float(correct.sum()) / max(1, int(n_pairs.sum()))
        logger.info(
            "held-out pairwise accuracy %.4f on %d pairs",
            summary["heldout_accuracy"],
            summary["heldout_pairs"],
        )

    pairs = reference_replies(train, references)
    if config.bias_examples > 0 and len(pairs) > config.bias_examples:
        pairs = random.Random(config.seed).sample(pairs, config.bias_examples)
    refs = [encode_candidates(tokenizer, p, [reply], config.max_length) for p, reply in pairs]
    ref_scores = score_all(accelerator, model, refs, pad_id, share, config.eval_batch_size)
    bias = sum(group[0] for group in ref_scores) / len(refs)
    set_reward_bias(hf_model, bias)
    summary |= {"reward_bias": bias, "reference_replies": len(refs)}

    save_model(accelerator, model, tokenizer, run_dir)
    summary["wall_seconds"] = round(time.time() - started, 1)
    if accelerator.is_main_process:
        with MetricsLogger(
            run_dir, total_steps=state.step, start_step=state.step, progress=False
        ) as metrics_log:
            metrics_log.log(state.step, {k: v for k, v in summary.items() if k != "stage"}, kind="eval")
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    finish_checkpoints(config, run_dir, accelerator)
    return run_dir

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dialoop.formats.pairs import ordered_pairs
from dialoop.modeling.heads import reward_model_from_lm, set_reward_bias
from dialoop.modeling.ranking import RankingScorer, encode_candidates, score_all, score_groups
from dialoop.modeling.trunk import frozen_depth
from dialoop.records import ChatExample, ChatMessage, RankingExample
from dialoop.train.common import (
    SUMMARY_FILE,
    add_lora,
    disable_dropout,
    enable_gradient_checkpointing,
    freeze_lower_layers,
    load_training_tokenizer,
    merge_lora,
    prepare_run_dir,
    resolve_base_model,
    seed_everything,
    write_json_atomic,
)
from dialoop.train.config import RewardConfig
from dialoop.train.data import split_heldout
from dialoop.train.fit import finish_checkpoints, fit
from dialoop.train.metrics import MetricsLogger
from dialoop.train.strategy import make_strategy

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
    strategy = make_strategy(config)
    accelerator = strategy.accelerator
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
    tokenizer = load_training_tokenizer(base, config.chat_template)
    pad_id = int(tokenizer.pad_token_id)
    encoded = [encode_ranking(tokenizer, r, config.max_length, all_bad_orders=with_bad) for r in train]
    logger.info("RM on %d rankings (%d held out), initialised from %s", len(train), len(heldout), base)
    hf_model = reward_model_from_lm(
        base, dtype=torch.float32, device="cpu", tokenizer=tokenizer, load_in_4bit=config.load_in_4bit
    ).train()
    disable_dropout(hf_model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(hf_model)
    lora_model = None
    if config.lora_r > 0:  # adapters on every block and a fully trained score head
        strategy.check_lora(config.lora_r)
        lora_model = add_lora(hf_model, config, head="score")
        # the adapters and the head's trained copy live inside the HF model: the scorer runs it directly
        hf_model = lora_model.get_base_model()  # type: ignore[operator]
    else:
        freeze_lower_layers(hf_model, config.trainable_layers)
    trunk = None
    if config.frozen_trunk_cache and not config.gradient_checkpointing:
        trunk = strategy.trunk_cache()
    if trunk is not None:
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
        strategy,
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

    if lora_model is not None:  # the adapters to RUN/adapter; the run dir holds the merged reward model
        scorer = accelerator.unwrap_model(model)
        rebuild = None
        if config.load_in_4bit:  # QLoRA: merge into full-precision base weights, not the 4-bit ones

            def rebuild() -> torch.nn.Module:
                return reward_model_from_lm(base, dtype=torch.float32, device="cpu", tokenizer=tokenizer)

        scorer.model = merge_lora(
            lora_model, run_dir, main_process=accelerator.is_main_process, full_precision_base=rebuild
        )
        set_reward_bias(scorer.model, bias)
    strategy.save_model(model, tokenizer, run_dir)
    summary["wall_seconds"] = round(time.time() - started, 1)
    if accelerator.is_main_process:
        with MetricsLogger(
            run_dir, total_steps=state.step, start_step=state.step, progress=False
        ) as metrics_log:
            metrics_log.log(state.step, {k: v for k, v in summary.items() if k != "stage"}, kind="eval")
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    finish_checkpoints(config, run_dir, accelerator)
    return run_dir

"""PPO from human feedback (InstructGPT): the SFT policy learns to please the reward model, with a KL leash.

    dialoop train ppo --model runs/sft --reward-model runs/rm --out runs/ppo      # prompts from the store
    dialoop train ppo --reward-model runs/rm --prompts prompts.txt --out runs/ppo
    accelerate launch --num_processes 2 --cpu -m dialoop.cli train ppo ...       # DDP, the same curve
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m dialoop.cli train ppo ...  # FSDP2
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 -m dialoop.cli train ppo ...  # ZeRO

Each step: sample one reply per prompt from the policy (seeded per row), score prompt + reply with the frozen
reward model (a fixed score for replies without EOS) and the frozen reference (= the SFT model), turn that
into per-token rewards -beta * KL + score at the last token, estimate advantages with GAE against the value
model (initialised from the reward model), and take `ppo_epochs` passes of clipped policy and value updates.
Rollouts and scoring live in `rollout.py`, the updates in `learner.py`, the losses in `losses.py`, the config
in `ppo_config.py`; this file reads top to bottom: data, models, the loop (rollout -> score -> learn), save.
The caller hands over the prompts (and PPO-ptx's demonstrations): training never reads the store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from dialoop.modeling.chat import encode_prompt, eos_token_ids, pad_token_id
from dialoop.modeling.heads import load_reward_model, reward_model_from_lm
from dialoop.modeling.loading import load_causal_lm, load_tokenizer
from dialoop.modeling.trunk import TrunkCache, frozen_depth
from dialoop.records import ChatExample, ChatMessage
from dialoop.train.checkpoint import CheckpointManager
from dialoop.train.common import (
    SUMMARY_FILE,
    TrainState,
    disable_dropout,
    freeze_lower_layers,
    global_batch_indices,
    load_training_tokenizer,
    prepare_run_dir,
    process_share,
    resolve_base_model,
    resolve_precision,
    seed_everything,
    total_steps,
    write_json_atomic,
)
from dialoop.train.learner import PPOLearner
from dialoop.train.losses import KLController
from dialoop.train.metrics import MetricsLogger
from dialoop.train.ppo_attention import use_fp32_attention, wants_fp32_attention
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.rollout import (
    RewardFn,
    compute_advantages,
    rollout_engine,
    sample_rollouts,
    score_rollouts,
)
from dialoop.train.strategy import Strategy, make_strategy

__all__ = ["PPOConfig", "PPOModels", "PPORun", "load_ppo_models", "train_ppo"]

logger = logging.getLogger(__name__)


# --- data ------------------------------------------------------------------------------------------


def prompts_of_chats(chats: Sequence[Sequence[ChatMessage]]) -> list[list[ChatMessage]]:
    """Every prefix of each conversation that ends with a user turn, without duplicates, in order."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    out: list[list[ChatMessage]] = []
    for chat in chats:
        for end, message in enumerate(chat, start=1):
            if message["role"] != "user":
                continue
            prefix = [dict(m) for m in chat[:end]]
            key = tuple((m["role"], m["content"]) for m in prefix)
            if key not in seen:
                seen.add(key)
                out.append(prefix)
    return out


def encode_prompts(
    tokenizer: Any, prompts: Sequence[list[ChatMessage]], max_prompt_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt through the chat template; prompts longer than the limit are left out."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    kept = [x for x in ids if len(x) <= max_prompt_tokens]
    if len(kept) < len(ids):
        logger.warning("%d prompt(s) longer than %d tokens left out", len(ids) - len(kept), max_prompt_tokens)
    if not kept:
        raise ValueError(f"every prompt is longer than {max_prompt_tokens} tokens (raise --max-length)")
    return kept


# --- models ----------------------------------------------------------------------------------------


@dataclass
class PPOModels:
    """The four roles. `ref` None: the policy with its LoRA adapters disabled; `reward` None: the value model
    with its adapters disabled (LoRA keeps one copy of each backbone)."""

    policy: torch.nn.Module  # trained, fp32 master weights
    value: torch.nn.Module  # trained, one-label sequence classifier read at every position
    ref: torch.nn.Module | None  # frozen, in the compute dtype
    reward: torch.nn.Module | RewardFn | None  # frozen model in the compute dtype, or a function


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no dropout, no gradients."""
    disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _lora(model: torch.nn.Module, config: PPOConfig, head: str | None) -> torch.nn.Module:
    names = config.lora_target
    target = names if names == "all-linear" else [t.strip() for t in names.split(",") if t.strip()]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # dropout off in every model: log-probs must not be noisy
        target_modules=target,
        modules_to_save=[head] if head else None,
    )
    return get_peft_model(model, lora)  # type: ignore[arg-type]


def load_ppo_models(
    config: PPOConfig, tokenizer: Any, strategy: Strategy, reward_fn: RewardFn | None = None
) -> PPOModels:
    """Policy from `--model`, reference from `--reference-model` (default: `--model`), value and reward from
    `--reward-model`."""
    policy_source = resolve_base_model(config.model)
    ref_source = resolve_base_model(config.reference_model) if config.reference_model else policy_source
    frozen_dtype = strategy.compute_dtype
    device = strategy.device
    if reward_fn is None and config.reward_model is None:
        raise ValueError("PPO needs --reward-model (a directory written by `dialoop train rm`)")
    for scorer in {config.reward_model, config.value_model, config.reference_model} - {None}:
        # PPO hands token ids from the policy straight to the value, reward and reference models
        if load_tokenizer(scorer).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"{scorer} does not share the policy's tokenizer ({config.model or 'the default'})"
            )
    policy: torch.nn.Module = load_causal_lm(
        policy_source, dtype=torch.float32, device=device, tokenizer=tokenizer
    )
    value_source = config.value_model or config.reward_model
    value: torch.nn.Module
    if value_source is not None:
        value = load_reward_model(value_source, dtype=torch.float32, device=device)
    else:  # a programmatic reward and no value model: a fresh head on the policy's backbone
        value = reward_model_from_lm(policy_source, dtype=torch.float32, device=device, tokenizer=tokenizer)
    if config.lora_r > 0 and config.trainable_layers > 0:
        raise ValueError("--trainable-layers and --lora-r do not combine (LoRA adapts every layer)")
    for trained in (policy, value):
        disable_dropout(trained)
        freeze_lower_layers(trained, config.trainable_layers)
        trained.train()
        if config.gradient_checkpointing:
            trained.gradient_checkpointing_enable()  # type: ignore[operator]
    ref: torch.nn.Module | None = None  # with LoRA and no other reference: the policy, adapters disabled
    if config.lora_r == 0 or ref_source != policy_source:
        ref = freeze(load_causal_lm(ref_source, dtype=frozen_dtype, device=device, tokenizer=tokenizer))
    if config.lora_r > 0:
        policy = _lora(policy, config, None)
        if reward_fn is None and config.value_model is None:
            # the value starts as the reward model, so the RM is the value model with its adapters disabled
            return PPOModels(policy=policy, value=_lora(value, config, "score"), ref=ref, reward=None)
        value = _lora(value, config, "score")
    reward: torch.nn.Module | RewardFn
    if reward_fn is not None:
        reward = reward_fn
    else:
        assert config.reward_model is not None
        reward = freeze(load_reward_model(config.reward_model, dtype=frozen_dtype, device=device))
    return PPOModels(policy=policy, value=value, ref=ref, reward=reward)


# --- the run ---------------------------------------------------------------------------------------


class PPORun:
    """One PPO run's state: `step()` samples a batch of rollouts, scores them and learns from them."""

    def __init__(
        self,
        config: PPOConfig,
        strategy: Strategy,
        models: PPOModels,
        tokenizer: Any,
        prompt_ids: Sequence[Sequence[int]],
        *,
        demonstrations: Sequence[ChatExample] = (),
        num_steps: int | None = None,
    ) -> None:
        n_proc = strategy.num_processes
        for name in ("batch_size", "mini_batch_size"):
            if getattr(config, name) % n_proc:
                raise ValueError(f"{name} {getattr(config, name)} does not split over {n_proc} processes")
        if not prompt_ids:
            raise ValueError("no prompts")
        self.config = config
        self.strategy = strategy
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.num_steps = num_steps or total_steps(config, len(self.prompt_ids))
        self.eos_ids = eos_token_ids(models.policy, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.ref, self.reward = models.ref, models.reward
        self.kl_ctl = KLController(beta=config.beta, target=config.kl_target, horizon=config.kl_horizon)
        if wants_fp32_attention(strategy.device, strategy.compute_dtype):
            for model in (models.policy, models.value, models.ref, models.reward):
                if isinstance(model, torch.nn.Module):
                    use_fp32_attention(model)
        strategy.check_lora(config.lora_r)
        # sampling from fp32 master weights under autocast would re-cast every weight at every token: a copy
        # in the compute dtype (made before the policy is prepared), refreshed after each step, serves instead
        self.sampler = None if config.lora_r > 0 else strategy.whole_copy(models.policy)
        if self.sampler is not None:
            freeze(self.sampler)
        self.trunk = self._trunk_cache(models)
        self.learner = PPOLearner(
            config,
            strategy,
            models.policy,
            models.value,
            tokenizer,
            num_steps=self.num_steps,
            trunk=self.trunk,
            demonstrations=demonstrations,
        )
        # the engine samples from the sampler copy or the (unwrapped) policy itself, whose weights the updates
        # change in place: it is built once
        generator = (
            self.sampler
            if self.sampler is not None
            else strategy.accelerator.unwrap_model(self.learner.policy)
        )
        self.engine = rollout_engine(
            generator,
            rows=self.learner.local_batch,
            max_prompt_len=max(len(p) for p in self.prompt_ids),
            config=config,
            eos_ids=self.eos_ids,
        )
        self.state = TrainState()

    def _trunk_cache(self, models: PPOModels) -> TrunkCache | None:
        """The frozen bottom blocks of policy and reference, and of value and reward model, run once per
        batch of a step (`TrunkCache`); None when nothing is frozen, sharded, or checkpointing gradients."""
        if not self.config.frozen_trunk_cache or self.config.gradient_checkpointing:
            return None
        trunk = self.strategy.trunk_cache()
        if trunk is None:
            return None
        for trained, frozen in ((models.policy, models.ref), (models.value, models.reward)):
            depth = frozen_depth(trained)
            if trunk.add(trained, depth) and isinstance(frozen, torch.nn.Module):
                trunk.add(frozen, depth, like=trained)
        return trunk

    def _sync_sampler(self) -> None:
        if self.sampler is not None:
            self.strategy.copy_whole(self.learner.policy, self.sampler)

    def resume(self, checkpoints: CheckpointManager) -> None:
        """Continue from the latest checkpoint, when there is one."""
        state = checkpoints.load_latest()
        if state is None:
            return
        self.state = state
        self.kl_ctl.beta = float(state.extra.get("beta", self.config.beta))
        self.learner.updates = TrainState.from_json(state.extra.get("updates", TrainState().to_json()))
        self._sync_sampler()

    def save(self, checkpoints: CheckpointManager) -> None:
        self.state.extra = {"beta": self.kl_ctl.beta, "updates": self.learner.updates.to_json()}
        checkpoints.save(self.state)

    def step(self) -> dict[str, float]:
        """Sample, score and learn from one batch of prompts; returns the step's metrics."""
        config, strategy, learner = self.config, self.strategy, self.learner
        step = self.state.step
        t0 = time.perf_counter()
        indices = global_batch_indices(len(self.prompt_ids), config.batch_size, config.seed, step)
        prompts = [self.prompt_ids[i] for i in process_share(indices, strategy.accelerator)]
        # the sampler copy is already in the compute dtype; the policy itself samples under autocast
        with strategy.accelerator.autocast() if self.sampler is None else nullcontext():
            exp = sample_rollouts(
                self.engine,
                prompts,
                config=config,
                step=step,
                first_row=strategy.process_index * learner.local_batch,
                pad_id=self.pad_id,
                device=strategy.device,
            )
        t1 = time.perf_counter()
        score_rollouts(
            exp,
            learner.passes(exp, range(len(exp)), config.micro_batch_size),
            learner.current(),
            strategy=strategy,
            reward=self.reward,
            ref=self.ref,
            trunk=self.trunk,
            config=config,
        )
        if not learner.fused_old:  # else the first update takes its own log-probs as the old ones first
            compute_advantages(exp, strategy, config, self.kl_ctl.beta)
        t2 = time.perf_counter()
        stats = learner.learn(exp, step, self.kl_ctl.beta)
        if self.trunk is not None:
            self.trunk.clear()  # the next step's rollouts are new token ids
        t3 = time.perf_counter()

        self.kl_ctl.update(stats["kl"], config.batch_size)
        self._sync_sampler()
        self.state.step += 1
        assert exp.raw_scores is not None and exp.scores is not None
        local = torch.stack(
            [
                exp.response_mask.sum(1).mean(),
                exp.finished.float().mean(),
                exp.raw_scores.mean(),
                exp.scores.mean(),
            ]
        )
        reply_length, eos_fraction, score_raw, score = (
            float(x) for x in strategy.accelerator.reduce(local, "mean")
        )
        return {
            "score": score,
            "score_raw": score_raw,
            **stats,
            "beta": self.kl_ctl.beta,
            "reply_length": reply_length,
            "eos_fraction": eos_fraction,
            "lr": float(learner.scheduler.get_last_lr()[0]),
            "skipped_updates": learner.updates.skipped_steps,
            "sec_generation": round(t1 - t0, 4),
            "sec_scoring": round(t2 - t1, 4),
            "sec_learning": round(t3 - t2, 4),
        }


def train_ppo(
    config: PPOConfig,
    prompts: Sequence[list[ChatMessage]],
    *,
    reward_fn: RewardFn | None = None,
    demonstrations: Sequence[ChatExample] | None = None,
) -> Path:
    """Run PPO on `prompts` (PPO-ptx: on `demonstrations` too) and write the final policy as an HF dir to the
    run dir (`config.out`); `reward_fn` replaces the reward model (tests, simulations)."""
    if reward_fn is None and config.reward_model is None:
        raise ValueError("PPO needs --reward-model (a directory written by `dialoop train rm`)")
    if config.ptx_coef > 0 and demonstrations is None:
        raise ValueError("--ptx-coef > 0 needs demonstrations (--ptx-data, or the store's)")
    # the data first: bad input fails before anything is written
    tokenizer = load_training_tokenizer(resolve_base_model(config.model))
    prompt_ids = encode_prompts(tokenizer, prompts, config.max_length - config.max_new_tokens)
    strategy = make_strategy(config, gradient_accumulation_steps=1)
    accelerator = strategy.accelerator
    run_dir = prepare_run_dir(config, "ppo", accelerator)
    seed_everything(config.seed)
    models = load_ppo_models(config, tokenizer, strategy, reward_fn)
    run = PPORun(config, strategy, models, tokenizer, prompt_ids, demonstrations=demonstrations or ())
    checkpoints = CheckpointManager(run_dir, accelerator, keep=config.keep_checkpoints)
    if config.resume:
        run.resume(checkpoints)
    logger.info(
        "PPO: %d prompts, %d steps of %d episodes, precision %s",
        len(prompt_ids),
        run.num_steps,
        config.batch_size,
        resolve_precision(config.precision, strategy.device),
    )
    metrics: dict[str, float] = {}
    with MetricsLogger(
        run_dir,
        total_steps=run.num_steps,
        start_step=run.state.step,
        description="PPO",
        enabled=strategy.is_main_process,
        progress=config.progress,
    ) as metrics_log:
        while run.state.step < run.num_steps:
            metrics = run.step()
            step = run.state.step
            if step % config.log_every == 0 or step == run.num_steps:
                metrics_log.log(step, metrics)
            metrics_log.advance(step)
            if config.checkpoint_every > 0 and step % config.checkpoint_every == 0 and step < run.num_steps:
                run.save(checkpoints)
        if config.keep_final_checkpoint:
            run.save(checkpoints)
    strategy.save_model(run.learner.final_policy(), tokenizer, run_dir)
    if strategy.is_main_process:
        write_json_atomic(
            run_dir / SUMMARY_FILE,
            {
                "stage": "ppo",
                "steps": run.state.step,
                "skipped_updates": run.learner.updates.skipped_steps,
                "prompts": len(prompt_ids),
                "final": {k: v for k, v in metrics.items() if math.isfinite(v)},
            },
        )
    if not config.keep_final_checkpoint:
        checkpoints.remove_all()
    return run_dir

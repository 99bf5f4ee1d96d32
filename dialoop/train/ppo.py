"""PPO from human feedback (InstructGPT): the SFT policy learns to please the reward model, with a KL leash.

    dialoop train ppo --model runs/sft --reward-model runs/rm --out runs/ppo      # prompts from the store
    dialoop train ppo --reward-model runs/rm --prompts prompts.txt --out runs/ppo
    accelerate launch --num_processes 2 --cpu -m dialoop.train ppo ...           # DDP, the same curve
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m dialoop.train ppo ...  # FSDP2
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 -m dialoop.train ppo ...  # ZeRO

Each step: sample one reply per prompt from the policy (seeded per row), score prompt + reply with the frozen
reward model (a fixed score for replies without EOS) and the frozen reference (= the SFT model), turn that
into per-token rewards -beta * KL + score at the last token, estimate advantages with GAE against the value
model (initialised from the reward model), and take `ppo_epochs` passes of clipped policy and value updates.
Making the experience lives in `rollout.py`, the math in `ppo_math.py`, the config in `ppo_config.py`; this
file reads top to bottom: data, models, the trainer's step, the run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor

from dialoop.modeling.chat import encode_prompt, eos_token_ids, pad_token_id
from dialoop.modeling.generation import SamplingParams, sample
from dialoop.modeling.heads import load_reward_model, reward_model_from_lm
from dialoop.modeling.loading import load_causal_lm, load_tokenizer
from dialoop.records import ChatExample, ChatMessage
from dialoop.train.checkpoint import CheckpointManager
from dialoop.train.common import (
    NonFiniteGuard,
    TrainState,
    compute_dtype,
    disable_dropout,
    freeze_lower_layers,
    gathered,
    global_batch_indices,
    load_training_tokenizer,
    make_accelerator,
    optimizer_step,
    prepare_run_dir,
    prepare_trained,
    process_share,
    resolve_base_model,
    resolve_precision,
    save_model,
    seed_everything,
    total_steps,
    write_json_atomic,
)
from dialoop.train.fit import make_optimizer
from dialoop.train.metrics import MetricsLogger
from dialoop.train.ppo_attention import restore_sdpa, use_fp32_attention, wants_fp32_attention
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.ppo_math import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_shaped_rewards,
    masked_moments,
    masked_sum,
    masked_whiten,
    token_logprobs,
)
from dialoop.train.rollout import (
    Experience,
    RewardFn,
    apply_missing_eos_score,
    function_scores,
    length_buckets,
    pack_rollouts,
    reply_logits,
    reply_token_index,
    response_logprobs,
    response_values,
    reward_model_scores,
    scatter_replies,
)
from dialoop.train.trunk import TrunkCache, frozen_depth

__all__ = ["PPOConfig", "PPOModels", "PPOTrainer", "load_ppo_models", "load_prompts", "train_ppo"]

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


def read_prompt_lines(path: Path) -> list[list[ChatMessage]]:
    """One single-turn prompt per non-empty line of a plain-text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [[{"role": "user", "content": line}] for line in lines if line]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def _store_chats(session: Any) -> list[list[ChatMessage]]:
    """Conversations of every kind (demonstrations, chats, imported) and comparison contexts of the store."""
    from dialoop.formats import chat_examples_from_store, ranking_examples_from_store
    from dialoop.store.models import CONVERSATION_KINDS

    chats = [e.messages for e in chat_examples_from_store(session, kinds=CONVERSATION_KINDS)]
    return chats + [e.prompt for e in ranking_examples_from_store(session)]


def load_prompts(config: PPOConfig) -> list[list[ChatMessage]]:
    """The run's prompts: `--prompts` lines, user turns of `--data` (any import format), or the store's."""
    if config.prompts is not None:
        return read_prompt_lines(config.prompts)
    if config.data is not None:
        from dialoop.formats import get_format, read_chat_examples, read_ranking_examples
        from dialoop.formats.registry import RankingFormat

        assert config.format is not None  # checked by TrainConfig
        if isinstance(get_format(config.format), RankingFormat):
            chats = [e.prompt for e in read_ranking_examples(config.data, config.format)]
        else:
            chats = [e.messages for e in read_chat_examples(config.data, config.format)]
        where = str(config.data)
    else:
        from dialoop.train.data import _from_store

        chats, where = _from_store(_store_chats), "the store"
    prompts = prompts_of_chats(chats)
    if not prompts:
        raise ValueError(f"no user turns to use as prompts in {where}")
    return prompts


def load_demonstrations(config: PPOConfig) -> list[ChatExample]:
    """Demonstrations for PPO-ptx: `--ptx-data`, else the store's."""
    from dialoop.train.data import load_chat_examples

    return load_chat_examples(config.ptx_data, config.ptx_format if config.ptx_data else None)


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
    from peft import LoraConfig, get_peft_model

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
    config: PPOConfig, tokenizer: Any, accelerator: Accelerator, reward_fn: RewardFn | None = None
) -> PPOModels:
    """Policy from `--model`, reference from `--reference-model` (default: `--model`), value and reward from
    `--reward-model`."""
    policy_source = resolve_base_model(config.model)
    ref_source = resolve_base_model(config.reference_model) if config.reference_model else policy_source
    frozen_dtype = compute_dtype(accelerator)
    device = accelerator.device
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


class PolicyPass(torch.nn.Module):
    """The policy's training forward: reply log-probs [B, R], entropy summed over reply tokens, PPO-ptx loss.

    A module of its own so that accelerate wraps it (DDP) and the backward of each model can run apart:
    only one model's activations are alive at a time.
    """

    def __init__(self, policy: torch.nn.Module, trunk: TrunkCache | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.trunk = trunk

    def forward(
        self,
        exp: Experience,
        temperature: float,
        ptx_batch: dict[str, Tensor] | None = None,
        entropy: bool = False,
    ) -> dict[str, Tensor]:
        """`entropy`: also the entropy summed over reply tokens (a full-vocabulary pass of its own)."""
        logits = reply_logits(self.policy, exp, self.trunk)
        rows, steps = reply_token_index(exp)
        logprobs = token_logprobs(logits, exp.response_ids[rows, steps], temperature)
        out = {"logprobs": scatter_replies(logprobs, exp)}
        if entropy:
            with torch.no_grad():
                out["entropy_sum"] = entropy_from_logits(logits, temperature).sum()
        if ptx_batch is not None:
            from dialoop.train.sft import causal_lm_loss

            out["ptx_loss_sum"], _ = causal_lm_loss(self.policy, ptx_batch)
        return out


class ValuePass(torch.nn.Module):
    """The value model's training forward: the value before each reply token [B, R]."""

    def __init__(self, value: torch.nn.Module, trunk: TrunkCache | None = None) -> None:
        super().__init__()
        self.value = value
        self.trunk = trunk

    def forward(self, exp: Experience) -> Tensor:
        return response_values(self.value, exp, self.trunk)


class TrainedPair(torch.nn.Module):
    """Both training passes in one module, for FSDP and DeepSpeed: accelerate shards one model per optimizer,
    and every call must go through the root module (the engine), whose hooks gather and free the shards."""

    def __init__(self, policy_pass: PolicyPass, value_pass: ValuePass) -> None:
        super().__init__()
        self.policy_pass = policy_pass
        self.value_pass = value_pass
        # FSDP's transformer auto-wrap policy looks for the block classes here, and accelerate for the hidden
        # size (DeepSpeed configs with "auto" bucket sizes) in `config`
        self._no_split_modules = getattr(policy_pass.policy, "_no_split_modules", None)
        self.config = getattr(policy_pass.policy, "config", None)

    def forward(self, role: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, role)(*args, **kwargs)


class _Role:
    """`pair.forward(role, ...)` as a callable: the policy or value pass of a sharded `TrainedPair`."""

    def __init__(self, pair: torch.nn.Module, role: str) -> None:
        self.pair, self.role = pair, role

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pair(self.role, *args, **kwargs)


def _full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP shard (a collective: every process must ask), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(like: Tensor, full: Tensor) -> Tensor:
    """`full` cut into this process's shard of `like` when `like` is an FSDP shard (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class PolicyEMA:
    """Exponential moving average of the policy's trainable weights (kept in fp32; under FSDP, sharded like
    them, and saved whole; under ZeRO-3, whole: update and copy within `gathered`)."""

    def __init__(self, policy: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in policy.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        for name, param in policy.named_parameters():
            if name in self.params:
                self.params[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, policy: torch.nn.Module) -> None:
        for name, param in policy.named_parameters():
            if name in self.params:
                param.copy_(self.params[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "params": {n: _full(p) for n, p in self.params.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.params = {n: _shard_like(self.params[n], p) for n, p in state["params"].items()}


def use_fused_adamw(optimizer: torch.optim.Optimizer) -> None:
    """Switch a fresh AdamW to its fused kernel where the parameters' device has one.

    The default per-tensor loop reads and writes every weight and moment several times: on the CPU it took
    ~4x longer than the fused kernel for the two 135M-parameter models PPO trains.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if params and all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params):
        for group in optimizer.param_groups:
            group["foreach"] = None
            group["fused"] = True


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one rollout: a function of (run seed, step, row of the global batch) only, so
    rollouts do not depend on the number of processes and a resumed run samples what the first would have."""
    return (seed * 1_000_003 + step * 10_007 + row) % 2**62


# --- the trainer -----------------------------------------------------------------------------------


class PPOTrainer:
    """One PPO run's state: `step()` makes one batch of experience and learns from it."""

    def __init__(
        self,
        config: PPOConfig,
        accelerator: Accelerator,
        models: PPOModels,
        tokenizer: Any,
        prompt_ids: Sequence[Sequence[int]],
        *,
        demonstrations: Sequence[ChatExample] = (),
        num_steps: int | None = None,
    ) -> None:
        n_proc = accelerator.num_processes
        for name in ("batch_size", "mini_batch_size"):
            if getattr(config, name) % n_proc:
                raise ValueError(f"{name} {getattr(config, name)} does not split over {n_proc} processes")
        if not prompt_ids:
            raise ValueError("no prompts")
        self.config = config
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.num_steps = num_steps or total_steps(config, len(self.prompt_ids))
        self.eos_ids = eos_token_ids(models.policy, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.ref, self.reward = models.ref, models.reward
        self.kl_ctl = KLController(beta=config.beta, target=config.kl_target, horizon=config.kl_horizon)
        self.local_batch = config.batch_size // n_proc
        self.local_mini = config.mini_batch_size // n_proc
        # the whole local batch is one mini-batch and fits one pass: the first epoch's policy forward gives
        # the "old" log-probs, so making the experience needs no policy pass of its own
        self.fused_old = self.local_mini == self.local_batch and config.micro_batch_size >= self.local_batch
        # the same for the value model, when both models' activations may be alive at once
        self.fused_values = self.fused_old and config.fused_value_pass
        # padding costs compute, and so does one more pass (its own run of the shared prefix, smaller matmuls,
        # Python): about 64 tokens on a CPU; GPUs prefer fewer, larger batches
        self.pass_overhead_tokens = 64 if accelerator.device.type == "cpu" else 1024
        self.ptx_rows = self._ptx_rows(demonstrations) if config.ptx_coef > 0 else []
        self._ptx_tokens = torch.zeros(())

        self.dtype = compute_dtype(accelerator)
        if wants_fp32_attention(accelerator.device, self.dtype):
            for model in (models.policy, models.value, models.ref, models.reward):
                if isinstance(model, torch.nn.Module):
                    use_fp32_attention(model)
        updates = self.num_steps * config.ppo_epochs * (config.batch_size // config.mini_batch_size)
        # FSDP, DeepSpeed: every forward (ZeRO-3) and backward (ZeRO-2/3) gathers or reduces together with the
        # other processes, so each process makes the same passes (`buckets`) and samples from a whole copy of
        # the policy; policy and value are one module (accelerate prepares one model per optimizer)
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.sharded and config.lora_r > 0:
            raise ValueError(
                "LoRA (--lora-r) does not run under FSDP or DeepSpeed: use DDP, or full fine-tuning"
            )
        self.sampler = self._make_sampler(models.policy)  # before sharding: a whole copy
        self.trunk = self._trunk_cache(models)
        policy_pass = PolicyPass(models.policy, self.trunk)
        value_pass = ValuePass(models.value, self.trunk)
        trained = torch.nn.ModuleList([policy_pass, value_pass])
        optimizer, self.scheduler = make_optimizer(config, trained, updates)
        use_fused_adamw(optimizer)
        self.policy_pass: Any
        self.value_pass: Any
        if self.sharded:
            pair, self.optimizer = prepare_trained(
                accelerator, TrainedPair(policy_pass, value_pass), optimizer
            )
            self.policy_pass, self.value_pass = _Role(pair, "policy_pass"), _Role(pair, "value_pass")
            self.trained = pair  # for clipping, train()
        else:
            self.policy_pass, self.value_pass, self.optimizer = accelerator.prepare(
                policy_pass, value_pass, optimizer
            )
            self.trained = torch.nn.ModuleList([self.policy_pass, self.value_pass])
        accelerator.register_for_checkpointing(self.scheduler)
        self.ema: PolicyEMA | None = None
        if config.ema_decay > 0:
            with gathered(accelerator, self.policy):  # under ZeRO-3 the EMA is whole
                self.ema = PolicyEMA(self.policy, config.ema_decay)
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)
        self.state = TrainState()
        self.updates = TrainState()  # optimizer updates: the NaN guard counts these
        self.guard = NonFiniteGuard()

    @property
    def policy(self) -> torch.nn.Module:
        if self.sharded:
            return self.trained.policy_pass.policy  # type: ignore[return-value]
        return self.accelerator.unwrap_model(self.policy_pass).policy

    @property
    def value(self) -> torch.nn.Module:
        if self.sharded:
            return self.trained.value_pass.value  # type: ignore[return-value]
        return self.accelerator.unwrap_model(self.value_pass).value

    def _ptx_rows(self, demonstrations: Sequence[ChatExample]) -> list[Any]:
        from dialoop.train.sft import tokenize_chat

        rows = [
            tokenize_chat(self.tokenizer, d.messages, max_length=self.config.max_length)
            for d in demonstrations
        ]
        rows = [r for r in rows if r.num_targets > 0]
        if not rows:
            raise ValueError(
                "--ptx-coef > 0 needs demonstrations with assistant turns (--ptx-data, or the store's)"
            )
        return rows

    def _trunk_cache(self, models: PPOModels) -> TrunkCache | None:
        """The frozen bottom blocks of policy and reference, and of value and reward model, run once per
        batch of a step (`TrunkCache`); None when nothing is frozen, or under FSDP, DeepSpeed and gradient
        checkpointing."""
        config = self.config
        if not config.frozen_trunk_cache or self.sharded or config.gradient_checkpointing:
            return None
        trunk = TrunkCache()
        for trained, frozen in ((models.policy, models.ref), (models.value, models.reward)):
            depth = frozen_depth(trained)
            if trunk.add(trained, depth) and isinstance(frozen, torch.nn.Module):
                trunk.add(frozen, depth, like=trained)
        return trunk

    def _make_sampler(self, policy: torch.nn.Module) -> torch.nn.Module | None:
        """A frozen copy of a fully trained policy, in the compute dtype, to sample from (None: sample from
        the policy itself). Call before the policy is prepared.

        Sampling from the fp32 master weights under autocast would re-cast every weight at every token; the
        copy is refreshed after each step instead. Under FSDP the copy is always made (in fp32 too): each
        process samples replies of its own lengths, which sharded weights, gathered at every call together
        with the other processes, cannot serve.
        """
        if self.config.lora_r > 0 or (self.dtype == torch.float32 and not self.sharded):
            return None
        sampler = copy.deepcopy(policy)
        return freeze(sampler.to(self.dtype))

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        if self.sampler is not None:
            with gathered(self.accelerator, self.policy):
                for dst, src in zip(self.sampler.parameters(), self.policy.parameters(), strict=True):
                    dst.copy_(_full(src))

    def buckets(self, exp: Experience, rows: Sequence[int], max_rows: int) -> list[list[int]]:
        """`rows` of `exp` grouped into forward passes of at most `max_rows` rows of similar length.

        Under FSDP the number of passes must not depend on this process's lengths: full passes of rows sorted
        by length (every process has as many rows).
        """
        lengths = exp.lengths
        if self.sharded:
            order = sorted(rows, key=lambda r: -lengths[r])
            return [order[i : i + max_rows] for i in range(0, len(order), max_rows)]
        # in index order: the same rows make the same passes (and so the same shared prefix, part of each
        # row's `TrunkCache` key) whatever order an epoch visits them in
        rows = sorted(rows)
        groups = length_buckets([lengths[r] for r in rows], max_rows, self.pass_overhead_tokens)
        return [sorted(rows[i] for i in group) for group in groups]

    # --- checkpoints ---

    def resume(self, checkpoints: CheckpointManager) -> None:
        """Continue from the latest checkpoint, when there is one."""
        state = checkpoints.load_latest()
        if state is None:
            return
        self.state = state
        self.kl_ctl.beta = float(state.extra.get("beta", self.config.beta))
        self.updates = TrainState.from_json(state.extra.get("updates", TrainState().to_json()))
        self._sync_sampler()

    def save(self, checkpoints: CheckpointManager) -> None:
        self.state.extra = {"beta": self.kl_ctl.beta, "updates": self.updates.to_json()}
        checkpoints.save(self.state)

    # --- one step ---

    def step(self) -> dict[str, float]:
        """Sample, score and learn from one batch of prompts; returns the step's metrics."""
        config, acc = self.config, self.accelerator
        step = self.state.step
        t0 = time.perf_counter()
        indices = global_batch_indices(len(self.prompt_ids), config.batch_size, config.seed, step)
        rows = process_share(indices, acc)
        first_row = acc.process_index * self.local_batch
        prompts = [self.prompt_ids[i] for i in rows]
        params = [
            SamplingParams(
                config.max_new_tokens, config.temperature, seed=row_seed(config.seed, step, first_row + j)
            )
            for j in range(len(rows))
        ]
        # the sampler copy is already in the compute dtype; the policy itself samples under autocast
        with acc.autocast() if self.sampler is None else nullcontext():
            sampler = self.sampler if self.sampler is not None else self.policy
            completions = sample(
                sampler, prompts, params, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id
            )
        exp = pack_rollouts(prompts, completions, self.pad_id, acc.device)
        t1 = time.perf_counter()
        self._score(exp)
        t2 = time.perf_counter()
        stats = self._learn(exp)
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
        reply_length, eos_fraction, score_raw, score = (float(x) for x in acc.reduce(local, "mean"))
        return {
            "score": score,
            "score_raw": score_raw,
            **stats,
            "beta": self.kl_ctl.beta,
            "reply_length": reply_length,
            "eos_fraction": eos_fraction,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "skipped_updates": self.updates.skipped_steps,
            "sec_generation": round(t1 - t0, 4),
            "sec_scoring": round(t2 - t1, 4),
            "sec_learning": round(t3 - t2, 4),
        }

    @torch.no_grad()
    def _score(self, exp: Experience) -> None:
        """Reward scores, reference log-probs and values (and, unless fused, old log-probs and advantages)."""
        config, acc = self.config, self.accelerator
        raw = torch.zeros(len(exp), device=acc.device)
        if not isinstance(self.reward, torch.nn.Module) and self.reward is not None:
            raw = function_scores(self.reward, exp)
        # without gradients DDP's wrapper is not needed; FSDP's root gathers the shards
        value_pass = self.value_pass if self.sharded else acc.unwrap_model(self.value_pass)
        policy_pass = self.policy_pass if self.sharded else acc.unwrap_model(self.policy_pass)
        for rows in self.buckets(exp, range(len(exp)), config.micro_batch_size):
            part = exp.rows(rows)
            idx = torch.tensor(rows, device=acc.device)
            # frozen models are stored in the compute dtype; LoRA views and fp32 master weights need autocast
            if isinstance(self.reward, torch.nn.Module):
                raw[idx] = reward_model_scores(self.reward, part, self.trunk)
            elif self.reward is None:
                with acc.autocast(), self.value.disable_adapter():  # type: ignore[operator]
                    raw[idx] = reward_model_scores(self.value, part)
            if self.ref is None:
                with acc.autocast(), self.policy.disable_adapter():  # type: ignore[operator]
                    exp.put_rows(
                        "ref_logprobs", rows, response_logprobs(self.policy, part, config.temperature)
                    )
            else:
                exp.put_rows(
                    "ref_logprobs", rows, response_logprobs(self.ref, part, config.temperature, self.trunk)
                )
            with acc.autocast():
                if not self.fused_values:
                    exp.put_rows("old_values", rows, value_pass(part))
                if not self.fused_old:
                    out = policy_pass(part, config.temperature)
                    exp.put_rows("old_logprobs", rows, out["logprobs"])
        exp.raw_scores = raw.float()
        exp.scores = apply_missing_eos_score(exp.raw_scores, exp.finished, config.no_eos_score)
        if not self.fused_old:
            self._advantages(exp)

    @torch.no_grad()
    def _advantages(self, exp: Experience) -> None:
        """KL-shaped rewards, GAE, and advantages whitened over the global batch."""
        assert exp.old_logprobs is not None and exp.ref_logprobs is not None and exp.old_values is not None
        assert exp.scores is not None
        config, acc = self.config, self.accelerator
        mask = exp.response_mask
        rewards, _ = kl_shaped_rewards(exp.old_logprobs, exp.ref_logprobs, exp.scores, mask, self.kl_ctl.beta)
        advantages, exp.returns = gae_advantages(rewards, exp.old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            # over the global batch, so N processes compute what one process would
            advantages = masked_whiten(advantages, mask, acc.reduce(masked_moments(advantages, mask), "sum"))
        exp.advantages = advantages

    def _learn(self, exp: Experience) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches."""
        config, acc = self.config, self.accelerator
        totals: dict[str, Tensor] = {}
        n_updates = 0
        self.trained.train()
        gen = torch.Generator().manual_seed(row_seed(config.seed, self.state.step, acc.process_index))
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(len(exp), generator=gen).tolist()
            minis = [order[i : i + self.local_mini] for i in range(0, len(order), self.local_mini)]
            counts = acc.reduce(torch.stack([exp.response_mask[m].sum() for m in minis]), "sum")
            for mini, n_tokens in zip(minis, counts, strict=True):
                fused = self.fused_old and epoch == 0
                finite = self._policy_update(exp, mini, n_tokens, totals, fused, epoch)
                if not (fused and self.fused_values):
                    finite = self._value_update(exp, mini, n_tokens, totals) and finite
                optimizer_step(
                    acc,
                    self.trained,
                    self.optimizer,
                    self.scheduler,
                    loss_finite=finite,
                    max_grad_norm=config.max_grad_norm,
                    state=self.updates,
                    guard=self.guard,
                )
                if self.ema is not None:
                    with gathered(acc, self.policy):
                        self.ema.update(self.policy)
                n_updates += 1
        keys = sorted(totals)
        reduced = acc.reduce(torch.stack([totals[k] for k in keys]).to(acc.device), "sum")
        out = {k: float(v) for k, v in zip(keys, reduced, strict=True)}
        per_update = ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "ptx_loss")
        result = {k: out[k] / n_updates for k in per_update if k in out}
        result["entropy"] = out["entropy_sum"] / out["tokens"]
        result["kl"] = out["kl_sum"] / config.batch_size
        return result

    def _policy_update(
        self, exp: Experience, rows: list[int], n_tokens: Tensor, totals: dict, fused: bool, epoch: int
    ) -> bool:
        """Policy gradients of one mini-batch (PPO-ptx included). `fused`: forward every pass first and take
        their log-probs (and, with `fused_values`, the value model's values) as the old ones, compute the
        advantages, then one backward over the sum (per model)."""
        config, acc = self.config, self.accelerator
        ptx = self._ptx_batch() if self.ptx_rows else None
        buckets = self.buckets(exp, rows, len(rows) if fused else config.micro_batch_size)
        losses: list[Tensor] = []
        if fused:
            outs = [
                self.policy_pass(
                    exp.rows(b), config.temperature, ptx if k == len(buckets) - 1 else None, entropy=True
                )
                for k, b in enumerate(buckets)
            ]
            values = [self.value_pass(exp.rows(b)) for b in buckets] if self.fused_values else []
            for b, out in zip(buckets, outs, strict=True):
                exp.put_rows("old_logprobs", b, out["logprobs"].detach())
            for b, v in zip(buckets, values, strict=False):
                exp.put_rows("old_values", b, v.detach())
            self._advantages(exp)
            loss = torch.stack(
                [
                    self._policy_loss(exp.rows(b), o, n_tokens, totals, epoch)
                    for b, o in zip(buckets, outs, strict=True)
                ]
            ).sum()
            acc.backward(loss * acc.num_processes)  # DDP averages gradients over processes
            if not values:
                return bool(torch.isfinite(loss.detach()))
            vf_loss = torch.stack(
                [
                    self._value_loss(exp.rows(b), v, n_tokens, totals)
                    for b, v in zip(buckets, values, strict=True)
                ]
            ).sum()
            acc.backward(config.value_coef * vf_loss * acc.num_processes)
            return bool(torch.isfinite(loss.detach()) and torch.isfinite(vf_loss.detach()))
        for k, b in enumerate(buckets):
            last = k == len(buckets) - 1
            # gradients are exchanged once per update, with the last pass
            with acc.no_sync(self.policy_pass) if not last else nullcontext():
                part = exp.rows(b)
                out = self.policy_pass(part, config.temperature, ptx if last else None, entropy=epoch == 0)
                loss = self._policy_loss(part, out, n_tokens, totals, epoch)
                acc.backward(loss * acc.num_processes)
            losses.append(loss.detach())
        return bool(torch.isfinite(torch.stack(losses)).all())

    def _value_update(self, exp: Experience, rows: list[int], n_tokens: Tensor, totals: dict) -> bool:
        """Value gradients of one mini-batch (clipped value loss times its coefficient)."""
        config, acc = self.config, self.accelerator
        buckets = self.buckets(exp, rows, config.micro_batch_size)
        losses: list[Tensor] = []
        for k, b in enumerate(buckets):
            with acc.no_sync(self.value_pass) if k < len(buckets) - 1 else nullcontext():
                part = exp.rows(b)
                vf_loss = self._value_loss(part, self.value_pass(part), n_tokens, totals)
                acc.backward(config.value_coef * vf_loss * acc.num_processes)
            losses.append(vf_loss.detach())
        return bool(torch.isfinite(torch.stack(losses)).all())

    def _value_loss(self, part: Experience, values: Tensor, n_tokens: Tensor, totals: dict) -> Tensor:
        """Clipped value loss of one pass, normalised by the mini-batch's global token count."""
        assert part.old_values is not None and part.returns is not None
        loss, clip_frac = clipped_value_loss(
            values,
            part.old_values,
            part.returns,
            part.response_mask,
            self.config.clip_range_value,
            num_tokens=n_tokens,
        )
        _accumulate(totals, {"value_loss": loss, "value_clip_frac": clip_frac})
        return loss

    def _policy_loss(
        self, part: Experience, out: dict[str, Tensor], n_tokens: Tensor, totals: dict, epoch: int
    ) -> Tensor:
        """Clipped policy loss (+ PPO-ptx) of one pass, normalised by the mini-batch's global token count."""
        config = self.config
        assert part.old_logprobs is not None and part.ref_logprobs is not None and part.advantages is not None
        mask = part.response_mask
        loss, clip_frac, approx_kl = clipped_policy_loss(
            out["logprobs"], part.old_logprobs, part.advantages, mask, config.clip_range, num_tokens=n_tokens
        )
        stats = {"policy_loss": loss, "clip_frac": clip_frac, "approx_kl": approx_kl}
        if "ptx_loss_sum" in out:
            ptx_loss = out["ptx_loss_sum"] / self.accelerator.reduce(self._ptx_tokens, "sum")
            loss = loss + config.ptx_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss
        if epoch == 0:
            stats["entropy_sum"] = out["entropy_sum"]
            stats["tokens"] = mask.sum()
            stats["kl_sum"] = masked_sum(part.old_logprobs - part.ref_logprobs, mask)
        _accumulate(totals, stats)
        return loss

    def _ptx_batch(self) -> dict[str, Tensor]:
        """This process's share of the demonstrations of the next update (PPO-ptx)."""
        from dialoop.train.sft import collate

        config, acc = self.config, self.accelerator
        n_local = max(1, config.ptx_batch_size // acc.num_processes)
        indices = global_batch_indices(
            len(self.ptx_rows), n_local * acc.num_processes, config.seed + 1, self.updates.step
        )
        mine = indices[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        batch = collate([self.ptx_rows[i] for i in mine], self.pad_id, acc.device)
        self._ptx_tokens = batch["target"][:, 1:].sum().float()
        return batch

    def final_policy(self) -> torch.nn.Module:
        """The policy to publish: EMA weights when enabled, LoRA merged into the base weights."""
        policy = self.policy
        if self.ema is not None:
            with gathered(self.accelerator, policy, modify=True):
                self.ema.copy_to(policy)
        if self.config.lora_r > 0:
            policy = policy.merge_and_unload()  # type: ignore[operator]
        restore_sdpa(policy)
        return policy


def _accumulate(totals: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    for key, value in stats.items():
        totals[key] = totals.get(key, torch.zeros(())) + value.detach().float().cpu()


# --- the run ---------------------------------------------------------------------------------------


def train_ppo(
    config: PPOConfig,
    prompts: Sequence[list[ChatMessage]] | None = None,
    *,
    reward_fn: RewardFn | None = None,
    demonstrations: Sequence[ChatExample] | None = None,
) -> Path:
    """Run PPO on `prompts` (default: `load_prompts(config)`) and write the final policy as an HF dir to the
    run dir (`config.out`); `reward_fn` replaces the reward model (tests, simulations)."""
    if reward_fn is None and config.reward_model is None:
        raise ValueError("PPO needs --reward-model (a directory written by `dialoop train rm`)")
    # the data first: bad input fails before anything is written
    tokenizer = load_training_tokenizer(resolve_base_model(config.model))
    prompt_ids = encode_prompts(
        tokenizer,
        prompts if prompts is not None else load_prompts(config),
        config.max_length - config.max_new_tokens,
    )
    if config.ptx_coef > 0 and demonstrations is None:
        demonstrations = load_demonstrations(config)
    accelerator = make_accelerator(config, gradient_accumulation_steps=1)
    run_dir = prepare_run_dir(config, "ppo", accelerator)
    seed_everything(config.seed)
    models = load_ppo_models(config, tokenizer, accelerator, reward_fn)
    trainer = PPOTrainer(
        config, accelerator, models, tokenizer, prompt_ids, demonstrations=demonstrations or ()
    )
    checkpoints = CheckpointManager(run_dir, accelerator, keep=config.keep_checkpoints)
    if config.resume:
        trainer.resume(checkpoints)
    logger.info(
        "PPO: %d prompts, %d steps of %d episodes, precision %s",
        len(prompt_ids),
        trainer.num_steps,
        config.batch_size,
        resolve_precision(config.precision, accelerator.device),
    )
    metrics: dict[str, float] = {}
    with MetricsLogger(
        run_dir,
        total_steps=trainer.num_steps,
        start_step=trainer.state.step,
        description="PPO",
        enabled=accelerator.is_main_process,
        progress=config.progress,
    ) as metrics_log:
        while trainer.state.step < trainer.num_steps:
            metrics = trainer.step()
            step = trainer.state.step
            if step % config.log_every == 0 or step == trainer.num_steps:
                metrics_log.log(step, metrics)
            metrics_log.advance(step)
            if (
                config.checkpoint_every > 0
                and step % config.checkpoint_every == 0
                and step < trainer.num_steps
            ):
                trainer.save(checkpoints)
        if config.keep_final_checkpoint:
            trainer.save(checkpoints)
    save_model(accelerator, trainer.final_policy(), tokenizer, run_dir)
    if accelerator.is_main_process:
        write_json_atomic(
            run_dir / "metrics.json",
            {
                "stage": "ppo",
                "steps": trainer.state.step,
                "skipped_updates": trainer.updates.skipped_steps,
                "prompts": len(prompt_ids),
                "final": {k: v for k, v in metrics.items() if math.isfinite(v)},
            },
        )
    if not config.keep_final_checkpoint:
        checkpoints.remove_all()
    return run_dir

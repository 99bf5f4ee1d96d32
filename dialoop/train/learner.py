"""PPO's learning side: the policy and value models, their clipped updates, the EMA of the policy and PPO-ptx.

`PPOLearner.learn(exp)` takes `ppo_epochs` passes over a scored batch of rollouts (`dialoop.train.rollout`)
in shuffled mini-batches; each mini-batch is one optimizer update of both models (one optimizer), its losses
normalised by the mini-batch's token count over every process, so N processes take the 1-process update.
The losses are `dialoop.train.losses`'; distribution is the `Strategy`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from dialoop.modeling.chat import pad_token_id
from dialoop.modeling.scoring import (
    Experience,
    reply_logits,
    reply_token_index,
    response_values,
    scatter_replies,
    token_logprobs,
)
from dialoop.modeling.trunk import TrunkCache
from dialoop.records import ChatExample
from dialoop.train.common import TrainState, global_batch_indices
from dialoop.train.fit import make_optimizer
from dialoop.train.losses import clipped_policy_loss, clipped_value_loss, entropy_from_logits, masked_sum
from dialoop.train.ppo_attention import restore_sdpa
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.rollout import CurrentModels, compute_advantages, row_seed
from dialoop.train.sft import TokenizedChat, causal_lm_loss, collate, tokenize_chat
from dialoop.train.strategy import NonFiniteGuard, Strategy


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


class PolicyEMA:
    """Exponential moving average of the policy's trainable weights (kept in fp32; under FSDP, sharded like
    them, and saved whole; under ZeRO-3, whole: update and copy within `gathered`)."""

    def __init__(self, policy: torch.nn.Module, decay: float, strategy: Strategy) -> None:
        self.decay = decay
        self.strategy = strategy
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
        return {"decay": self.decay, "params": {n: self.strategy.full(p) for n, p in self.params.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.params = {n: self.strategy.shard_like(self.params[n], p) for n, p in state["params"].items()}


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


def _accumulate(totals: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    for key, value in stats.items():
        totals[key] = totals.get(key, torch.zeros(())) + value.detach().float().cpu()


class PPOLearner:
    """The trained models of a PPO run, with their optimizer, and the updates that learn from rollouts."""

    def __init__(
        self,
        config: PPOConfig,
        strategy: Strategy,
        policy: torch.nn.Module,
        value: torch.nn.Module,
        tokenizer: Any,
        *,
        num_steps: int,
        trunk: TrunkCache | None = None,
        demonstrations: Sequence[ChatExample] = (),
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        n_proc = strategy.num_processes
        self.local_batch = config.batch_size // n_proc
        self.local_mini = config.mini_batch_size // n_proc
        # the whole local batch is one mini-batch and fits one pass: the first epoch's policy forward gives
        # the "old" log-probs, so making the experience needs no policy pass of its own
        self.fused_old = self.local_mini == self.local_batch and config.micro_batch_size >= self.local_batch
        # the same for the value model, when both models' activations may be alive at once
        self.fused_values = self.fused_old and config.fused_value_pass
        # padding costs compute, and so does one more pass (its own run of the shared prefix, smaller matmuls,
        # Python): about 64 tokens on a CPU; GPUs prefer fewer, larger batches
        self.pass_overhead_tokens = 64 if strategy.device.type == "cpu" else 1024
        self.ptx_rows = self._ptx_rows(demonstrations) if config.ptx_coef > 0 else []
        self._ptx_tokens = torch.zeros(())

        updates = num_steps * config.ppo_epochs * (config.batch_size // config.mini_batch_size)
        policy_pass, value_pass = PolicyPass(policy, trunk), ValuePass(value, trunk)
        optimizer, self.scheduler = make_optimizer(
            config, torch.nn.ModuleList([policy_pass, value_pass]), updates
        )
        use_fused_adamw(optimizer)
        self.pair, self.optimizer = strategy.prepare_pair(
            {"policy_pass": policy_pass, "value_pass": value_pass}, optimizer, like=policy
        )
        strategy.accelerator.register_for_checkpointing(self.scheduler)
        self.ema: PolicyEMA | None = None
        if config.ema_decay > 0:
            with strategy.gathered(self.policy):  # under ZeRO-3 the EMA is whole
                self.ema = PolicyEMA(self.policy, config.ema_decay, strategy)
            strategy.accelerator.register_for_checkpointing(self.ema)
        self.updates = TrainState()  # optimizer updates: the NaN guard counts these
        self.guard = NonFiniteGuard()

    @property
    def policy(self) -> torch.nn.Module:
        policy_pass, _ = self.pair.modules()
        return policy_pass.policy  # type: ignore[return-value]

    @property
    def value(self) -> torch.nn.Module:
        _, value_pass = self.pair.modules()
        return value_pass.value  # type: ignore[return-value]

    def _ptx_rows(self, demonstrations: Sequence[ChatExample]) -> list[TokenizedChat]:
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

    def passes(self, exp: Experience, rows: Sequence[int], max_rows: int) -> list[list[int]]:
        """`rows` of `exp` grouped into forward passes of at most `max_rows` rows of similar length."""
        return self.strategy.forward_passes(exp.lengths, rows, max_rows, self.pass_overhead_tokens)

    def current(self) -> CurrentModels:
        """The models as scoring sees them, without the passes whose outputs the first update gives."""
        policy_pass, value_pass = self.pair.inference()
        return CurrentModels(
            policy=self.policy,
            value=self.value,
            policy_pass=None if self.fused_old else policy_pass,
            value_pass=None if self.fused_values else value_pass,
        )

    def learn(self, exp: Experience, step: int, beta: float) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches."""
        config, acc = self.config, self.strategy.accelerator
        totals: dict[str, Tensor] = {}
        n_updates = 0
        self.pair.trained.train()
        gen = torch.Generator().manual_seed(row_seed(config.seed, step, acc.process_index))
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(len(exp), generator=gen).tolist()
            minis = [order[i : i + self.local_mini] for i in range(0, len(order), self.local_mini)]
            counts = acc.reduce(torch.stack([exp.response_mask[m].sum() for m in minis]), "sum")
            for mini, n_tokens in zip(minis, counts, strict=True):
                fused = self.fused_old and epoch == 0
                finite = self._policy_update(exp, mini, n_tokens, totals, fused, epoch, beta)
                if not (fused and self.fused_values):
                    finite = self._value_update(exp, mini, n_tokens, totals) and finite
                self.strategy.optimizer_step(
                    self.pair.trained,
                    self.optimizer,
                    self.scheduler,
                    loss_finite=finite,
                    max_grad_norm=config.max_grad_norm,
                    state=self.updates,
                    guard=self.guard,
                )
                if self.ema is not None:
                    with self.strategy.gathered(self.policy):
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
        self,
        exp: Experience,
        rows: list[int],
        n_tokens: Tensor,
        totals: dict,
        fused: bool,
        epoch: int,
        beta: float,
    ) -> bool:
        """Policy gradients of one mini-batch (PPO-ptx included). `fused`: forward every pass first and take
        their log-probs (and, with `fused_values`, the value model's values) as the old ones, compute the
        advantages, then one backward over the sum (per model)."""
        config, strategy = self.config, self.strategy
        n_proc = strategy.num_processes
        ptx = self._ptx_batch() if self.ptx_rows else None
        buckets = self.passes(exp, rows, len(rows) if fused else config.micro_batch_size)
        losses: list[Tensor] = []
        if fused:
            outs = [
                self.pair.first(
                    exp.rows(b), config.temperature, ptx if k == len(buckets) - 1 else None, entropy=True
                )
                for k, b in enumerate(buckets)
            ]
            values = [self.pair.second(exp.rows(b)) for b in buckets] if self.fused_values else []
            for b, out in zip(buckets, outs, strict=True):
                exp.put_rows("old_logprobs", b, out["logprobs"].detach())
            for b, v in zip(buckets, values, strict=False):
                exp.put_rows("old_values", b, v.detach())
            compute_advantages(exp, strategy, config, beta)
            loss = torch.stack(
                [
                    self._policy_loss(exp.rows(b), o, n_tokens, totals, epoch)
                    for b, o in zip(buckets, outs, strict=True)
                ]
            ).sum()
            strategy.backward(loss * n_proc)  # DDP averages gradients over processes
            if not values:
                return bool(torch.isfinite(loss.detach()))
            vf_loss = torch.stack(
                [
                    self._value_loss(exp.rows(b), v, n_tokens, totals)
                    for b, v in zip(buckets, values, strict=True)
                ]
            ).sum()
            strategy.backward(config.value_coef * vf_loss * n_proc)
            return bool(torch.isfinite(loss.detach()) and torch.isfinite(vf_loss.detach()))
        for k, b in enumerate(buckets):
            last = k == len(buckets) - 1
            # gradients are exchanged once per update, with the last pass
            with strategy.accelerator.no_sync(self.pair.first) if not last else nullcontext():
                part = exp.rows(b)
                out = self.pair.first(part, config.temperature, ptx if last else None, entropy=epoch == 0)
                loss = self._policy_loss(part, out, n_tokens, totals, epoch)
                strategy.backward(loss * n_proc)
            losses.append(loss.detach())
        return bool(torch.isfinite(torch.stack(losses)).all())

    def _value_update(self, exp: Experience, rows: list[int], n_tokens: Tensor, totals: dict) -> bool:
        """Value gradients of one mini-batch (clipped value loss times its coefficient)."""
        config, strategy = self.config, self.strategy
        buckets = self.passes(exp, rows, config.micro_batch_size)
        losses: list[Tensor] = []
        for k, b in enumerate(buckets):
            with strategy.accelerator.no_sync(self.pair.second) if k < len(buckets) - 1 else nullcontext():
                part = exp.rows(b)
                vf_loss = self._value_loss(part, self.pair.second(part), n_tokens, totals)
                strategy.backward(config.value_coef * vf_loss * strategy.num_processes)
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
            ptx_loss = out["ptx_loss_sum"] / self.strategy.accelerator.reduce(self._ptx_tokens, "sum")
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
        config, strategy = self.config, self.strategy
        n_local = max(1, config.ptx_batch_size // strategy.num_processes)
        indices = global_batch_indices(
            len(self.ptx_rows), n_local * strategy.num_processes, config.seed + 1, self.updates.step
        )
        mine = indices[strategy.process_index * n_local : (strategy.process_index + 1) * n_local]
        batch = collate([self.ptx_rows[i] for i in mine], self.pad_id, strategy.device)
        self._ptx_tokens = batch["target"][:, 1:].sum().float()
        return batch

    def final_policy(self) -> torch.nn.Module:
        """The policy to publish: EMA weights when enabled, LoRA merged into the base weights."""
        policy = self.policy
        if self.ema is not None:
            with self.strategy.gathered(policy, modify=True):
                self.ema.copy_to(policy)
        if self.config.lora_r > 0:
            policy = policy.merge_and_unload()  # type: ignore[operator]
        restore_sdpa(policy)
        return policy

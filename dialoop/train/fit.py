"""The supervised training loop shared by SFT and the reward model.

A stage gives a list of examples, `loss_fn(model, examples) -> (loss_sum, metric_sums)` and
`weight_fn(example) -> float` (its share of the normaliser: target tokens for SFT, 1 per ranking for the RM).
The loss of a step is sum(loss_sum) / sum(weight) over the whole global batch, whatever the number of
processes or micro-batches, so 1 process and N processes follow the same curve.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from dialoop.train.checkpoint import CheckpointManager
from dialoop.train.common import TrainState, chunks, global_batch_indices, process_share, total_steps
from dialoop.train.config import TrainConfig
from dialoop.train.metrics import MetricsLogger
from dialoop.train.strategy import NonFiniteGuard, Strategy

logger = logging.getLogger(__name__)

T = TypeVar("T")
LossFn = Callable[[torch.nn.Module, list[T]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def make_optimizer(
    config: TrainConfig, model: torch.nn.Module, num_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and norms) and a cosine schedule with linear warm-up over `num_steps`."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = round(config.warmup_ratio * num_steps)
    schedule = functools.partial(cosine_with_warmup, warmup=warmup, total=num_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def cosine_with_warmup(step: int, *, warmup: int, total: int) -> float:
    """LR factor of optimizer step `step` (0-based): linear warm-up to 1, then cosine decay towards 0.

    Neither the first step (warm-up) nor the last (decay) has a zero rate: no step is wasted.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(
    config: TrainConfig,
    strategy: Strategy,
    model: torch.nn.Module,
    examples: Sequence[T],
    *,
    loss_fn: LossFn[T],
    weight_fn: Callable[[T], float],
    run_dir: Path,
    description: str,
    length_fn: Callable[[T], int] | None = None,
) -> tuple[torch.nn.Module, TrainState]:
    """Train `model` on `examples` (from the latest checkpoint with --resume); returns the prepared model.

    `length_fn` (tokens of an example), when given, groups examples of similar length into micro-batches.
    """
    if not examples:
        raise ValueError("no training examples")
    weights = [float(weight_fn(e)) for e in examples]
    if any(w <= 0 for w in weights):
        raise ValueError("every training example must carry weight (filter out examples with no target)")
    num_steps = total_steps(config, len(examples))
    optimizer, scheduler = make_optimizer(config, model, num_steps)
    model, optimizer = strategy.prepare(model, optimizer)
    accelerator = strategy.accelerator
    # the scheduler is not prepared (accelerate would step it once per process); it is checkpointed as is
    accelerator.register_for_checkpointing(scheduler)
    checkpoints = CheckpointManager(run_dir, accelerator, keep=config.keep_checkpoints)
    state = (checkpoints.load_latest() if config.resume else None) or TrainState()
    guard = NonFiniteGuard()
    n_micro = accelerator.gradient_accumulation_steps
    scale = accelerator.num_processes * n_micro  # undoes accelerate's 1/n_micro and DDP's mean over processes

    with MetricsLogger(
        run_dir,
        total_steps=num_steps,
        start_step=state.step,
        description=description,
        enabled=accelerator.is_main_process,
        progress=config.progress,
    ) as metrics_log:
        while state.step < num_steps:
            started = time.perf_counter()
            indices = global_batch_indices(len(examples), config.batch_size, config.seed, state.step)
            norm = sum(weights[i] for i in indices)
            share = process_share(indices, accelerator)
            if length_fn is not None:
                # similar lengths in a micro-batch waste less compute on padding; the step's loss is the same
                share.sort(key=lambda i: length_fn(examples[i]))
            micro_batches = list(chunks(share, config.micro_batch_size))
            if len(micro_batches) != n_micro:
                raise RuntimeError(f"{len(micro_batches)} micro-batches for {n_micro} accumulation steps")
            model.train()
            finite = True
            totals: dict[str, torch.Tensor] = {}
            for batch in micro_batches:
                with accelerator.accumulate(model):
                    loss_sum, extra = loss_fn(model, [examples[i] for i in batch])
                    strategy.backward(loss_sum * (scale / norm))
                finite = finite and bool(torch.isfinite(loss_sum.detach()).item())
                for key, value in {"loss": loss_sum, **extra}.items():
                    totals[key] = totals.get(key, 0) + value.detach().float()
            lr = float(scheduler.get_last_lr()[0])
            grad_norm = strategy.optimizer_step(
                model,
                optimizer,
                scheduler,
                loss_finite=finite,
                max_grad_norm=config.max_grad_norm,
                state=state,
                guard=guard,
            )
            keys = sorted(totals)
            reduced = (
                accelerator.reduce(torch.stack([totals[k].reshape(()) for k in keys]), reduction="sum") / norm
            )
            if state.step % config.log_every == 0 or state.step == num_steps:
                step_metrics: dict[str, float | int | None] = {
                    k: float(v) for k, v in zip(keys, reduced, strict=True)
                }
                step_metrics |= {
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "skipped_steps": state.skipped_steps,
                    "step_seconds": round(time.perf_counter() - started, 4),
                }
                metrics_log.log(state.step, step_metrics)
            metrics_log.advance(state.step)
            periodic = config.checkpoint_every > 0 and state.step % config.checkpoint_every == 0
            if (periodic and state.step < num_steps) or (
                state.step == num_steps and config.keep_final_checkpoint
            ):
                checkpoints.save(state)
    return model, state


def finish_checkpoints(config: TrainConfig, run_dir: Path, accelerator: Accelerator) -> None:
    """Drop the run's checkpoints once its model is written, unless --keep-final-checkpoint."""
    if not config.keep_final_checkpoint:
        CheckpointManager(run_dir, accelerator).remove_all()

"""Shared training infrastructure of the three stages (SFT, reward model, PPO).

API for a stage (`sft.py` is the complete example):
- `dialoop.train.config.TrainConfig`: base config dataclass (torch-free module, so the CLI loads fast);
  subclass it, every field with a default and `metadata={"help": ...}`.
  `dialoop.cli.train.config_command(train_app, name, ConfigCls, help)` turns it into typer options.
- `make_accelerator(config, gradient_accumulation_steps=None) -> Accelerator`: one process by default,
  DDP, FSDP2 or DeepSpeed ZeRO-1/2/3 under `accelerate launch` (CPU-only machines: `--multi_gpu
  --num_processes N` joins over gloo; `--use_fsdp --fsdp_version 2` and `--use_deepspeed --zero_stage S`
  shard over gloo too); bf16 autocast over fp32 master weights when `resolve_precision(config.precision)`
  says "bf16". Accumulation steps default to `accumulation_steps(config, num_processes)`.
  `compute_dtype(accelerator)`, `zero_stage(accelerator)`. See docs/architecture.md, "Distributed training".
- `prepare_trained(accelerator, model, optimizer)`: `accelerator.prepare` of the trained model (under
  DeepSpeed `accelerator.backward` then only accumulates: `optimizer_step` steps the engine);
  `gathered(accelerator, module, modify=False)`: a block in which ZeRO-3 parameters are whole.
- `seed_everything(seed)`; `prepare_run_dir(config, stage, accelerator) -> Path` (refuses a non-empty dir
  without --resume, and a finished run with it).
- `global_batch_indices(num_examples, batch_size, seed, step)`, `process_share(indices, accelerator)`,
  `total_steps(config, n)`: the data order is a pure function of (seed, step), so resuming at a step
  resumes the data order exactly.
- `optimizer_step(accelerator, model, optimizer, scheduler, loss_finite=, max_grad_norm=, state=, guard=)`
  with `NonFiniteGuard`: a non-finite loss or gradient on any process skips the update and is counted in
  `TrainState`; 5 in a row raise `NonFiniteLossError` (DeepSpeed: the same, see `optimizer_step`).
- `dialoop.train.checkpoint.CheckpointManager(run_dir, accelerator, keep=)`: atomic `save(state)`,
  `load_latest()`: model, optimizer, objects registered with `accelerator.register_for_checkpointing`
  (the scheduler), RNG states of every process (python, numpy, torch), and the `TrainState` counters.
- `dialoop.train.metrics.MetricsLogger(run_dir, total_steps=, start_step=, ...)`: `log(step, metrics,
  kind=)` to metrics.jsonl + TensorBoard, rich progress bar with ETA; `read_metrics(run_dir, kind)`.
- `dialoop.train.fit.make_optimizer(config, model, num_steps)` (AdamW + cosine with warm-up) and
  `fit(...)`: the supervised loop of SFT and the RM built from the pieces above.
- Models: `resolve_base_model(path_or_None)`, `load_training_tokenizer`, `load_causal_lm_for_training`,
  `disable_dropout`, `freeze_lower_layers(model, n)`, `save_model(accelerator, model, tokenizer, out_dir)`
  (a standard HF dir; call on every process). Data: `dialoop.train.data.load_chat_examples/
  load_ranking_examples(data, format)` (file, or the store when `data` is None), `split_heldout`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, parse_flag_from_env

from dialoop.train.config import PRECISIONS, TrainConfig
from dialoop.train.trunk import input_embeddings, transformer_blocks

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "metrics.json"  # written when a run finishes: its final figures


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a NaN or inf loss."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint; `step` is the number of optimizer steps taken (or skipped)."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


# --- precision, accelerator, seeding ----------------------------------------------------------


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """`auto` -> `bf16` where `dialoop.modeling.autocast_dtype` says the device has fast bf16, else `fp32`."""
    from dialoop.modeling import autocast_dtype, pick_device

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if autocast_dtype(device or pick_device()) == torch.bfloat16 else "fp32"


def accumulation_steps(config: TrainConfig, num_processes: int) -> int:
    """Micro-batches per process per optimizer step; the global batch must split evenly over processes."""
    if config.batch_size % num_processes:
        raise ValueError(f"batch_size {config.batch_size} does not split over {num_processes} processes")
    return math.ceil(config.batch_size // num_processes / config.micro_batch_size)


def make_accelerator(config: TrainConfig, *, gradient_accumulation_steps: int | None = None) -> Accelerator:
    """The run's Accelerator: bf16 autocast over fp32 weights when the precision resolves to bf16."""
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    from dialoop.modeling import pick_device

    # without an accelerator, processes started by `accelerate launch --multi_gpu` / torchrun join over gloo
    cpu = pick_device().type == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
    # accelerate keeps its settings in process-wide singletons; a process that runs several stages (the demo)
    # starts each with fresh ones, keeping the process group (PartialState)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    partial = PartialState(cpu=cpu)
    steps = gradient_accumulation_steps or accumulation_steps(config, partial.num_processes)
    precision = resolve_precision(config.precision, partial.device)
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    fsdp_on_cpu = fsdp and cpu and partial.num_processes > 1
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and cpu:
        # DeepSpeed's CPU accelerator (read when deepspeed first picks one); it joins the gloo process group
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if fsdp:
        # transformers would load the weights on the first process only (the others get meta tensors for
        # FSDP to fill in); PPO's frozen models and the RM's new head need them on every process
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if fsdp_on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        # FSDP1 trains over gloo, but gathering its full state dict (offload_to_cpu) segfaults in torch 2.13
        raise ValueError("FSDP on CPUs needs FSDP2: pass --fsdp_version 2 to accelerate launch")
    accelerator = Accelerator(
        cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no", gradient_accumulation_steps=steps
    )
    if fsdp_on_cpu:
        _fsdp_on_cpu(accelerator)
    if deepspeed and cpu and partial.num_processes > 1:
        _deepspeed_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, config, steps, precision)
    logger.info(
        "accelerator: %d process(es) (%s) on %s, precision %s, %d micro-batch(es) per step",
        accelerator.num_processes,
        accelerator.distributed_type.value
        + (f" ZeRO-{zero_stage(accelerator)}" if zero_stage(accelerator) else ""),
        accelerator.device,
        precision,
        steps,
    )
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Shard with FSDP over gloo, as `accelerate launch --use_fsdp` asks, where accelerate would run DDP.

    accelerate (1.15) turns FSDP on for GPU-like devices only: on CPUs it quietly falls back to DDP
    (MULTI_CPU). PyTorch's FSDP works over gloo, so the state is switched to FSDP with the plugin built from
    the launcher's settings, as accelerate does on a GPU; `prepare`, `clip_grad_norm_`, `get_state_dict` and
    `save_state` / `load_state` then take their FSDP paths.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # accelerate keeps the two singletons in step (a later AcceleratorState copies PartialState's type)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """Run DeepSpeed over gloo, as `accelerate launch --use_deepspeed` asks, where accelerate would run DDP.

    accelerate (1.15) turns DeepSpeed off on CPUs, as it does FSDP (MULTI_CPU). DeepSpeed has a CPU
    accelerator and uses the process group that accelerate started, so the state is switched to DeepSpeed
    with the plugin built from the launcher's settings (`--zero_stage`, `--deepspeed_config_file`, ...), as
    on a GPU.
    """
    from accelerate.utils import DeepSpeedPlugin

    state = accelerator.state
    if state.deepspeed_plugins is not None:
        return
    import deepspeed.ops

    # DeepSpeed's shared-memory all-reduce serves inference only; loading it would compile C++ at run time
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    plugin = DeepSpeedPlugin()  # precision: see `_configure_deepspeed`
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


def _configure_deepspeed(accelerator: Accelerator, config: TrainConfig, steps: int, precision: str) -> None:
    """Fit the DeepSpeed config to the run: the loop, not the engine, decides when the optimizer steps.

    - `managed_gradient_accumulation: false`: `accelerator.backward` only accumulates gradients (see
      `_BackwardOnly`) and `optimizer_step` takes the step with `engine.step()`, however many backward passes
      an update has (PPO: a policy and a value loss);
    - the run's micro-batches per step and `--max-grad-norm` (`gradient_clipping`: the engine clips);
    - bf16 is DeepSpeed's `torch_autocast` over fp32 weights (as in every other mode), its gradients reduced
      in fp32; ZeRO-3 gathers the whole model for `save_model`;
    - every process loads whole weights (no `zero.Init` in `from_pretrained`): PPO's frozen models are not
      prepared; `deepspeed.initialize` partitions the trained model.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    stage = int(plugin.zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} is not supported: use --zero_stage 1, 2 or 3 (or DDP)"
        )
    zero = ds_config.setdefault("zero_optimization", {})
    if any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        # the offloaded optimizer is DeepSpeedCPUAdam, a C++ op compiled at run time
        raise ValueError("DeepSpeed offload is not supported (it needs DeepSpeed's compiled CPU Adam)")
    gas = ds_config.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", steps):
        logger.warning("DeepSpeed gradient_accumulation_steps %s replaced by the run's %d", gas, steps)
    micro = max(1, config.micro_batch_size)
    ds_config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=steps,
        train_batch_size=micro * steps * accelerator.num_processes,
        gradient_clipping=max(0.0, config.max_grad_norm),
        managed_gradient_accumulation=False,
    )
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds_config["fp16"] = {"enabled": False}
    ds_config["bf16"] = {"enabled": False}
    ds_config.pop("torch_autocast", None)
    if precision == "bf16":
        ds_config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    plugin.zero3_init_flag = False
    plugin.dschf = None
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    """bf16 when the run is mixed precision (accelerate's autocast, DeepSpeed's torch_autocast), else fp32."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        autocast = plugin.deepspeed_config.get("torch_autocast", {})
        return torch.bfloat16 if autocast.get("enabled") else torch.float32
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage of the run, 0 when it does not run DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def prepare_trained(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """`accelerator.prepare(model, optimizer)` for the trained model; call once per run.

    Under DeepSpeed, `accelerator.backward` then only accumulates gradients; `optimizer_step` steps the
    engine.
    """
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.deepspeed_engine_wrapped = _BackwardOnly(model)
    return model, optimizer


@contextmanager
def gathered(accelerator: Accelerator, module: torch.nn.Module, *, modify: bool = False) -> Iterator[None]:
    """Inside the block, `module`'s parameters are whole under ZeRO-3 (a collective: every process enters);
    with `modify`, what the first process writes into them is kept. Other modes: nothing to do (FSDP shards
    are DTensors, see `dialoop.train.ppo._full`)."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0 if modify else None):
        yield


class _BackwardOnly:
    """What `accelerator.backward` calls under DeepSpeed (in place of accelerate's wrapper, which steps the
    optimizer at the accumulation boundary): `engine.backward`, which scales by 1 / the accumulation steps as
    accelerate does, and accumulates (ZeRO-2/3 reduce the gradients as they come).

    A loss that is not finite is back-propagated times NaN, so that its gradient is not finite either,
    whatever made the loss so: DeepSpeed's ZeRO optimizer skips an update whose gradient norm is not finite,
    on every process, and clears the gradients (see `optimizer_step`).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            loss = loss * float("nan")
        self.engine.backward(loss, **kwargs)

    def get_global_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) with one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --- run directory -----------------------------------------------------------------------------


def prepare_run_dir(config: TrainConfig, stage: str, accelerator: Accelerator) -> Path:
    """Create (or, with --resume, reuse) the run dir, and write the config there on the main process."""
    if config.out is None:
        if config.resume:
            raise ValueError("--resume needs --out (the run directory to continue)")
        from datetime import datetime

        from dialoop.settings import settings

        config.out = settings().home / "runs" / f"{stage}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.out)
    if accelerator.is_main_process:
        if config.resume and (run_dir / SUMMARY_FILE).exists():
            raise FileExistsError(f"{run_dir} holds a finished run ({SUMMARY_FILE}): nothing to resume")
        if run_dir.exists() and any(run_dir.iterdir()) and not config.resume:
            raise FileExistsError(
                f"{run_dir} is not empty: pass --resume to continue that run, or choose another --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG_FILE, {"stage": stage, **config.to_json()})
    accelerator.wait_for_everyone()
    return run_dir


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same dir, fsync, rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; run files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- data order ----------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=gen).tolist())


def global_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of a fresh permutation per epoch."""
    if num_examples < 1:
        raise ValueError("no training examples")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, num_examples)
        out.append(_epoch_permutation(num_examples, seed, epoch)[offset])
    return out


def total_steps(config: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of the run: --max-steps, or enough global batches to cover --epochs."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / config.batch_size))


def process_share(indices: Sequence[int], accelerator: Accelerator) -> list[int]:
    """This process's contiguous slice of a global batch (the batch size is a multiple of the processes)."""
    n = accelerator.num_processes
    per = len(indices) // n
    return list(indices[accelerator.process_index * per : (accelerator.process_index + 1) * per])


def chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# --- the optimizer step with its NaN/inf guard --------------------------------------------------


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop the run."""

    max_consecutive: int = 5

    def update(self, state: TrainState, finite: bool) -> None:
        if finite:
            state.nonfinite_streak = 0
            return
        state.skipped_steps += 1
        state.nonfinite_streak += 1
        logger.warning("step %d: non-finite loss or gradient, update skipped", state.step + 1)
        if state.nonfinite_streak >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{state.nonfinite_streak} steps in a row had a NaN or inf loss (last: {state.step + 1}): "
                "stopped. Lower the learning rate, use --precision fp32, or check the data."
            )


def all_finite(accelerator: Accelerator, local_finite: bool) -> bool:
    """True when the value is finite on every process (one all-reduce)."""
    flag = torch.tensor([0.0 if local_finite else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == 0)


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    *,
    loss_finite: bool,
    max_grad_norm: float,
    state: TrainState,
    guard: NonFiniteGuard,
) -> float | None:
    """Clip, step and zero the gradients, unless the loss or the gradient is non-finite on any process.

    Returns the gradient norm before clipping (None when the step was skipped). Advances `state.step`.

    Under DeepSpeed the engine clips (`gradient_clipping` = `max_grad_norm`, set by `make_accelerator`) and
    steps; its ZeRO optimizer skips an update whose gradient norm is not finite and clears the gradients, and
    a non-finite loss was back-propagated as NaN (`_BackwardOnly`), so the same updates are skipped.
    """
    finite = all_finite(accelerator, loss_finite)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _engine_step(
            model, scheduler, finite=finite, max_grad_norm=max_grad_norm, state=state, guard=guard
        )
    grad_norm: float | None = None
    if finite:
        # an infinite max norm measures without clipping
        norm = accelerator.clip_grad_norm_(
            model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf
        )
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
    guard.update(state, finite)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return grad_norm if finite else None


def _engine_step(
    engine: Any,
    scheduler: Any,
    *,
    finite: bool,
    max_grad_norm: float,
    state: TrainState,
    guard: NonFiniteGuard,
) -> float | None:
    """`optimizer_step` under DeepSpeed: `engine.step()` clips, steps (unless the gradient norm is not finite)
    and clears the gradients; the LR schedule, not prepared, advances with the updates taken."""
    if engine.gradient_clipping() != max(0.0, max_grad_norm):
        raise RuntimeError(f"DeepSpeed clips at {engine.gradient_clipping()}, the run asks {max_grad_norm}")
    engine.step()
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 copies a gradient into its partition at an update's first backward and adds it at later
        # ones: a parameter whose first gradient comes later (PPO's value model, after the policy's passes)
        # would add onto the last update's (or a skipped update's NaN). Cleared, every backward may add.
        engine.optimizer.grad_partitions_flat_buffer.zero_()
    applied = bool(engine.was_step_applied())
    if applied and not finite:
        raise RuntimeError("DeepSpeed applied an update whose loss was not finite")
    guard.update(state, applied)
    if applied:
        scheduler.step()
    state.step += 1
    norm = engine.get_global_grad_norm()
    return float(norm) if applied and norm is not None else None


# --- models --------------------------------------------------------------------------------------


def resolve_base_model(path_or_id: str | Path | None) -> str:
    """A model dir or hub id; None means the embedded default (converted on first use)."""
    from dialoop.modeling import resolve_model

    return str(resolve_model(path_or_id))


def load_training_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model, with dialoop's EOS/pad rules."""
    from dialoop.modeling import load_tokenizer

    return load_tokenizer(path)


def load_causal_lm_for_training(path: str | Path) -> torch.nn.Module:
    """A causal LM with fp32 master weights on the CPU (accelerate moves it), in train mode."""
    from dialoop.modeling import load_causal_lm

    return load_causal_lm(path, dtype=torch.float32, device="cpu").train()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF and reward models train without dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def freeze_lower_layers(model: torch.nn.Module, trainable_layers: int) -> None:
    """Train only the top `trainable_layers` transformer blocks, the final norm and the heads (0: everything).

    The frozen bottom needs no backward pass, which is most of the cost of fine-tuning on a CPU.
    """
    if trainable_layers <= 0:
        return
    blocks = transformer_blocks(model)
    if blocks is None:
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        raise ValueError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    if trainable_layers >= len(blocks):
        return
    embeddings = input_embeddings(model)
    frozen = {id(p) for block in blocks[: len(blocks) - trainable_layers] for p in block.parameters()}
    if embeddings is not None:
        frozen |= {id(p) for p in embeddings.parameters()}
    for param in model.parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
    logger.info("training the top %d of %d blocks", trainable_layers, len(blocks))


def _share_tied_tensors(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Make the gathered copies of one tied parameter (embeddings and LM head) one tensor again.

    A gathered full state dict holds a separate copy under each name; `save_pretrained` then writes both,
    unlike a plain save. One shared tensor lets transformers drop the alias as it always does.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    out = dict(state_dict)
    for group in names.values():
        kept = next((n for n in group if n in out), None)
        for name in group:
            if kept is not None and name in out:
                out[name] = out[kept]
    return out


def save_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write a standard HF dir (fp32 weights, tokenizer, chat template) into `out_dir`; call on every process.

    `model` is the prepared HF model, or a training module that holds it as `.hf_model` (under ZeRO-3 it may
    also be a part of the engine's module: PPO's policy). The files are written to a temp dir first and then
    moved in, so a crash never leaves half a weight file; other files of `out_dir` (metrics, config of the
    run) stay.
    """
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    whole = accelerator.unwrap_model(model)
    with gathered(accelerator, whole):  # ZeRO-3: the weights are whole in this block
        state_dict: dict[str, Any] | None = None
        if zero_stage(accelerator) == 3:
            if accelerator.is_main_process:
                state_dict = {k: v.detach().clone() for k, v in whole.state_dict().items()}
        elif sharded:
            state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
        if accelerator.is_main_process:
            _write_model_dir(whole, state_dict, tokenizer, Path(out_dir), sharded=sharded)
    accelerator.wait_for_everyone()


def _write_model_dir(
    unwrapped: Any,
    state_dict: dict[str, Any] | None,
    tokenizer: Any,
    out_dir: Path,
    *,
    sharded: bool,
) -> None:
    from dialoop.modeling.loading import ensure_special_tokens, save_model_dir

    if hasattr(unwrapped, "hf_model"):
        unwrapped = unwrapped.hf_model
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if state_dict is not None:
        state_dict = _share_tied_tensors(unwrapped, state_dict)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".final-"))
    try:
        if sharded:
            ensure_special_tokens(unwrapped, tokenizer)
            unwrapped.save_pretrained(tmp / "model", state_dict=state_dict)
            tokenizer.save_pretrained(tmp / "model")
        else:
            save_model_dir(unwrapped, tokenizer, tmp / "model")
        # config.json last: a dir with a config but no weights never appears
        for path in sorted((tmp / "model").iterdir(), key=lambda p: p.name == "config.json"):
            path.chmod(0o644)
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model written to %s", out_dir)

"""Non-distributed helpers of the three stages (SFT, reward model, PPO); distribution is `strategy.py`'s.

API for a stage (`sft.py` is the complete example):
- `dialoop.train.config.TrainConfig`: base config dataclass (torch-free module, so the CLI loads fast);
  subclass it, every field with a default and `metadata={"help": ...}`.
  `dialoop.cli.train.config_command(train_app, name, ConfigCls, help)` turns it into typer options.
- `dialoop.train.strategy.make_strategy(config) -> Strategy`: one process, DDP, FSDP2 or DeepSpeed ZeRO-1/2/3
  under `accelerate launch`; `strategy.prepare`, `backward`, `optimizer_step` (with `NonFiniteGuard`),
  `gathered`, `save_model`. See docs/architecture.md, "Distributed training".
- `resolve_precision(precision)`, `accumulation_steps(config, num_processes)`, `seed_everything(seed)`;
  `prepare_run_dir(config, stage, accelerator) -> Path` (refuses a non-empty dir without --resume, and a
  finished run with it).
- `global_batch_indices(num_examples, batch_size, seed, step)`, `process_share(indices, accelerator)`,
  `total_steps(config, n)`: the data order is a pure function of (seed, step), so resuming at a step
  resumes the data order exactly; `length_buckets` groups rows of similar length into passes.
- `dialoop.train.checkpoint.CheckpointManager(run_dir, accelerator, keep=)`: atomic `save(state)`,
  `load_latest()`: model, optimizer, objects registered with `accelerator.register_for_checkpointing`
  (the scheduler), RNG states of every process (python, numpy, torch), and the `TrainState` counters.
- `dialoop.train.metrics.MetricsLogger(run_dir, total_steps=, start_step=, ...)`: `log(step, metrics,
  kind=)` to metrics.jsonl + TensorBoard, rich progress bar with ETA.
- `dialoop.train.fit.make_optimizer(config, model, num_steps)` (AdamW + cosine with warm-up) and
  `fit(...)`: the supervised loop of SFT and the RM built from the pieces above.
- Models: `resolve_base_model(path_or_None)`, `load_training_tokenizer(path, chat_template)`,
  `load_causal_lm_for_training` (4-bit with --load-in-4bit), `disable_dropout`,
  `freeze_lower_layers(model, n)`,
  `enable_gradient_checkpointing`, `add_lora(model, config, head)` and `merge_lora` (adapters to RUN/adapter,
  merged weights to the run dir). Data: the caller hands the stage its records
  (`dialoop.records`); `dialoop.train.data.split_heldout`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)

from dialoop.atomic import write_atomic
from dialoop.modeling import (
    autocast_dtype,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from dialoop.modeling.export import ADAPTER_DIR
from dialoop.modeling.trunk import input_embeddings, transformer_blocks
from dialoop.settings import settings
from dialoop.train.config import PRECISIONS, TrainConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "metrics.json"  # written when a run finishes: its final figures


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
    """Write JSON atomically: readers see the old or the new file."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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


def length_buckets(lengths: Sequence[int], max_rows: int, overhead_tokens: int) -> list[list[int]]:
    """Group row indices into batches of at most `max_rows` rows that waste little compute on padding.

    Rows are sorted by length (longest first) and cut where it pays: a batch costs rows x its longest
    length, plus `overhead_tokens` for launching one more forward pass (dynamic programming over the cuts).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j rows (sorted)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + (j - i) * lengths[order[i]] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


# --- models --------------------------------------------------------------------------------------


def resolve_base_model(path_or_id: str | Path | None) -> str:
    """A model dir or hub id; None means the embedded default (converted on first use)."""
    return str(resolve_model(path_or_id))


def load_training_tokenizer(path: str | Path, chat_template: str | Path | None = None) -> Any:
    """The tokenizer of a model, with dialoop's EOS/pad rules; `chat_template` (a Jinja file) replaces its
    template (a base model without one gets ChatML)."""
    return load_tokenizer(path, chat_template=chat_template)


def load_causal_lm_for_training(
    path: str | Path, tokenizer: Any = None, *, config: TrainConfig | None = None
) -> torch.nn.Module:
    """A causal LM with fp32 master weights on the CPU (accelerate moves it), in train mode.

    With `config.load_in_4bit` (QLoRA) the frozen base weights are 4-bit on the GPU instead.
    """
    if config is not None and config.load_in_4bit:
        model = load_causal_lm(path, tokenizer=tokenizer, quantize_4bit=True)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()
    return load_causal_lm(path, dtype=torch.float32, device="cpu", tokenizer=tokenizer).train()


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: frozen inputs are fine)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model: torch.nn.Module, config: TrainConfig, head: str | None = None) -> torch.nn.Module:
    """Wrap `model` in LoRA adapters of rank `config.lora_r` on `config.lora_target`; `head` (a module name,
    e.g. the reward model's `score`) is trained in full alongside them."""
    names = config.lora_target
    target = names if names == "all-linear" else [t.strip() for t in names.split(",") if t.strip()]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=target,
        modules_to_save=[head] if head else None,
    )
    try:
        wrapped = get_peft_model(model, lora)  # type: ignore[arg-type]
    except ValueError as exc:  # e.g. a --lora-target that names no module of this architecture
        raise ValueError(f"--lora-target {names!r}: {exc}") from exc
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA r=%d on %s: %d of %d parameters train", config.lora_r, names, trainable, total)
    return wrapped


def merge_lora(
    model: Any,
    run_dir: Path,
    *,
    main_process: bool,
    full_precision_base: Callable[[], torch.nn.Module] | None = None,
) -> Any:
    """Write a peft model's adapters to RUN/adapter (main process) and return the model with them merged
    into its base weights; any other model is returned as it is.

    `full_precision_base` (QLoRA: the base is 4-bit) builds a full-precision copy of the base model that the
    adapters (and trained heads) are merged into instead.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    if main_process:
        model.save_pretrained(run_dir / ADAPTER_DIR)
    if full_precision_base is None:
        return model.merge_and_unload()
    trained = get_peft_model_state_dict(model)
    copy = get_peft_model(full_precision_base(), model.peft_config["default"])  # type: ignore[arg-type]
    set_peft_model_state_dict(copy, trained)
    return copy.merge_and_unload()


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

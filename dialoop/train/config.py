"""Config dataclasses of the training stages (no torch import: the CLI builds its options from them).

Every field has a default that works on the embedded default, and `metadata={"help": ...}` for the CLI
(`dialoop.cli.train.config_command` turns a config class into typer options, one per field).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")  # accelerate's trackers `--report-to` may name


@dataclass
class TrainConfig:
    """Knobs every stage shares; the defaults work on the embedded default on a laptop."""

    out: Path | None = field(
        default=None,
        metadata={
            "help": "Run directory; the final model goes there (default: a new one in DIALOOP_HOME/runs)."
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "Model to start from (dir or hub id; default: the embedded default)."}
    )
    data: Path | None = field(
        default=None,
        metadata={
            "help": "Read the data from this source instead of the store: a JSONL or Parquet file, a "
            "dataset saved with `datasets`' save_to_disk, or a hub dataset id (when online)."
        },
    )
    format: str | None = field(
        default=None,
        metadata={"help": "Format of --data (see `dialoop import`; default: told from its columns)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of every RNG and of the data order."})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 where the hardware has it), bf16 or fp32."}
    )
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(
        default=16, metadata={"help": "Global batch: examples per optimizer step, all processes together."}
    )
    micro_batch_size: int = field(
        default=4, metadata={"help": "Examples per forward pass in one process (gradient accumulation)."}
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the data (ignored when --max-steps > 0)."}
    )
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps to run; 0: derived from --epochs."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of the steps with a linear warm-up."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."}
    )
    max_length: int = field(default=512, metadata={"help": "Longest sequence in tokens."})
    checkpoint_every: int = field(
        default=50, metadata={"help": "Write a checkpoint every N steps; 0: never."}
    )
    keep_checkpoints: int = field(
        default=1, metadata={"help": "How many recent checkpoints to keep while running."}
    )
    keep_final_checkpoint: bool = field(
        default=False, metadata={"help": "Keep the last checkpoint once the run ends."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in --out."})
    log_every: int = field(default=1, metadata={"help": "Write metrics every N steps."})
    trainable_layers: int = field(
        default=0, metadata={"help": "Train only the top N transformer blocks (+ norm, heads); 0: all."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations to save memory."}
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template file replacing the model's (default: the model's own; ChatML for "
            "a base model without one)."
        },
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank of the trained models (0: full fine-tuning)."}
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target: str = field(
        default="all-linear", metadata={"help": "Modules LoRA adapts (comma-separated names or all-linear)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: hold the frozen base weights in 4 bits (needs --lora-r, CUDA, bitsandbytes)."
        },
    )
    num_threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0: torch's default."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "Trackers of the metrics, comma-separated: tensorboard, wandb, mlflow, or none "
            "(RUN/metrics.jsonl is always written)."
        },
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "micro_batch_size", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for tracker in self.report_to.split(","):
            if tracker.strip() not in TRACKERS:
                raise ValueError(f"report_to: unknown tracker {tracker!r}: choose from {', '.join(TRACKERS)}")
        if self.out is not None:
            self.out = Path(self.out)
        if self.data is not None:
            self.data = Path(self.data)
        if self.chat_template is not None:
            self.chat_template = Path(self.chat_template)
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("--load-in-4bit (QLoRA) trains LoRA adapters: give --lora-r too")

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-ready values (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations (`dialoop train sft`)."""

    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    epochs: float = field(
        default=2.0, metadata={"help": "Passes over the data (ignored when --max-steps > 0)."}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest sequence in tokens (longer ones are cut)."}
    )
    packing: bool = field(default=False, metadata={"help": "Pack several conversations into each row."})


@dataclass
class RewardConfig(TrainConfig):
    """The K-way reward model on rankings (`dialoop train rm`)."""

    sft: Path | None = field(
        default=None,
        metadata={
            "help": "Causal LM to initialise the RM from (default: --model, then the embedded default)."
        },
    )
    lr: float = field(default=3e-5, metadata={"help": "Peak learning rate (AdamW)."})
    batch_size: int = field(default=16, metadata={"help": "Global batch: rankings per optimizer step."})
    # small micro-batches of similar lengths waste little on padding (long HH-RLHF dialogues vary a lot)
    micro_batch_size: int = field(default=2, metadata={"help": "Rankings per forward pass in one process."})
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the rankings (ignored when --max-steps > 0)."}
    )
    max_length: int = field(
        default=256, metadata={"help": "Longest prompt + reply in tokens (the prompt is cut on the left)."}
    )
    # the frozen bottom needs no backward pass: about half the time of full fine-tuning on a CPU
    trainable_layers: int = field(
        default=8, metadata={"help": "Train only the top N transformer blocks (+ norm, head); 0: all."}
    )
    frozen_trunk_cache: bool = field(
        default=True,
        metadata={
            "help": "With --trainable-layers, keep what leaves the frozen bottom blocks for every ranking "
            "from the first epoch and start later epochs above them: the same model for less compute, at "
            "rankings x tokens x hidden size floats of memory."
        },
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of rankings held out to measure accuracy."}
    )
    all_bad_orders: bool = field(
        default=False,
        metadata={
            "help": "Learn the order of rankings marked all bad too (when trainers order bad replies as "
            "well, as the simulated ones do); off: they are left out."
        },
    )
    reference_data: Path | None = field(
        default=None,
        metadata={
            "help": "Demonstrations whose replies define reward 0 (default: each ranking's best reply)."
        },
    )
    reference_format: str = field(default="messages", metadata={"help": "Format of --reference-data."})
    bias_examples: int = field(
        default=256, metadata={"help": "Reference replies scored to centre the reward; 0: all."}
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "Score a ranking's candidates behind one copy of its prompt (faster)."},
    )
    eval_batch_size: int = field(
        default=8,
        metadata={"help": "Rankings (or references) per forward pass when scoring without gradients."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sft is not None:
            if self.model is not None and str(self.model) != str(self.sft):
                raise ValueError("give --sft or --model, not both")
            self.model = str(self.sft)
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")

"""The PPO stage's config (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dialoop.train.config import TrainConfig


@dataclass
class PPOConfig(TrainConfig):
    """PPO (`dialoop train ppo`): `--model` is the initial policy (and, unless `--reference-model`, the KL
    reference), `--reward-model` the RM."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "The initial policy (the SFT model, or an earlier PPO policy to continue) and, unless "
            "--reference-model, the frozen reference (default: the embedded default)."
        },
    )
    data: Path | None = field(
        default=None,
        metadata={
            "help": "Use the user turns of this file (any `dialoop import` format) instead of the store."
        },
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the prompts (ignored when --max-steps > 0)."}
    )
    max_steps: int = field(
        default=0, metadata={"help": "PPO steps (batches of rollouts) to run; 0: derived from --epochs."}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward model dir (written by `dialoop train rm`); required."}
    )
    value_model: str | None = field(
        default=None, metadata={"help": "Initial value model (default: the reward model)."}
    )
    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "Frozen reference of the KL penalty (default: --model). When --model continues an "
            "earlier PPO policy, the SFT model keeps every iteration close to what trainers demonstrated."
        },
    )
    prompts: Path | None = field(
        default=None, metadata={"help": "Plain-text prompts, one user turn per line (instead of --data)."}
    )
    lr: float = field(default=3e-6, metadata={"help": "Peak learning rate of policy and value (AdamW)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts (episodes) per PPO step, all processes."})
    mini_batch_size: int = field(
        default=16, metadata={"help": "Episodes per optimizer update (batch / mini-batch updates per epoch)."}
    )
    micro_batch_size: int = field(
        default=16,
        metadata={
            "help": "Sequences per forward pass in one process. When it covers the process's share of the "
            "batch and the batch is one mini-batch, the first policy pass also gives the old log-probs."
        },
    )
    frozen_trunk_cache: bool = field(
        default=True,
        metadata={
            "help": "With --trainable-layers, run the frozen bottom blocks once per batch of a step and "
            "reuse their output in every epoch, and between policy and reference, value and reward model "
            "(the same weights): the same numbers for less compute; one hidden-state tensor per batch."
        },
    )
    fused_value_pass: bool = field(
        default=False,
        metadata={
            "help": "Like the policy's, take the old values from the value model's first training pass: one "
            "pass fewer per step, but both models' activations are alive at once (~2x activation memory)."
        },
    )
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each batch of rollouts."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest reply sampled, in tokens."})
    max_length: int = field(
        default=640, metadata={"help": "Longest prompt + reply in tokens (longer prompts are left out)."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature (log-probs use the same temperature)."}
    )
    beta: float = field(default=0.02, metadata={"help": "KL coefficient (initial value when adaptive)."})
    kl_target: float | None = field(
        default=None, metadata={"help": "Per-reply KL target of the adaptive controller; unset: fixed beta."}
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Horizon (episodes) of the adaptive KL controller."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    clip_range: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    value_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages per batch."})
    no_eos_score: float | None = field(
        default=-1.0,
        metadata={"help": "Highest score of a reply cut without EOS (a cap on the RM's); unset: no cap."},
    )
    ptx_coef: float = field(
        default=0.0, metadata={"help": "PPO-ptx: weight of the SFT loss on demonstrations; 0: off."}
    )
    ptx_data: Path | None = field(
        default=None, metadata={"help": "Demonstrations for PPO-ptx (default: the store's)."}
    )
    ptx_format: str = field(default="messages", metadata={"help": "Format of --ptx-data."})
    ptx_batch_size: int = field(
        default=4, metadata={"help": "Demonstrations per optimizer update for PPO-ptx, all processes."}
    )
    ema_decay: float = field(
        default=0.0, metadata={"help": "Keep an EMA of the policy weights and write it at the end; 0: off."}
    )
    checkpoint_every: int = field(
        default=20, metadata={"help": "Write a checkpoint every N PPO steps; 0: never."}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the updates with a linear warm-up."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts is not None:
            if self.data is not None:
                raise ValueError("give --prompts or --data, not both")
            self.prompts = Path(self.prompts)
        if self.ptx_data is not None:
            self.ptx_data = Path(self.ptx_data)
        for name in ("mini_batch_size", "ppo_epochs", "max_new_tokens", "ptx_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO (it samples), got {self.temperature}")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in {self.max_length}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.kl_target}")
        if self.chat_template is not None:
            raise ValueError(
                "--chat-template is for train sft and rm: PPO uses the template saved with --model (the SFT "
                "model), which its reward model shares"
            )
        if self.load_in_4bit:
            raise ValueError("--load-in-4bit (QLoRA) is not supported by PPO yet: use --lora-r alone")

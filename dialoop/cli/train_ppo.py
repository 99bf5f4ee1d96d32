"""`dialoop train ppo`: one option per field of `PPOConfig` (see `dialoop.train.ppo`)."""

from __future__ import annotations

from pathlib import Path

from dialoop.cli.train import config_command, run_stage, train_app
from dialoop.train.ppo_config import PPOConfig


@config_command(
    train_app,
    "ppo",
    PPOConfig,
    "PPO against a reward model, KL-tied to the SFT model (prompts: store, --data, or --prompts).",
)
def ppo(config: PPOConfig) -> Path:
    def stage() -> Path:
        from dialoop.cli.data_sources import load_demonstrations, load_prompts
        from dialoop.train.ppo import train_ppo

        return train_ppo(config, load_prompts(config), demonstrations=load_demonstrations(config))

    return run_stage(stage)

"""The report card: gold score, win rate, EOS rate, length and KL per model; RM accuracy; plots."""

from dialoop.evaluate.card import (
    EvalConfig,
    ModelSamples,
    ModelSpec,
    eval_prompts,
    evaluate_models,
    ppo_curves,
    reward_model_accuracy,
    sample_models,
    targets,
)
from dialoop.evaluate.metrics import mean, pair_accuracy, sequence_kl, stderr, win_rate
from dialoop.evaluate.progress import stage_progress
from dialoop.evaluate.report import render_html, write_report

__all__ = [
    "EvalConfig",
    "ModelSamples",
    "ModelSpec",
    "eval_prompts",
    "evaluate_models",
    "mean",
    "pair_accuracy",
    "ppo_curves",
    "render_html",
    "reward_model_accuracy",
    "sample_models",
    "sequence_kl",
    "stage_progress",
    "stderr",
    "targets",
    "win_rate",
    "write_report",
]

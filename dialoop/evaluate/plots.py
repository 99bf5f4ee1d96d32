"""The report card's plots (matplotlib, Agg backend, PNG): PPO curves, gold score per model, reply lengths."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt


def plot_ppo_curves(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """RM score and KL to the reference per PPO step, iterations one after the other."""
    fig, (ax_score, ax_kl) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    offset = 0
    for run in runs:
        steps = [offset + s for s in run["step"]]
        label = f"iteration {run['iteration']}"
        ax_score.plot(steps, run["score"], marker=".", label=label)
        ax_kl.plot(steps, run["kl"], marker=".", label=label)
        if offset:
            for ax in (ax_score, ax_kl):
                ax.axvline(offset + 0.5, color="grey", linewidth=0.8, linestyle=":")
        offset = steps[-1] if steps else offset
    ax_score.set_ylabel("RM score (after EOS penalty)")
    ax_kl.set_ylabel("KL to reference (per reply)")
    ax_kl.set_xlabel("PPO step")
    ax_score.set_title("PPO: reward and KL per step")
    for ax in (ax_score, ax_kl):
        ax.grid(alpha=0.3)
    if runs:
        ax_score.legend(fontsize=8)
    return _save(fig, path)


def plot_gold(models: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean gold score (± standard error) of each model, in the loop's order."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [m["name"] for m in models]
    means = [m["gold_mean"] for m in models]
    errs = [0.0 if math.isnan(m["gold_stderr"]) else m["gold_stderr"] for m in models]
    ax.errorbar(range(len(names)), means, yerr=errs, marker="o", capsize=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean gold score (held-out prompts)")
    ax.set_title("Gold score per iteration")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lengths(lengths: Mapping[str, Sequence[int]], path: Path) -> Path:
    """Distribution of reply lengths (tokens) per model."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(lengths)
    ax.boxplot([list(lengths[n]) or [0] for n in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("reply length (tokens)")
    ax.set_title("Reply length")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""`dialoop bench ppo`: the TRL harness's prompts, and one JSON line with the figures, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dialoop.bench.ppo import harness_prompts
from dialoop.cli import app
from dialoop.modeling.chat import encode_prompt
from dialoop.modeling.loading import load_tokenizer
from dialoop.modeling.tiny import ASSETS


def test_the_harness_prompts_are_the_trl_workload() -> None:
    prompts = harness_prompts()
    assert len(prompts) == len(set(prompts)) == 64
    assert prompts[:3] == [
        "Write one short sentence about the ocean.",
        "Give me three words that describe a cat.",
        "Explain autumn to a child in one sentence.",
    ]
    assert prompts[8] == "Give me three words that describe the ocean."
    tokenizer = load_tokenizer(ASSETS)
    lengths = [len(encode_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts]
    assert round(sum(lengths) / len(lengths), 1) == 38.4  # the harness's mean prompt length


@pytest.mark.e2e
def test_bench_ppo_prints_one_json_line(tiny_model_dir: Path) -> None:
    args = ["bench", "ppo", "--json", "--model", str(tiny_model_dir), "--warmup", "1", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--new-tokens", "4", "--threads", "1", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["episodes_per_step"] == 8 and figures["new_tokens"] == 4
    assert figures["timed_steps"] == 2 and len(figures["sec_per_step_all"]) == 3
    assert figures["sec_per_step_median"] > 0 and figures["peak_rss_gb"] > 0
    for key in (
        "sec_generation_per_step",
        "sec_scoring_per_step",
        "sec_learning_per_step",
        "cores_used_per_step",
    ):
        assert len(figures[key]) == 3
    assert figures["device"] == "cpu" and figures["precision"] == "fp32"
    assert figures["prompt_tokens_mean"] == 38.4


def test_bench_ppo_rejects_a_missing_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        return
    result = CliRunner().invoke(app, ["bench", "ppo", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output

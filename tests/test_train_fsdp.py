"""Training under `accelerate launch --use_fsdp --fsdp_version 2` with 2 CPU processes (gloo): the weights are
really sharded, SFT's and the RM's loss curves and PPO's statistics are the 1-process ones, the saved model is
a standard HF dir with the full weights, and a run resumes from its sharded checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_distributed import _losses, _write_data
from typer.testing import CliRunner

from dialoop.cli import app

pytestmark = pytest.mark.distributed


@pytest.fixture
def launch_fsdp(accelerate_launch):
    """`accelerate launch --use_fsdp` on 2 CPU processes, one FSDP unit per transformer block, as on GPUs."""

    def launch(args: list[str], *, version: int = 2) -> subprocess.CompletedProcess[str]:
        fsdp = ("--use_fsdp", "--fsdp_version", str(version))
        return accelerate_launch(args, strategy=(*fsdp, "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"))

    return launch


def _check(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # accelerate alone would quietly run DDP on CPUs
    assert "accelerator: 2 process(es) (FSDP)" in done.stderr


def _crashed_after(straight: Path, step: Path, crashed: Path) -> Path:
    """The run as it was after checkpoint `step`: a crash before the end left that one only."""
    crashed.mkdir()
    shutil.copytree(step, crashed / "checkpoints" / step.name)
    shutil.copy(straight / "train_config.json", crashed)
    rows = (straight / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(rows[: int(step.name.split("-")[1])]) + "\n")
    return crashed


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)  # the same tensors: no tied copy written twice
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_fsdp_follows_the_one_process_loss_curve(
    stage: str, tiny_model_dir: Path, tmp_path: Path, launch_fsdp
) -> None:
    demos, rankings = _write_data(tmp_path)
    if stage == "sft":
        data = ["--data", str(demos), "--format", "messages"]
    else:  # held-out scoring and the reward bias run through the sharded model too; the bottom block frozen
        data = ["--data", str(rankings), "--format", "rankings", "--heldout-fraction", "0.25"]
        data += ["--trainable-layers", "1"]
    common = [stage, *data, "--model", str(tiny_model_dir), "--max-steps", "5", "--batch-size", "8"]
    common += ["--micro-batch-size", "2", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]

    result = CliRunner().invoke(app, ["train", *common, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    _check(launch_fsdp([*common, "--out", str(tmp_path / "two")]))

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert one[-1] < one[0]  # it learns
    assert two == pytest.approx(one, rel=1e-4)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-4
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "two" / name).exists()
    config, config_one = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("two", "one"))
    assert config["architectures"] == config_one["architectures"]
    if stage == "rm":
        s1, s2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
        assert s2["heldout_accuracy"] == s1["heldout_accuracy"]
        assert s2["reward_bias"] == pytest.approx(s1["reward_bias"], abs=1e-4)
        assert config["dialoop_reward_bias"] == pytest.approx(s2["reward_bias"])


def test_fsdp_resumes_from_a_sharded_checkpoint(tiny_model_dir: Path, tmp_path: Path, launch_fsdp) -> None:
    demos, _ = _write_data(tmp_path)
    args = ["sft", "--data", str(demos), "--format", "messages", "--model", str(tiny_model_dir)]
    args += ["--max-steps", "6", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3"]
    args += ["--precision", "fp32", "--no-progress", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
    args += ["--keep-final-checkpoint"]
    straight = tmp_path / "straight"
    _check(launch_fsdp([*args, "--out", str(straight)]))
    step3 = straight / "checkpoints" / "step-000003"
    assert (step3 / "pytorch_model_fsdp_0").is_dir()  # one shard per process, not a gathered copy
    assert len(list((step3 / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2

    crashed = _crashed_after(straight, step3, tmp_path / "crashed")
    resumed = launch_fsdp([*args, "--out", str(crashed), "--resume"])
    _check(resumed)
    assert "resumed from" in resumed.stderr

    assert _max_diff(_weights(crashed), _weights(straight)) <= 1e-6
    assert _losses(crashed) == _losses(straight)


def test_fsdp1_on_cpus_is_refused_with_a_clear_message(
    tiny_model_dir: Path, tmp_path: Path, launch_fsdp
) -> None:
    demos, _ = _write_data(tmp_path)
    args = ["sft", "--data", str(demos), "--format", "messages", "--model", str(tiny_model_dir)]
    args += ["--max-steps", "1", "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "run")]
    done = launch_fsdp(args, version=1)
    assert done.returncode != 0
    assert "FSDP on CPUs needs FSDP2: pass --fsdp_version 2" in done.stdout + done.stderr


def _ppo_args(tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me something about the number {i}.\n" for i in range(12)))
    return [
        "ppo",
        "--model",
        str(tiny_model_dir),
        "--reward-model",
        str(tiny_rm_dir),
        "--prompts",
        str(prompts),
    ]


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_ppo_under_fsdp_follows_the_one_process_run(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, launch_fsdp
) -> None:
    common = _ppo_args(tiny_model_dir, tiny_rm_dir, tmp_path)
    common += ["--max-steps", "1", "--batch-size", "8", "--mini-batch-size", "8", "--micro-batch-size", "8"]
    common += ["--max-new-tokens", "6", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]
    common += ["--checkpoint-every", "0"]

    result = CliRunner().invoke(app, ["train", *common, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    _check(launch_fsdp([*common, "--out", str(tmp_path / "two")]))

    # one step: after it, a weight difference of 1e-7 can flip a sampled token (seen on an AVX2-only CPU at
    # step 2) and the runs part ways
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 1
    for a, b in zip(one, two, strict=True):
        for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "reply_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (key, a, b)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tiny_model_dir)) > 1e-4  # the policy moved
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-4


def test_ppo_under_fsdp_resumes_from_a_sharded_checkpoint(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, launch_fsdp
) -> None:
    args = _ppo_args(tiny_model_dir, tiny_rm_dir, tmp_path)
    args += ["--max-steps", "4", "--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2"]
    # the adaptive KL coefficient and the EMA (sharded like the policy, saved whole) are state too
    args += ["--ppo-epochs", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--kl-target", "0.5"]
    args += ["--ema-decay", "0.5", "--precision", "fp32", "--no-progress", "--seed", "3"]
    args += ["--checkpoint-every", "2", "--keep-checkpoints", "2", "--keep-final-checkpoint"]
    straight = tmp_path / "straight"
    _check(launch_fsdp([*args, "--out", str(straight)]))
    step2 = straight / "checkpoints" / "step-000002"
    assert len(list((step2 / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2

    crashed = _crashed_after(straight, step2, tmp_path / "crashed")
    resumed = launch_fsdp([*args, "--out", str(crashed), "--resume"])
    _check(resumed)
    assert "resumed from" in resumed.stderr

    # not bit-exact as under DDP: a resumed FSDP run lands ~1e-8 off (kernel rounding), far below a step
    assert _max_diff(_weights(crashed), _weights(straight)) < 1e-6
    a, b = _train_rows(crashed), _train_rows(straight)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("score", "kl", "beta", "policy_loss", "value_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (key, x, y)
    assert b[-1]["beta"] != b[0]["beta"]  # the controller did adapt

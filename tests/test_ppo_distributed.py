"""PPO under `accelerate launch` with 2 CPU processes (gloo) follows the 1-process run, and a PPO run killed
with SIGKILL resumes (`--resume`) to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from dialoop.cli import app

VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.distributed


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"Tell me something about the number {i}.\n" for i in range(12)))
    return path


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_two_processes_follow_the_one_process_run(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, accelerate_launch
) -> None:
    common = ["ppo", "--model", str(tiny_model_dir), "--reward-model", str(tiny_rm_dir)]
    common += ["--prompts", str(_prompts(tmp_path)), "--max-steps", "1", "--batch-size", "8"]
    common += ["--mini-batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "6"]
    common += ["--lr", "1e-3", "--precision", "fp32", "--no-progress", "--checkpoint-every", "0"]

    result = CliRunner().invoke(app, ["train", *common, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    done = accelerate_launch([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # one step: after it, a weight difference of 1e-7 can flip a sampled token (seen on an AVX2-only CPU at
    # step 2) and the runs part ways
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 1
    for a, b in zip(one, two, strict=True):
        for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "reply_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (key, a, b)
    assert _max_weight_diff(tmp_path / "one", tiny_model_dir) > 1e-4  # the policy moved
    assert _max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-4


def test_a_ppo_run_killed_mid_way_resumes_to_the_same_weights(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, accelerate_launch
) -> None:
    env = accelerate_launch.env  # one process, as each of the launched ones
    args = [str(VENV_BIN / "python"), "-m", "dialoop.cli", "train", "ppo", "--model", str(tiny_model_dir)]
    args += ["--reward-model", str(tiny_rm_dir), "--prompts", str(_prompts(tmp_path)), "--max-steps", "10"]
    args += ["--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2", "--ppo-epochs", "2"]
    # the adaptive KL coefficient, the EMA and the bf16 sampling copy (where bf16 is fast) are state too
    args += ["--max-new-tokens", "6", "--lr", "1e-3", "--kl-target", "0.5", "--ema-decay", "0.5"]
    args += ["--checkpoint-every", "2", "--no-progress", "--seed", "3"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()  # it died mid-way, without its final model

    resumed = subprocess.run(
        [*args, "--out", str(killed), "--resume"], env=env, capture_output=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(
        [*args, "--out", str(tmp_path / "straight")], env=env, capture_output=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    assert _max_weight_diff(killed, tmp_path / "straight") <= 1e-5
    rows, straight_rows = _train_rows(killed), _train_rows(tmp_path / "straight")
    assert [r["step"] for r in rows] == list(range(1, 11))  # each step once, the killed run's extra dropped
    for a, b in zip(rows, straight_rows, strict=True):
        assert (a["score"], a["kl"], a["beta"]) == (b["score"], b["kl"], b["beta"])
    assert rows[-1]["beta"] != rows[0]["beta"]  # the controller did adapt
    assert not (killed / "checkpoints").exists()

"""Training under `accelerate launch` with 2 CPU processes (gloo) follows the 1-process loss curve, and a run
killed with SIGKILL resumes to exactly the weights of an uninterrupted run."""

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


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _write_data(tmp_path: Path) -> tuple[Path, Path]:
    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 3)},
                    ]
                }
            )
            + "\n"
            for i in range(16)
        )
    )
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"Say something {i}."}],
                    "completions": [
                        [{"role": "assistant", "content": f"Reply {j} to {i}" + "!" * j}] for j in range(3)
                    ],
                    "ranking": [i % 3, (i + 1) % 3, (i + 2) % 3],
                    "ties": [] if i % 2 else [[(i + 1) % 3, (i + 2) % 3]],
                }
            )
            + "\n"
            for i in range(16)
        )
    )
    return demos, rankings


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_processes_follow_the_one_process_loss_curve(
    stage: str, tiny_model_dir: Path, tmp_path: Path, accelerate_launch
) -> None:
    demos, rankings = _write_data(tmp_path)
    data = ["--data", str(demos), "--format", "messages"] if stage == "sft" else ["--data", str(rankings)]
    data += ["--format", "rankings", "--heldout-fraction", "0"] if stage == "rm" else []
    common = [stage, *data, "--model", str(tiny_model_dir), "--max-steps", "5", "--batch-size", "8"]
    common += ["--micro-batch-size", "2", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]

    result = CliRunner().invoke(app, ["train", *common, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    done = accelerate_launch([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert one[-1] < one[0]  # it learns
    assert two == pytest.approx(one, rel=1e-4)
    w1, w2 = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


def test_a_run_killed_mid_way_resumes_to_the_same_weights(
    tiny_model_dir: Path, tmp_path: Path, accelerate_launch
) -> None:
    demos, _ = _write_data(tmp_path)
    command = [str(VENV_BIN / "python"), "-m", "dialoop.cli", "train"]
    args = [
        "sft",
        "--data",
        str(demos),
        "--format",
        "messages",
        "--model",
        str(tiny_model_dir),
        "--seed",
        "7",
    ]
    args += ["--max-steps", "24", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3"]
    args += ["--checkpoint-every", "5", "--precision", "fp32", "--no-progress"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, *args, "--out", str(killed)], env=accelerate_launch.env, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000010").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()  # it died mid-way, without its final model

    resumed = subprocess.run(
        [*command, *args, "--out", str(killed), "--resume"], env=accelerate_launch.env, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output

    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # each step logged once, the killed run's extra steps dropped
    assert _losses(killed) == _losses(tmp_path / "straight")
    assert not (killed / "checkpoints").exists()  # removed once the model is written

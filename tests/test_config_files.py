"""`--config FILE.yaml` of `dialoop train sft|rm|ppo`, `iterate` and `demo`: flags override the file, bad keys
name the file and line, and a run's saved `train_config.yaml` repeats it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from dialoop.cli import app
from dialoop.cli.config_file import ConfigFileError, read_config_file
from dialoop.cli.iterate import DemoOptions, IterateOptions
from dialoop.train.config import RewardConfig, SFTConfig
from dialoop.train.ppo_config import PPOConfig

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Amber."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Teal, a blue green."},
]


def dialoop(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]


def test_a_file_gives_options_with_either_spelling_and_their_types(tmp_path: Path) -> None:
    path = tmp_path / "rm.yaml"
    path.write_text("batch-size: 8\nlr: 1\nsft: models/sft\nall_bad_orders: true\nformat: null\n")
    values = read_config_file(path, RewardConfig)
    assert values == {
        "batch_size": 8,
        "lr": 1.0,
        "sft": Path("models/sft"),
        "all_bad_orders": True,
        "format": None,
    }
    assert isinstance(values["lr"], float)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert read_config_file(tmp_path / "empty.yaml", PPOConfig) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 1e-5\nbatch_sise: 4\n", ":2: unknown key 'batch_sise'"),
        ("lr: 1e-5\nbatch_size: four\n", ":2: batch_size must be int, not 'four'"),
        ("lr: [1\n", ":2: invalid YAML"),
        ("- lr\n", ":1: expected a mapping of option: value"),
        ("lr: 1\nlr: 2\n", ":2: 'lr' is given twice"),
        ("packing: 1\n", ":1: packing must be bool, not 1"),
    ],
)
def test_a_bad_file_is_refused_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as caught:
        read_config_file(path, SFTConfig)
    assert str(caught.value).startswith(str(path) + message)
    result = dialoop("train", "sft", "--config", path)
    assert result.exit_code == 2 and f"{path}{message}" in " ".join(result.output.split())


def test_iterate_and_demo_files_are_read_against_their_own_options(tmp_path: Path) -> None:
    path = tmp_path / "knobs.yaml"
    path.write_text("rm_steps: 3\nprecision: fp32\ndeploy: false\n")
    assert read_config_file(path, IterateOptions) == {"rm_steps": 3, "precision": "fp32", "deploy": False}
    path.write_text("quick: true\nrounds: 1\n")
    assert read_config_file(path, DemoOptions) == {"quick": True, "rounds": 1}
    with pytest.raises(ConfigFileError, match=r"knobs.yaml:1: unknown key 'quick'"):
        read_config_file(path, IterateOptions)


@pytest.mark.slow
def test_flags_override_the_file_and_the_saved_config_repeats_the_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT[: 2 * i]}) + "\n" for i in (1, 2)))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata: {data}\nformat: messages\nlr: 0.003\nbatch_size: 2\n"
        "micro_batch_size: 1\nmax_steps: 2\nprecision: fp32\nprogress: false\ncheckpoint_every: 0\n"
        "seed: 7\n"
    )
    first = tmp_path / "first"
    result = dialoop("train", "sft", "--config", config, "--max-steps", "3", "--out", first)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((first / "train_config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["lr"] == 0.003 and saved["seed"] == 7  # the flag won
    assert saved["data"] == str(data.resolve()) and "out" not in saved and "resume" not in saved
    assert len(losses(first)) == 3

    again = tmp_path / "again"
    result = dialoop("train", "sft", "--config", first / "train_config.yaml", "--out", again)
    assert result.exit_code == 0, result.output
    assert losses(again) == losses(first)
    assert (again / "train_config.yaml").read_text() == (first / "train_config.yaml").read_text()


@pytest.mark.parametrize("command", [["iterate"], ["demo"], ["train", "ppo"], ["train", "rm"]])
def test_every_command_refuses_a_bad_file_before_doing_anything(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nno_such_option: 2\n")
    result = dialoop(*command, "--config", path)
    assert result.exit_code == 2
    assert f"{path}:2: unknown key 'no_such_option'" in " ".join(result.output.split())

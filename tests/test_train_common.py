"""Shared training machinery: data order, NaN guard, atomic checkpoints, metrics, config -> CLI options."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.run_metrics import read_metrics
from dialoop.train.checkpoint import CheckpointManager
from dialoop.train.common import (
    TrainState,
    global_batch_indices,
    prepare_run_dir,
    resolve_precision,
    total_steps,
)
from dialoop.train.config import RewardConfig, SFTConfig, TrainConfig
from dialoop.train.fit import LossFn, cosine_with_warmup, fit
from dialoop.train.metrics import MetricsLogger
from dialoop.train.strategy import NonFiniteLossError, make_strategy


def test_data_order_visits_every_example_once_per_epoch_and_depends_only_on_seed_and_step() -> None:
    n, batch = 10, 4
    stream = [i for step in range(5) for i in global_batch_indices(n, batch, seed=3, step=step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh permutation per epoch
    assert global_batch_indices(n, batch, seed=3, step=2) == stream[8:12]
    assert global_batch_indices(n, batch, seed=4, step=0) != stream[:4]


def test_total_steps_follow_epochs_unless_max_steps_is_set(tmp_path: Path) -> None:
    assert total_steps(TrainConfig(batch_size=4, epochs=2.0), 10) == 5
    assert total_steps(TrainConfig(batch_size=4, max_steps=7), 10) == 7


def test_lr_schedule_warms_up_linearly_then_decays_as_a_cosine_without_a_zero_step() -> None:
    factors = [cosine_with_warmup(s, warmup=4, total=20) for s in range(20)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in itertools.pairwise(factors[4:])) and factors[-1] > 0
    assert factors[12] == pytest.approx(0.5)  # half-way through the decay


def test_config_validation_names_the_bad_knob() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="tensorboard,slack")
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)


def test_precision_auto_resolves_to_a_concrete_choice() -> None:
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)


def _nan_at(steps: set[int], calls: list[int]) -> LossFn[int]:
    def loss_fn(model: torch.nn.Module, batch: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        calls.append(1)
        x = torch.tensor([[float(b), 1.0, -1.0] for b in batch])
        loss = (model.layer(x) ** 2).sum()
        if len(calls) in steps:
            loss = loss * float("nan")
        return loss, {}

    return loss_fn


def test_a_nonfinite_loss_skips_the_update_and_is_counted(tmp_path: Path) -> None:
    config = TrainConfig(out=tmp_path / "run", lr=0.1, batch_size=1, micro_batch_size=1, max_steps=4)
    config.progress, config.checkpoint_every, config.precision = False, 0, "fp32"
    strategy = make_strategy(config)
    accelerator = strategy.accelerator
    run_dir = prepare_run_dir(config, "test", accelerator)
    weights: list[torch.Tensor] = []

    model = _Linear()
    loss_fn = _nan_at({2, 3}, [])

    def recording_loss(
        model: torch.nn.Module, batch: list[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights.append(accelerator.unwrap_model(model).layer.weight.detach().clone())
        return loss_fn(model, batch)

    _, state = fit(
        config,
        strategy,
        model,
        [1, 2, 3],
        loss_fn=recording_loss,
        weight_fn=lambda _: 1.0,
        run_dir=run_dir,
        description="t",
    )
    assert state.step == 4 and state.skipped_steps == 2 and state.nonfinite_streak == 0
    assert not torch.equal(weights[0], weights[1])  # step 1 updated
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])  # steps 2, 3 skipped
    rows = read_metrics(run_dir, "train")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert all(
        math.isfinite(float(p)) for p in accelerator.unwrap_model(model).layer.weight.detach().flatten()
    )


def test_five_nonfinite_losses_in_a_row_stop_the_run(tmp_path: Path) -> None:
    config = TrainConfig(out=tmp_path / "run", batch_size=1, micro_batch_size=1, max_steps=20)
    config.progress, config.checkpoint_every, config.precision = False, 0, "fp32"
    strategy = make_strategy(config)
    accelerator = strategy.accelerator
    run_dir = prepare_run_dir(config, "test", accelerator)
    calls: list[int] = []
    with pytest.raises(NonFiniteLossError, match="5 steps in a row"):
        fit(
            config,
            strategy,
            _Linear(),
            [1, 2],
            loss_fn=_nan_at(set(range(3, 100)), calls),
            weight_fn=lambda _: 1.0,
            run_dir=run_dir,
            description="t",
        )
    assert len(calls) == 7  # 2 good steps, then 5 bad ones


def test_checkpoints_are_atomic_and_a_partial_one_is_ignored(tmp_path: Path) -> None:
    config = TrainConfig(out=tmp_path / "run", precision="fp32")
    accelerator = make_strategy(config).accelerator
    model = accelerator.prepare(_Linear())
    manager = CheckpointManager(tmp_path / "run", accelerator, keep=2)
    for step in (2, 4, 6):
        manager.save(TrainState(step=step, skipped_steps=1))
    assert [p.name for p in manager.checkpoints()] == ["step-000004", "step-000006"]
    # a crash mid-write leaves a temp dir: never loaded, deleted by the next run
    partial = tmp_path / "run" / "checkpoints" / ".tmp-step-000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    with torch.no_grad():
        model.layer.weight.fill_(7.0)
    manager = CheckpointManager(tmp_path / "run", accelerator, keep=2)
    assert not partial.exists()
    state = manager.load_latest()
    assert state is not None and state.step == 6 and state.skipped_steps == 1
    assert not torch.equal(model.layer.weight, torch.full_like(model.layer.weight, 7.0))


def test_metrics_logger_drops_records_after_the_resumed_step(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, total_steps=5, progress=False) as log:
        for step in range(1, 5):
            log.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, total_steps=5, start_step=2, progress=False) as log:
        log.log(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert any((tmp_path / "tensorboard").iterdir())


def test_run_dir_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    config = TrainConfig(out=out, precision="fp32")
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run_dir(config, "sft", make_strategy(config).accelerator)
    config.resume = True
    assert prepare_run_dir(config, "sft", make_strategy(config).accelerator) == out
    assert json.loads((out / "train_config.json").read_text())["stage"] == "sft"


def test_every_config_field_is_a_cli_option() -> None:
    import typer

    train_group = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    for command, config_cls in (("sft", SFTConfig), ("rm", RewardConfig)):
        params = train_group.commands[command].params
        options = {opt for p in params for opt in p.opts}
        for name in config_cls.__dataclass_fields__:
            assert f"--{name.replace('_', '-')}" in options, (command, name)


def test_a_bad_cli_value_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "sft", "--out", str(tmp_path / "o"), "--precision", "fp8"], terminal_width=200
    )
    assert result.exit_code == 2 and "precision" in result.output

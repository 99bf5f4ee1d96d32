"""One iteration of the loop on a tiny model: datasets from the store, exact data records, lineage, resume."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.collect import PolicyHandle, create_comparison_tasks
from dialoop.demo import demo_config
from dialoop.engine import SamplingParams
from dialoop.evaluate.card import EvalConfig
from dialoop.formats import chat_examples_from_store, ranking_examples_from_store, snapshot_hash
from dialoop.formats.store_io import edit_records
from dialoop.iteration import IterationKnobs, IterationProgress
from dialoop.loop import IterationConfig, NothingToTrain, run_iteration
from dialoop.modeling import load_model_and_tokenizer
from dialoop.sim.prompts import generate_prompts
from dialoop.sim.trainers import SimTrainerConfig, create_trainers, rank_all
from dialoop.store.db import make_engine, session_scope
from dialoop.store.models import Conversation, ModelVersion, Ranking, TrainingRun
from dialoop.store.registry import ensure_base_version, served_model
from dialoop.train.config import SFTConfig

FAST = SimTrainerConfig(
    suggestions=2,
    suggestion_params=SamplingParams(max_tokens=8, temperature=1.0),
    chat_params=SamplingParams(max_tokens=8, temperature=1.0),
)


@pytest.fixture
def store(sqlite_url: str) -> Any:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def _config(tmp_path: Path, base: Path, **overrides: Any) -> IterationConfig:
    quick = demo_config(tmp_path / "unused", quick=True)  # the demo's tiny budgets
    fields: dict[str, Any] = dict(
        base_model=str(base), work_dir=tmp_path / "runs", sft=quick.sft, rm=quick.rm, ppo=quick.ppo
    )
    fields |= dict(evaluate=None, progress=False, seed=3)
    return IterationConfig(**(fields | overrides))


def _collect(
    engine: Engine,
    model_dir: Path,
    *,
    demos: int = 0,
    chats: int = 0,
    seed: int = 0,
    version_id: int | None = None,
) -> None:
    """Simulated trainers write demonstrations, chat, and rank comparison tasks through dialoop.collect."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompts = generate_prompts(demos + chats, seed=seed)
    with session_scope(engine) as s:
        vid = version_id if version_id is not None else ensure_base_version(s, model_dir).id
        handle = PolicyHandle(model, tokenizer, vid)
        trainers = create_trainers(s, 3, seed=seed, config=FAST)
        if demos:
            trainers[0].write_demonstrations(s, handle, prompts[:demos])
        if chats:
            trainers[1].chat(s, handle, prompts[demos:])
            create_comparison_tasks(s, handle, chats, rng=random.Random(seed), overlap=2)
            rank_all(s, trainers)


def _runs(engine: Engine, stage: str) -> list[TrainingRun]:
    with session_scope(engine) as s:
        return list(s.scalars(select(TrainingRun).where(TrainingRun.stage == stage).order_by(TrainingRun.id)))


def _version(engine: Engine, name: str) -> ModelVersion:
    with session_scope(engine) as s:
        version = s.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()
        version.parent  # noqa: B018 - loaded while the session is open
        return version


@pytest.mark.e2e
def test_iterations_train_what_is_new_and_record_exactly_which_data(
    store: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _collect(store, tiny_model_dir, demos=6)
    first = run_iteration(store, _config(tmp_path, tiny_model_dir))
    assert first.iteration == 1
    assert [(s.stage, s.status) for s in first.stages.values()] == [
        ("sft", "trained"),
        ("rm", "skipped"),
        ("ppo", "skipped"),
    ]
    (sft_run,) = _runs(store, "sft")
    with session_scope(store) as s:
        demo_ids = sorted(s.scalars(select(Conversation.id).where(Conversation.kind == "demonstration")))
        demos = chat_examples_from_store(s, status=("submitted", "accepted"))
        assert served_model(s).name == "sft-1"  # type: ignore[union-attr]
    assert sft_run.status == "done" and sft_run.iteration == 1
    assert sft_run.data["conversation_ids"] == sorted(demo_ids) and sft_run.data["examples"] == len(demos)
    assert sft_run.data["snapshot_hash"] == snapshot_hash(demos)
    assert _version(store, "sft-1").parent.name == "base"  # type: ignore[union-attr]
    assert (tmp_path / "runs" / "iter-1" / "sft" / "model.safetensors").exists()

    # chats with the served SFT model, comparison tasks, rankings: the RM and PPO train, SFT is reused
    _collect(store, tmp_path / "runs" / "iter-1" / "sft", chats=4, seed=1, version_id=first.sft_version_id)
    card = EvalConfig(prompts=3, max_new_tokens=6, batch_size=4, progress=False)
    second = run_iteration(store, _config(tmp_path, tiny_model_dir, evaluate=card))
    assert {k: s.status for k, s in second.stages.items()} == {
        "sft": "reused",
        "rm": "trained",
        "ppo": "trained",
        "eval": "trained",
    }
    assert second.sft_version_id == first.sft_version_id
    (rm_run,) = _runs(store, "rm")
    with session_scope(store) as s:
        ranked = list(s.scalars(select(Ranking.id).where(Ranking.skip_reason.is_(None))))
        # the RM learns from the rankings, then from the trainers' edits of the model's suggestions
        examples = ranking_examples_from_store(s) + list(edit_records(s, demo_ids))
    assert rm_run.data["ranking_ids"] == sorted(ranked) and rm_run.data["edit_conversation_ids"] == demo_ids
    assert 0 < rm_run.data["edit_pairs"] == len(examples) - len(ranked)
    assert rm_run.data["snapshot_hash"] == snapshot_hash(examples)
    assert _version(store, "rm-2").parent.name == "sft-1"  # type: ignore[union-attr]
    policy = _version(store, "policy-2")
    assert policy.parent.name == "sft-1" and policy.kind == "policy"  # type: ignore[union-attr]
    (ppo_run,) = _runs(store, "ppo")
    assert ppo_run.data["kind"] == "prompts" and ppo_run.data["examples"] > 0
    assert ppo_run.config["reward_model"] == rm_run.run_dir and ppo_run.config["model"] == sft_run.run_dir
    # the card: the RM is measured on replies of the policy PPO started from, here SFT
    assert second.report is not None and [m["name"] for m in second.report["models"]] == ["sft", "policy-2"]
    assert (second.report["reward_model"]["model"], second.report["reward_model"]["final_model"]) == (
        "sft",
        "policy-2",
    )

    with pytest.raises(NothingToTrain, match="since iteration 2"):
        run_iteration(store, _config(tmp_path, tiny_model_dir))
    assert not (tmp_path / "runs" / "iter-3").exists()

    # new rankings: the RM retrains on all of them, PPO continues from the previous policy
    _collect(store, Path(policy.path), chats=4, seed=2, version_id=second.policy_version_id)
    third = run_iteration(store, _config(tmp_path, tiny_model_dir, evaluate=card))
    assert {k: s.status for k, s in third.stages.items()} == {
        "sft": "reused",
        "rm": "trained",
        "ppo": "trained",
        "eval": "trained",
    }
    rm_runs = _runs(store, "rm")
    assert set(rm_run.data["ranking_ids"]) < set(rm_runs[-1].data["ranking_ids"])
    assert _version(store, "policy-3").parent.name == "policy-2"  # type: ignore[union-attr]
    ppo_runs = _runs(store, "ppo")
    assert ppo_runs[-1].config["model"] == policy.path
    # every PPO run's KL penalty is to the SFT model, also when it continues an earlier policy
    assert [r.config["reference_model"] for r in ppo_runs] == [sft_run.run_dir] * 2
    # the served policy-2, whose replies the new rankings hold, joins the card: the RM is measured on them
    assert third.report is not None
    assert [m["name"] for m in third.report["models"]] == ["sft", "policy-2", "policy-3"]
    assert (third.report["reward_model"]["model"], third.report["reward_model"]["final_model"]) == (
        "policy-2",
        "policy-3",
    )


class Crash(RuntimeError):
    pass


@pytest.mark.e2e
def test_a_failed_iteration_continues_without_redoing_finished_stages(
    store: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _collect(store, tiny_model_dir, demos=4, chats=4)
    events: list[tuple[str, str]] = []

    def crash_at_ppo(stage: str, status: str) -> None:
        events.append((stage, status))
        if (stage, status) == ("ppo", "start"):
            raise Crash("the machine went down")

    with pytest.raises(Crash):
        run_iteration(store, _config(tmp_path, tiny_model_dir, on_stage=crash_at_ppo))
    # the progress file says how far the crashed attempt got, as watchers (the admin page) read it
    crashed = IterationProgress.read(tmp_path / "runs" / "iter-1")
    assert crashed is not None and crashed.status == "running"
    assert {k: s.status for k, s in crashed.stages.items()} == {
        "sft": "trained",
        "rm": "trained",
        "ppo": "running",
    }
    assert crashed.stages["sft"].version_id is not None and crashed.stages["ppo"].started_at is not None
    sft_dir = tmp_path / "runs" / "iter-1" / "sft"
    sft_written = (sft_dir / "model.safetensors").stat().st_mtime_ns

    events.clear()
    result = run_iteration(
        store,
        _config(tmp_path, tiny_model_dir, on_stage=lambda stage, status: events.append((stage, status))),
    )
    assert result.iteration == 1  # the same iteration, continued
    assert {k: s.status for k, s in result.stages.items()} == {
        "sft": "trained",
        "rm": "trained",
        "ppo": "trained",
    }
    assert events == [("ppo", "start"), ("ppo", "done")]  # SFT and RM were not run again
    done = IterationProgress.read(tmp_path / "runs" / "iter-1")
    assert done is not None and done.status == "done"
    assert {k: (s.status, s.version_id) for k, s in done.stages.items()} == {
        k: (s.status, s.version_id) for k, s in result.stages.items()
    }
    assert (sft_dir / "model.safetensors").stat().st_mtime_ns == sft_written
    assert [r.status for r in _runs(store, "sft")] == ["done"]
    assert [r.status for r in _runs(store, "ppo")] == ["done"]
    assert _version(store, "policy-1").parent.name == "sft-1"  # type: ignore[union-attr]


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dialoop.loop import run_iteration
    from dialoop.store.db import make_engine
    sys.path.insert(0, {tests!r})
    from test_loop import _kill_config
    run_iteration(make_engine({url!r}), _kill_config(Path({tmp!r}), Path({base!r})))
    """
)


def test_the_iteration_knobs_set_the_stage_configs() -> None:
    config = IterationConfig.from_knobs(
        IterationKnobs(sft_steps=3, rm_lr=1e-4, ppo_batch_size=2, max_new_tokens=9, eval_prompts=0),
        work_dir=Path("runs"),
    )
    assert (config.sft.max_steps, config.sft.lr) == (3, SFTConfig().lr)  # unset knobs keep the defaults
    assert config.rm.lr == 1e-4 and config.work_dir == Path("runs") and config.evaluate is None
    ppo = config.ppo
    assert (ppo.batch_size, ppo.mini_batch_size, ppo.micro_batch_size, ppo.max_new_tokens) == (2, 2, 2, 9)
    card = IterationConfig.from_knobs(IterationKnobs(eval_prompts=5, max_new_tokens=9, precision="fp32"))
    assert card.evaluate is not None and (card.evaluate.prompts, card.evaluate.max_new_tokens) == (5, 9)
    assert card.sft.precision == card.rm.precision == card.ppo.precision == "fp32"


def _kill_config(tmp_path: Path, base: Path) -> IterationConfig:
    config = _config(tmp_path, base)
    config.sft.max_steps, config.sft.checkpoint_every = 60, 3
    return config


@pytest.mark.e2e
def test_an_iteration_killed_mid_stage_resumes_from_its_checkpoint(
    sqlite_url: str, store: Engine, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _collect(store, tiny_model_dir, demos=6)
    script = KILLED_RUN.format(
        tests=str(Path(__file__).parent), url=sqlite_url, tmp=str(tmp_path), base=str(tiny_model_dir)
    )
    checkpoints = tmp_path / "runs" / "iter-1" / "sft" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("step-*")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "iter-1" / "sft" / "model.safetensors").exists()  # killed mid-run

    with caplog.at_level(logging.INFO, logger="dialoop.train.checkpoint"):
        result = run_iteration(store, _kill_config(tmp_path, tiny_model_dir))
    assert result.stages["sft"].status == "resumed"
    assert "resumed from" in caplog.text
    killed, resumed = _runs(store, "sft")
    assert killed.status == "failed" and "interrupted" in (killed.error or "")
    assert resumed.status == "done" and resumed.config["resume"] is True
    assert resumed.data == killed.data and resumed.run_dir == killed.run_dir
    assert resumed.metrics["steps"] == 60


@pytest.mark.e2e
def test_iterate_command_trains_sft_on_the_configured_store(
    sqlite_url: str, store: Engine, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _collect(store, tiny_model_dir, demos=3)
    monkeypatch.setenv("DIALOOP_DATABASE_URL", sqlite_url)
    args = ["iterate", "--base-model", str(tiny_model_dir), "--sft-steps", "1", "--eval-prompts", "0"]
    result = CliRunner().invoke(app, [*args, "--work-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "sft" in result.output and "trained" in result.output
    again = CliRunner().invoke(app, [*args, "--work-dir", str(tmp_path / "runs")])
    assert again.exit_code == 2 and "nothing new to learn from" in again.output

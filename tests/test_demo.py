"""`dialoop demo --quick`: every stage of the loop on a tiny model, the output layout, the store it leaves."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.loop import VERSION_PREFIX
from dialoop.modeling.device import device_name, pick_device
from dialoop.store.db import make_engine, session_scope
from dialoop.store.models import Candidate, ComparisonTask, Conversation, ModelVersion, Ranking, TrainingRun

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).parent.parent / "examples"
CARD_FIELDS = {
    "name",
    "path",
    "iteration",
    "gold_mean",
    "gold_stderr",
    "gold_by_kind",
    "checks",
    "instructions_followed",
    "win_rate_vs_sft",
    "eos_rate",
    "mean_length_tokens",
    "mean_length_words",
    "kl_to_sft",
    "seconds",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_writes_the_layout_and_says_how_to_chat(demo: tuple[Path, str]) -> None:
    out, output = demo
    for name in ("sft", "rm", "policy"):
        files = {p.name for p in (out / "models" / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
        assert not files & {"metrics.json", "metrics.jsonl", "train_config.json"}  # run records stay in runs/
    for name in ("report.json", "report.html", "ppo_steps.png", "gold_per_iteration.png", "reply_length.png"):
        assert (out / name).stat().st_size > 0
    assert f"dialoop serve --model {out / 'models' / 'policy'}" in " ".join(output.split())
    assert "report.html" in output


def test_report_has_every_field(demo: tuple[Path, str]) -> None:
    report = json.loads((demo[0] / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "sft-1", "policy-2", "policy-3"]
    for card in report["models"]:
        assert set(card) == CARD_FIELDS
        assert card["gold_mean"] is not None and card["eos_rate"] is not None
    assert report["sft"] == "sft-1" and report["seed"] == 1
    assert report["models"][1]["kl_to_sft"] == 0.0 and report["models"][1]["win_rate_vs_sft"] == 0.5
    assert set(report["reward_model"]) >= {"path", "accuracy", "pairs", "candidates_per_prompt"}
    assert report["reward_model"]["path"].endswith("iter-3/rm")
    # the RM's held-out comparisons: replies of the policy its newest rankings came from; and the final one's
    assert (
        report["reward_model"]["model"] == "policy-2" and report["reward_model"]["final_model"] == "policy-3"
    )
    lines = [json.loads(line) for line in (demo[0] / "samples.jsonl").read_text().splitlines()]
    assert {x["model"] for x in lines if x["sample"] == 3} == {"policy-2", "policy-3"}
    assert [(p["iteration"], p["step"]) for p in report["ppo"]] == [(2, [1, 2]), (3, [1, 2])]
    assert set(report["targets"]) == {
        "win_rate_vs_sft",
        "rm_accuracy",
        "rm_accuracy_both_end",
        "gold_policy_minus_sft",
        "gold_sft_minus_base",
        "worst_check_gain",
        "checks_gaining_20_points",
    }
    assert all(set(t) == {"value", "threshold", "pass"} for t in report["targets"].values())
    stages = set(report["stage_seconds"])
    for r in (1, 2):
        assert {f"round {r}: chats", f"round {r}: comparison tasks", f"round {r}: rankings"} <= stages
    expected = {"setup", "demonstrations", "iteration 1: sft", "iteration 2: rm", "iteration 2: ppo"}
    assert expected | {"iteration 3: rm", "iteration 3: ppo", "evaluation"} <= stages
    assert set(report["plots"]) == {"ppo", "gold", "length"}
    # where the times were taken ("cpu" here, the GPU's name on CUDA); precision resolved, never "auto"
    machine = report["machine"]
    device = device_name(pick_device())
    assert machine["device"] == device and machine["cpus"] == os.cpu_count() and machine["torch_threads"] >= 1
    assert machine["precision"] in {"bf16", "fp32"}
    assert f"On {device} ({os.cpu_count()} CPUs" in (demo[0] / "report.html").read_text()


def test_models_load_with_plain_transformers(demo: tuple[Path, str]) -> None:
    models = demo[0] / "models"
    tokenizer = AutoTokenizer.from_pretrained(models / "policy")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    for name in ("sft", "policy"):
        model = AutoModelForCausalLM.from_pretrained(models / name)
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
    rm = AutoModelForSequenceClassification.from_pretrained(models / "rm")
    assert rm.config.num_labels == 1
    with torch.no_grad():
        assert rm(**ids).logits.shape == (1, 1)


def test_the_card_reproduces_with_plain_transformers(demo: tuple[Path, str]) -> None:
    """examples/reproduce_card.py: gold and win rate from the samples, the RM's accuracy from
    AutoModelForSequenceClassification alone, and fresh samples from `generate`."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from reproduce_card import reproduce
    finally:
        sys.path.remove(str(EXAMPLES))
    out = reproduce(demo[0], resample_models=True)
    assert out["gold_mean"] == out["card_gold_mean"]
    assert out["win_rate_vs_sft"] == out["card_win_rate_vs_sft"]
    assert out["rm_pairs"] == 0 or out["rm_accuracy"] == pytest.approx(out["card_rm_accuracy"], abs=0.15)
    assert set(out["resampled"]["gold_mean"]) == {"sft", "policy"}


def test_store_holds_the_collected_data_lineage_and_runs(demo: tuple[Path, str]) -> None:
    engine = make_engine(f"sqlite:///{demo[0] / 'store.db'}")
    try:
        with session_scope(engine) as s:
            count: Any = lambda q: s.scalar(select(func.count()).select_from(q.subquery()))  # noqa: E731
            assert count(select(Conversation).where(Conversation.kind == "demonstration")) > 0
            assert count(select(Conversation).where(Conversation.kind == "chat")) == 2 * 6
            tasks = list(s.scalars(select(ComparisonTask)))
            assert len(tasks) == 2 * 6 and all(t.status == "done" for t in tasks)
            assert all(count(select(Candidate).where(Candidate.task_id == t.id)) == 4 for t in tasks)
            assert count(select(Ranking)) == 2 * 2 * 6  # overlap 2
            versions = {v.name: v for v in s.scalars(select(ModelVersion))}
            parents = {name: v.parent.name if v.parent else None for name, v in versions.items()}
            assert parents == {
                "base": None,
                "sft-1": "base",
                "rm-2": "sft-1",
                "policy-2": "sft-1",
                "rm-3": "sft-1",
                "policy-3": "policy-2",
            }
            assert versions["policy-3"].served and "eval" in versions["policy-3"].metrics
            runs = list(s.scalars(select(TrainingRun).order_by(TrainingRun.id)))
            assert [(r.iteration, r.stage, r.status) for r in runs] == [
                (1, "sft", "done"),
                (2, "rm", "done"),
                (2, "ppo", "done"),
                (3, "rm", "done"),
                (3, "ppo", "done"),
            ]
            for run in runs:
                assert len(run.data["snapshot_hash"]) == 64 and run.data["examples"] > 0
                assert versions[f"{VERSION_PREFIX[run.stage]}-{run.iteration}"].run_id == run.id
            assert len(runs[3].data["ranking_ids"]) == 2 * len(runs[1].data["ranking_ids"])  # all rankings
    finally:
        engine.dispose()


def test_demo_refuses_a_directory_that_is_not_empty(demo: tuple[Path, str]) -> None:
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(demo[0])])
    assert result.exit_code == 2 and "not empty" in result.output

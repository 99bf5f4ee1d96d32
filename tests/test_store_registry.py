"""Model versions, the served policy, training runs and store counts, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session

from dialoop.store import Conversation, Feedback, Message, ModelVersion, TrainingRun, session_scope
from dialoop.store.accounts import create_user
from dialoop.store.registry import (
    ensure_base_version_id,
    fail_run,
    finish_run,
    list_model_versions,
    model_version_by_name,
    register_model_version,
    served_model,
    set_served,
    start_run,
)
from dialoop.store.stats import store_stats


def test_model_versions_record_lineage_and_the_run_that_made_them(engine: Engine) -> None:
    with session_scope(engine) as s:
        base = register_model_version(s, name="base", kind="policy", path="/models/base")
        run = start_run(s, "sft", {"lr": 1e-5}, {"conversations": [1, 2]}, "/runs/sft-1", iteration=1)
        finish_run(s, run, {"loss": 1.25})
        sft = register_model_version(
            s, name="sft-1", kind="policy", path="/runs/sft-1/model", parent=base, run=run
        )
        register_model_version(s, name="rm-1", kind="reward", path="/runs/rm-1/model", parent=sft.id)
    with session_scope(engine) as s:
        rm = model_version_by_name(s, "rm-1")
        assert rm is not None and rm.parent is not None and rm.parent.name == "sft-1"
        sft = model_version_by_name(s, "sft-1")
        assert sft is not None and sft.parent is not None and sft.parent.name == "base"
        assert sft.run is not None and (sft.run.stage, sft.run.metrics) == ("sft", {"loss": 1.25})
        assert [v.name for v in list_model_versions(s)] == ["base", "sft-1", "rm-1"]
        assert [v.name for v in list_model_versions(s, kind="reward")] == ["rm-1"]


def test_register_model_version_rejects_bad_input(engine: Engine) -> None:
    with session_scope(engine) as s:
        register_model_version(s, name="m", kind="policy", path="/m")
    with session_scope(engine) as s:
        with pytest.raises(ValueError, match="invalid model kind 'critic'"):
            register_model_version(s, name="x", kind="critic", path="/x")
        with pytest.raises(ValueError, match="'m' already exists"):
            register_model_version(s, name="m", kind="policy", path="/other")
        with pytest.raises(ValueError, match="1-200 characters"):
            register_model_version(s, name="", kind="policy", path="/x")
        with pytest.raises(LookupError, match="no model version with id 99"):
            register_model_version(s, name="y", kind="policy", path="/y", parent=99)
        with pytest.raises(LookupError, match="no training run with id 7"):
            register_model_version(s, name="z", kind="policy", path="/z", run=7)
    with session_scope(engine) as s:
        assert [v.name for v in list_model_versions(s)] == ["m"]


def test_exactly_one_policy_is_served(engine: Engine) -> None:
    with session_scope(engine) as s:
        assert served_model(s) is None
        a = register_model_version(s, name="a", kind="policy", path="/a")
        b = register_model_version(s, name="b", kind="policy", path="/b")
        rm = register_model_version(s, name="rm", kind="reward", path="/rm")
        a_id, b_id, rm_id = a.id, b.id, rm.id
        set_served(s, a_id)
        assert a.served and not b.served  # objects already in the session see the change
    for chosen in (b_id, a_id, a_id, b_id):
        with session_scope(engine) as s:
            set_served(s, chosen)
        with session_scope(engine) as s:
            served = served_model(s)
            assert served is not None and served.id == chosen
            assert s.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.served)) == 1
    with session_scope(engine) as s:
        with pytest.raises(ValueError, match="reward model"):
            set_served(s, rm_id)
        with pytest.raises(LookupError, match="no model version with id 12345"):
            set_served(s, 12345)
        served = served_model(s)
        assert served is not None and served.id == b_id


def test_training_run_lifecycle(engine: Engine) -> None:
    with session_scope(engine) as s:
        ok = start_run(s, "rm", {"k": 4}, {"snapshot": "abc"}, "/runs/rm")
        bad = start_run(s, "ppo", {}, {}, "/runs/ppo", iteration=2)
        assert ok.status == bad.status == "running" and ok.started_at is not None
        finish_run(s, ok, {"accuracy": 0.7})
        fail_run(s, bad, "CUDA out of memory")
        with pytest.raises(ValueError, match="is done, not running"):
            finish_run(s, ok, {})
        with pytest.raises(ValueError, match="invalid training stage 'dpo'"):
            start_run(s, "dpo", {}, {}, "/runs/dpo")
        ok_id, bad_id = ok.id, bad.id
    with session_scope(engine) as s:
        ok_run, bad_run = s.get(TrainingRun, ok_id), s.get(TrainingRun, bad_id)
        assert ok_run is not None and bad_run is not None
        assert (ok_run.status, ok_run.metrics, ok_run.data) == (
            "done",
            {"accuracy": 0.7},
            {"snapshot": "abc"},
        )
        assert ok_run.finished_at is not None and ok_run.started_at is not None
        assert ok_run.finished_at >= ok_run.started_at
        assert (bad_run.status, bad_run.error, bad_run.iteration) == ("failed", "CUDA out of memory", 2)


def test_store_stats_counts_every_table(engine: Engine) -> None:
    with session_scope(engine) as s:
        assert set(store_stats(s).values()) == {0}
        user = create_user(s, "u", "user", "pw")
        conv = Conversation(kind="chat", owner=user)
        q = Message(conversation=conv, role="user", content="q")
        a = Message(conversation=conv, parent=q, role="assistant", content="a")
        s.add_all([conv, q, a])
        s.flush()
        s.add(Feedback(message_id=a.id, user_id=user.id, kind="thumbs", value=-1))
        register_model_version(s, name="m", kind="policy", path="/m")
        start_run(s, "sft", {}, {}, "/r")
    with session_scope(engine) as s:
        assert store_stats(s) == {
            "users": 1,
            "conversations": 1,
            "messages": 2,
            "comparison_tasks": 0,
            "rankings": 0,
            "feedback": 1,
            "model_versions": 1,
            "training_runs": 1,
        }


def test_a_process_that_loses_the_race_to_register_the_base_model_takes_the_winners_row(
    engine: Engine,
) -> None:
    """Two server processes start together: another process registers the base model between this one's
    lookup and its insert; the insert fails and a fresh look finds the winner's row."""
    raced = []

    def another_process_registers_first(session: Session, *_: object) -> None:
        if not raced:
            raced.append(True)
            with session_scope(engine) as other:
                register_model_version(other, name="base", kind="policy", path="/models/base")

    event.listen(Session, "before_flush", another_process_registers_first)
    try:
        version_id = ensure_base_version_id(engine, "/models/base")
    finally:
        event.remove(Session, "before_flush", another_process_registers_first)
    with session_scope(engine) as s:
        assert raced and [(v.id, v.name) for v in list_model_versions(s)] == [(version_id, "base")]

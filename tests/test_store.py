"""The store's schema and integrity rules, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, delete, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from dialoop.store import (
    Base,
    Candidate,
    ComparisonTask,
    Conversation,
    Feedback,
    Message,
    Ranking,
    User,
    make_engine,
    session_scope,
)
from dialoop.store.migrate import downgrade, open_store, upgrade
from dialoop.store.stats import store_stats

TABLES = set(Base.metadata.tables)


def _schema_diff(url: str) -> list[Any]:
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        eng.dispose()


def _tables(url: str) -> set[str]:
    eng = make_engine(url)
    try:
        return set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_open_store_upgrades_an_empty_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'store.db'}"
    eng = open_store(url)
    try:
        assert set(inspect(eng).get_table_names()) == TABLES | {"alembic_version"}
    finally:
        eng.dispose()
    assert _schema_diff(url) == []


def test_migrated_schema_matches_models(db_url: str) -> None:
    assert _schema_diff(db_url) == []


def test_downgrade_to_base_then_upgrade_again(db_url: str) -> None:
    downgrade(db_url)
    assert _tables(db_url) <= {"alembic_version"}
    upgrade(db_url)
    assert _tables(db_url) == TABLES | {"alembic_version"}
    assert _schema_diff(db_url) == []
    upgrade(db_url)  # already at head: a no-op, as on every later start


def test_sqlite_uses_wal_and_enforces_foreign_keys(sqlite_url: str) -> None:
    eng = make_engine(sqlite_url)
    try:
        with eng.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        eng.dispose()


def test_foreign_key_violation_is_rejected(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(Message(conversation_id=12345, role="user", content="orphan"))
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0


def _conversation_with_task(engine: Engine) -> int:
    """A chat: user -> two assistant siblings, a thumbs up, and a ranked comparison task over them."""
    with session_scope(engine) as s:
        conv = Conversation(kind="chat", title="t")
        s.add(conv)
        s.flush()
        question = Message(conversation=conv, role="user", content="hi")
        a = Message(conversation=conv, parent=question, role="assistant", content="hello")
        b = Message(conversation=conv, parent=question, role="assistant", content="hey")
        s.add_all([question, a, b])
        s.flush()
        s.add(Feedback(message_id=a.id, kind="thumbs", value=1))
        task = ComparisonTask(context_message=question)
        task.candidates = [Candidate(index=0, message=a, is_original=True), Candidate(index=1, message=b)]
        task.rankings = [Ranking(order=[1, 0])]
        s.add(task)
        return conv.id


@pytest.mark.parametrize("how", ["sql", "orm"])
def test_deleting_a_conversation_deletes_everything_under_it(engine: Engine, how: str) -> None:
    conv_id = _conversation_with_task(engine)
    with session_scope(engine) as s:
        assert store_stats(s)["messages"] == 3
    with session_scope(engine) as s:
        if how == "sql":  # the database's ON DELETE CASCADE, as a plain DELETE statement relies on
            s.execute(delete(Conversation).where(Conversation.id == conv_id))
        else:
            s.delete(s.get(Conversation, conv_id))
    with session_scope(engine) as s:
        counts = store_stats(s)
    assert counts["conversations"] == counts["messages"] == counts["feedback"] == 0
    assert counts["comparison_tasks"] == counts["rankings"] == 0
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Candidate)) == 0


def test_message_tree_siblings_are_regenerations_and_edits(engine: Engine) -> None:
    with session_scope(engine) as s:
        conv = Conversation(kind="chat")
        q1 = Message(conversation=conv, role="user", content="2+2?")
        r1 = Message(conversation=conv, parent=q1, role="assistant", content="4")
        r2 = Message(conversation=conv, parent=q1, role="assistant", content="four")  # regenerate
        q2 = Message(conversation=conv, role="user", content="3+3?")  # the first message, edited
        s.add_all([conv, q1, r1, r2, q2])
        s.flush()
        conv_id, q1_id, r2_id = conv.id, q1.id, r2.id
    with session_scope(engine) as s:
        replies = s.scalars(select(Message).where(Message.parent_id == q1_id).order_by(Message.id)).all()
        assert [m.content for m in replies] == ["4", "four"]
        roots = s.scalars(
            select(Message)
            .where(Message.conversation_id == conv_id, Message.parent_id.is_(None))
            .order_by(Message.id)
        ).all()
        assert [m.content for m in roots] == ["2+2?", "3+3?"]
        leaf = s.get(Message, r2_id)
        assert leaf is not None and leaf.parent is not None and leaf.parent.content == "2+2?"
    with session_scope(engine) as s:  # removing a message removes the branch below it
        s.execute(delete(Message).where(Message.id == q1_id))
    with session_scope(engine) as s:
        assert s.scalars(select(Message.content)).all() == ["3+3?"]


def test_deleting_a_user_keeps_their_data_unowned(engine: Engine) -> None:
    with session_scope(engine) as s:
        user = User(name="ann", role="trainer", password_hash="x")
        conv = Conversation(kind="demonstration", owner=user)
        msg = Message(conversation=conv, role="user", content="q", author_user_id=None)
        s.add_all([user, conv, msg])
        s.flush()
        task = ComparisonTask(context_message=msg, rankings=[Ranking(trainer_id=user.id, order=[0])])
        s.add(task)
        user_id = user.id
    with session_scope(engine) as s:
        s.execute(delete(User).where(User.id == user_id))
    with session_scope(engine) as s:
        assert s.scalars(select(Conversation.owner_id)).all() == [None]
        assert s.scalars(select(Ranking.trainer_id)).all() == [None]


def test_json_columns_round_trip(engine: Engine) -> None:
    with session_scope(engine) as s:
        msg = Message(conversation=Conversation(kind="chat"), role="user", content="q")
        ranking = Ranking(
            task=ComparisonTask(context_message=msg),
            order=[2, 0, 1],
            ties=[[0, 1]],
            flags={"2": ["harmful"]},
            all_bad=True,
        )
        s.add(ranking)
    with session_scope(engine) as s:
        got = s.scalars(select(Ranking)).one()
        assert (got.order, got.ties, got.flags, got.all_bad) == (
            [2, 0, 1],
            [[0, 1]],
            {"2": ["harmful"]},
            True,
        )


@pytest.mark.slow
def test_postgres_tests_skip_with_a_message_when_no_server_answers() -> None:
    dead = "postgresql+psycopg://postgres@127.0.0.1:1/postgres"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            f"{__file__}::test_migrated_schema_matches_models",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        env={**os.environ, "DIALOOP_TEST_PG_URL": dead},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert f"no PostgreSQL server answers at {dead}" in proc.stdout

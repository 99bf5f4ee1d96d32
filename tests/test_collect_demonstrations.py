"""Demonstrations: drafts, model suggestions from the current policy, submit, edit until accepted, review."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dialoop.collect import (
    PolicyHandle,
    Suggestion,
    add_turn,
    add_user_turn,
    create_demonstration,
    delete_demonstration,
    demonstration_turns,
    edit_turn,
    remove_last_turn,
    review_demonstration,
    start_chat,
    submit_demonstration,
    suggest_replies,
    suggest_replies_many,
)
from dialoop.engine import SamplingParams
from dialoop.modeling.loading import load_model_and_tokenizer
from dialoop.store.db import session_scope
from dialoop.store.models import Conversation, User
from dialoop.store.registry import register_model_version


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(tiny_model_dir)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_scope(engine) as s:
        yield s


@pytest.fixture
def handle(session: Session, tiny: tuple[Any, Any], tiny_model_dir: Path) -> PolicyHandle:
    version = register_model_version(session, name="sft-1", kind="policy", path=tiny_model_dir)
    return PolicyHandle(tiny[0], tiny[1], version.id)


def _user(session: Session, name: str, role: str = "trainer") -> User:
    user = User(name=name, role=role, password_hash="!")  # no login in these tests: skip argon2's cost
    session.add(user)
    session.flush()
    return user


PARAMS = SamplingParams(max_tokens=6, temperature=1.0, seed=7)


def test_write_with_a_suggestion_submit_and_accept(session: Session, handle: PolicyHandle) -> None:
    ann, admin = _user(session, "ann"), _user(session, "root", "admin")
    demo = create_demonstration(session, ann, system_prompt="Be brief.")
    assert (demo.kind, demo.status, demo.owner_id) == ("demonstration", "draft", ann.id)
    add_turn(session, demo, ann, "user", "Describe the ocean.")

    suggestions = suggest_replies(session, handle, demo, n=3, params=PARAMS)
    assert len(suggestions) == 3
    assert [s.sampling["seed"] for s in suggestions] == [7, 8, 9]
    assert all(s.model_version_id == handle.version_id for s in suggestions)
    assert all(s.sampling["max_tokens"] == 6 for s in suggestions)
    # a seeded request is reproducible: the trainer sees the same suggestions after a reload
    assert suggest_replies(session, handle, demo, n=3, params=PARAMS) == suggestions

    reply = add_turn(session, demo, ann, "assistant", "The ocean is vast.", suggestion=suggestions[1])
    assert reply.author_user_id == ann.id and reply.author_model_id is None
    assert reply.extra["suggestion"]["text"] == suggestions[1].text
    assert reply.extra["suggestion"]["model_version_id"] == handle.version_id
    edit_turn(session, reply, ann, "The ocean is vast and deep.")
    submit_demonstration(session, demo, ann)
    assert demo.status == "submitted"
    edit_turn(session, reply, ann, "The ocean is very deep.")  # editable until accepted
    assert demo.status == "submitted"

    with pytest.raises(PermissionError, match="needs admin"):
        review_demonstration(session, demo, ann, accept=True)
    review_demonstration(session, demo, admin, accept=True)
    assert demo.status == "accepted"
    with pytest.raises(ValueError, match="accepted: it can no longer be edited"):
        edit_turn(session, reply, ann, "changed")
    with pytest.raises(ValueError, match="can no longer be edited"):
        add_turn(session, demo, ann, "user", "More?")

    session.commit()
    session.expire_all()
    stored = session.scalars(select(Conversation).where(Conversation.id == demo.id)).one()
    turns = demonstration_turns(session, stored)
    assert [(m.role, m.content) for m in turns] == [
        ("user", "Describe the ocean."),
        ("assistant", "The ocean is very deep."),
    ]
    assert turns[1].parent_id == turns[0].id and stored.system_prompt == "Be brief."


def test_turns_alternate_and_submission_is_validated(session: Session) -> None:
    ann = _user(session, "ann")
    demo = create_demonstration(session, ann)
    with pytest.raises(ValueError, match="has role user, not assistant"):
        add_turn(session, demo, ann, "assistant", "Hi")
    with pytest.raises(ValueError, match="is empty"):
        submit_demonstration(session, demo, ann)
    first = add_turn(session, demo, ann, "user", "")  # drafts are saved as the trainer types
    with pytest.raises(ValueError, match="has role assistant, not user"):
        add_turn(session, demo, ann, "user", "again")
    add_turn(session, demo, ann, "assistant", "Hello!")
    with pytest.raises(ValueError, match=r"turn\(s\) \[1\] are empty"):
        submit_demonstration(session, demo, ann)
    edit_turn(session, first, ann, "Say hello.")
    add_turn(session, demo, ann, "user", "And goodbye?")
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        submit_demonstration(session, demo, ann)
    remove_last_turn(session, demo, ann)
    with pytest.raises(ValueError, match="only an assistant turn can start from a model suggestion"):
        add_turn(session, demo, ann, "user", "x", suggestion=Suggestion("x", True, 1, {}))
    assert [m.content for m in demonstration_turns(session, demo)] == ["Say hello.", "Hello!"]
    assert submit_demonstration(session, demo, ann).status == "submitted"


def test_only_the_owner_edits_and_rejection_returns_to_draft(session: Session) -> None:
    ann, bob, admin = _user(session, "ann"), _user(session, "bob"), _user(session, "root", "admin")
    plain = _user(session, "joe", "user")
    with pytest.raises(PermissionError, match="write demonstrations"):
        create_demonstration(session, plain)
    demo = create_demonstration(session, ann)
    turn = add_turn(session, demo, ann, "user", "Hi")
    with pytest.raises(PermissionError, match="not theirs"):
        edit_turn(session, turn, bob, "mine now")
    with pytest.raises(PermissionError, match="not theirs"):
        add_turn(session, demo, bob, "assistant", "Hello")
    add_turn(session, demo, ann, "assistant", "Hello")
    with pytest.raises(ValueError, match="is draft, not submitted"):
        review_demonstration(session, demo, admin, accept=False)
    submit_demonstration(session, demo, ann)
    review_demonstration(session, demo, admin, accept=False)
    assert demo.status == "rejected"
    edit_turn(session, turn, ann, "Hi there")
    assert demo.status == "draft"
    delete_demonstration(session, demo, ann)
    session.flush()
    assert session.get(Conversation, demo.id) is None


def test_suggestions_answer_user_turns_only(session: Session, handle: PolicyHandle) -> None:
    ann = _user(session, "ann")
    demo = create_demonstration(session, ann)
    with pytest.raises(ValueError, match="no user turn"):
        suggest_replies(session, handle, demo, n=2, params=PARAMS)
    add_turn(session, demo, ann, "user", "Hi")
    reply = add_turn(session, demo, ann, "assistant", "Hello")
    with pytest.raises(ValueError, match="has role assistant"):
        suggest_replies(session, handle, demo, n=2, params=PARAMS)
    with pytest.raises(ValueError, match="at least one suggestion"):
        suggest_replies(session, handle, reply, n=0)
    # a user message of any conversation is a context too (the chat UI's "regenerate" shares this path)
    chat = start_chat(session, ann)
    asked = add_user_turn(session, chat, ann, "Name a colour.")
    many = suggest_replies_many(session, handle, [asked, asked], n=2, params=PARAMS)
    assert len(many) == 2 and many[0] == many[1]

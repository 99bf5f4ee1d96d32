"""Trainer chats, comparison tasks from them, assignment, rankings, skips, overlap and agreement."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dialoop.collect import (
    FLAG_KINDS,
    PolicyHandle,
    add_user_turn,
    cancel_task,
    chat_head,
    chat_reply,
    create_comparison_task,
    create_comparison_tasks,
    display_order,
    flagged_candidates,
    generate_chat_replies,
    next_task_for,
    pairwise_agreement,
    skip_task,
    start_chat,
    submit_ranking,
)
from dialoop.collect.agreement import pair_agreement, tie_groups
from dialoop.collect.common import params_from_record
from dialoop.engine import SamplingParams
from dialoop.modeling.loading import load_model_and_tokenizer
from dialoop.store.db import session_scope
from dialoop.store.models import ComparisonTask, Message, User
from dialoop.store.registry import register_model_version
from dialoop.store.trees import siblings

PARAMS = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(tiny_model_dir)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_scope(engine) as s:
        yield s


@pytest.fixture
def handle(session: Session, tiny: tuple[Any, Any], tiny_model_dir: Path) -> PolicyHandle:
    version = register_model_version(session, name="policy-1", kind="policy", path=tiny_model_dir)
    return PolicyHandle(tiny[0], tiny[1], version.id)


def _user(session: Session, name: str, role: str = "trainer") -> User:
    user = User(name=name, role=role, password_hash="!")  # no login in these tests: skip argon2's cost
    session.add(user)
    session.flush()
    return user


def _chats(session: Session, handle: PolicyHandle, user: User, n: int) -> list[Message]:
    """`n` one-turn chats of `user` with the model; returns the model's replies."""
    asked = [
        add_user_turn(session, start_chat(session, user), user, f"Question {i} from {user.name}?")
        for i in range(n)
    ]
    return generate_chat_replies(
        session, handle, asked, [SamplingParams(6, 1.0, 1.0, seed=i) for i in range(n)]
    )


def test_chat_replies_are_stored_with_version_sampling_and_finished(
    session: Session, handle: PolicyHandle
) -> None:
    ann = _user(session, "ann")
    chat = start_chat(session, ann, system_prompt="Be kind.")
    assert chat_head(session, chat) is None
    asked = add_user_turn(session, chat, ann, "Hello?")
    with pytest.raises(ValueError, match="follows an assistant turn"):
        add_user_turn(session, chat, ann, "Anyone?")
    reply = chat_reply(session, handle, asked, SamplingParams(max_tokens=5, seed=3))
    assert (reply.role, reply.parent_id, reply.author_model_id) == ("assistant", asked.id, handle.version_id)
    assert reply.author_user_id is None
    assert reply.sampling is not None
    assert params_from_record(reply.sampling) == SamplingParams(max_tokens=5, seed=3)
    assert {k: reply.sampling[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 5,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 3,
    }
    assert isinstance(reply.finished, bool)
    assert len(handle.tokenizer(reply.content, add_special_tokens=False)["input_ids"]) <= 5 or reply.finished
    assert chat_head(session, chat) is reply
    follow = add_user_turn(session, chat, ann, "Tell me more.")
    assert follow.parent_id == reply.id
    edited = add_user_turn(session, chat, ann, "Tell me less.", parent=reply)  # an edit is a sibling
    assert [m.id for m in siblings(session, edited)] == [follow.id, edited.id]
    with pytest.raises(ValueError, match="model replies to user turns"):
        chat_reply(session, handle, reply, SamplingParams(max_tokens=2))
    with pytest.raises(PermissionError, match="not theirs"):
        add_user_turn(session, chat, _user(session, "bob"), "Me too")
    with pytest.raises(ValueError, match="must not be empty"):
        add_user_turn(session, start_chat(session, ann), ann, "  ")


def test_a_task_is_k_candidates_for_an_unused_trainer_reply(session: Session, handle: PolicyHandle) -> None:
    ann, bob = _user(session, "ann"), _user(session, "bob")
    originals = _chats(session, handle, ann, 2) + _chats(session, handle, bob, 1)
    _chats(session, handle, _user(session, "joe", "user"), 2)  # a plain user's chats are not trainer data
    task = create_comparison_task(session, handle, rng=random.Random(0), params=PARAMS)
    assert task is not None and (task.status, task.overlap) == ("open", 2)
    cands = task.candidates
    assert sorted(c.index for c in cands) == [0, 1, 2, 3]
    (original,) = [c for c in cands if c.is_original]
    assert original.message in originals and task.context_message_id == original.message.parent_id
    alternatives = [c.message for c in cands if not c.is_original]
    assert all(m.parent_id == task.context_message_id and m.role == "assistant" for m in alternatives)
    assert all(
        m.author_model_id == handle.version_id and m.extra == {"comparison_task": task.id}
        for m in alternatives
    )
    assert all(m.sampling["top_p"] == 0.9 and m.sampling["seed"] is not None for m in alternatives)
    assert {m.id for m in siblings(session, original.message)} == {c.message_id for c in cands}
    # the alternatives do not become the chat's head: the trainer's chat goes on from their own reply
    assert chat_head(session, original.message.conversation) is original.message

    rest = create_comparison_tasks(session, handle, 10, rng=random.Random(1), k=3, params=PARAMS)
    assert len(rest) == 2 and all(len(t.candidates) == 3 for t in rest)
    used = {t.context_message_id for t in [task, *rest]}
    assert used == {m.parent_id for m in originals}
    assert create_comparison_task(session, handle, rng=random.Random(2)) is None
    with pytest.raises(ValueError, match="k >= 2"):
        create_comparison_tasks(session, handle, 1, rng=random.Random(0), k=1)


def test_alternatives_default_to_the_original_sampling_and_can_come_from_other_versions(
    session: Session, handle: PolicyHandle, tiny_model_dir: Path
) -> None:
    ann = _user(session, "ann")
    _chats(session, handle, ann, 1)
    older = register_model_version(session, name="policy-0", kind="policy", path=tiny_model_dir)
    other = PolicyHandle(handle.model, handle.tokenizer, older.id)
    task = create_comparison_task(session, handle, rng=random.Random(0), k=4, alt_models=[other])
    assert task is not None
    authors = sorted(c.message.author_model_id for c in task.candidates if not c.is_original)
    assert authors == sorted([handle.version_id, handle.version_id, older.id])
    assert all(c.message.sampling["max_tokens"] == 6 for c in task.candidates)


def test_seeded_tasks_are_reproducible(tmp_path: Path, tiny: tuple[Any, Any], tiny_model_dir: Path) -> None:
    from dialoop.store.db import make_engine
    from dialoop.store.migrate import upgrade

    results = []
    for run in range(2):
        url = f"sqlite:///{tmp_path / f'store{run}.db'}"
        upgrade(url)
        engine = make_engine(url)
        with session_scope(engine) as s:
            version = register_model_version(s, name="p", kind="policy", path=tiny_model_dir)
            h = PolicyHandle(tiny[0], tiny[1], version.id)
            _chats(s, h, _user(s, "ann"), 3)
            tasks = create_comparison_tasks(s, h, 3, rng=random.Random(42), params=PARAMS)
            results.append(
                [(t.context_message_id, [(c.index, c.message.content) for c in t.candidates]) for t in tasks]
            )
        engine.dispose()
    assert results[0] == results[1]


def _task(session: Session, handle: PolicyHandle, owner: User, overlap: int = 2) -> ComparisonTask:
    _chats(session, handle, owner, 1)
    task = create_comparison_task(session, handle, rng=random.Random(0), overlap=overlap, params=PARAMS)
    assert task is not None
    return task


def test_assignment_overlap_and_display_order(session: Session, handle: PolicyHandle) -> None:
    ann, bob, cat, dan = (_user(session, n) for n in ("ann", "bob", "cat", "dan"))
    task = _task(session, handle, ann)
    assert next_task_for(session, ann) is None  # never their own chat
    view = next_task_for(session, bob)
    assert view is not None and view.task is task
    assert view.context[-1]["role"] == "user" and view.context[-1]["content"].startswith("Question 0")
    assert [c.id for c in view.candidates] == [c.id for c in display_order(task, bob)]  # stable per trainer
    orders = {tuple(c.index for c in display_order(task, u)) for u in (bob, cat, dan, ann)}
    assert len(orders) > 1  # shuffled per trainer

    skip_task(session, task, bob, "I cannot judge medical advice")
    assert next_task_for(session, bob) is None  # a skipped task is not offered again
    assert task.status == "open"
    submit_ranking(session, task, cat, [3, 1, 0, 2])
    assert task.status == "open"
    view = next_task_for(session, dan)
    assert view is not None and view.task is task
    submit_ranking(session, task, dan, [0, 1, 2, 3], ties=[[1, 2]])
    assert task.status == "done"
    assert next_task_for(session, _user(session, "eve")) is None
    # trainers may edit their answer; turning a ranking into a skip reopens the task
    skip_task(session, task, dan, "changed my mind")
    assert task.status == "open" and len(task.rankings) == 3


def test_tasks_near_their_overlap_come_first(session: Session, handle: PolicyHandle) -> None:
    ann, bob, cat = (_user(session, n) for n in ("ann", "bob", "cat"))
    first, second = _task(session, handle, ann), _task(session, handle, ann)
    submit_ranking(session, second, bob, [0, 1, 2, 3])
    view = next_task_for(session, cat)
    assert view is not None and view.task is second
    assert (v := next_task_for(session, bob)) is not None and v.task is first


def test_ranking_validation(session: Session, handle: PolicyHandle) -> None:
    ann, bob = _user(session, "ann"), _user(session, "bob")
    task = _task(session, handle, ann)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"order": [0, 1, 2]}, r"each candidate index 0..3 exactly once"),
        ({"order": [0, 1, 1, 2]}, "exactly once"),
        ({"order": [0, 1, 2, 4]}, "exactly once"),
        ({"order": []}, "exactly once"),
        ({"order": [0, 1, 2, 3], "ties": [[0, 2]]}, "next to each other"),
        ({"order": [0, 1, 2, 3], "ties": [[1, 1]]}, "two different candidate"),
        ({"order": [0, 1, 2, 3], "ties": [[1]]}, "two different candidate"),
        ({"order": [0, 1, 2, 3], "ties": [[0, 1], [1, 0]]}, "given twice"),
        ({"order": [0, 1, 2, 3], "ties": [[0, 7]]}, "not in the order"),
        ({"order": [0, 1, 2, 3], "flags": {4: ["harmful"]}}, "candidates are 0..3"),
        ({"order": [0, 1, 2, 3], "flags": {1: ["rude"]}}, "unknown flag"),
        ({"order": [], "all_bad": True, "ties": [[0, 1]]}, "not in the order"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            submit_ranking(session, task, bob, **kwargs)
    assert task.rankings == []
    with pytest.raises(ValueError, match="needs a reason"):
        skip_task(session, task, bob, "  ")
    with pytest.raises(PermissionError, match="own chat"):
        submit_ranking(session, task, ann, [0, 1, 2, 3])
    with pytest.raises(PermissionError, match="needs trainer or admin"):
        submit_ranking(session, task, _user(session, "joe", "user"), [0, 1, 2, 3])

    r = submit_ranking(session, task, bob, [], all_bad=True, flags={2: ["untrue", "harmful"]})
    assert (r.order, r.all_bad, r.flags) == ([], True, {"2": ["harmful", "untrue"]})
    r = submit_ranking(session, task, bob, [3, 2, 1, 0], ties=[[1, 2], [0, 1]])
    assert (r.order, r.ties, r.all_bad, r.flags) == ([3, 2, 1, 0], [[2, 1], [1, 0]], False, {})
    assert len(task.rankings) == 1  # the edit replaced the first answer
    assert set(FLAG_KINDS) == {"harmful", "untrue", "private_data"}

    admin = _user(session, "root", "admin")
    with pytest.raises(PermissionError, match="needs admin"):
        cancel_task(session, task, bob)
    cancel_task(session, task, admin)
    assert next_task_for(session, _user(session, "cat")) is None
    with pytest.raises(ValueError, match="cancelled"):
        submit_ranking(session, task, bob, [0, 1, 2, 3])


def test_flags_are_listed_for_review(session: Session, handle: PolicyHandle) -> None:
    ann, bob = _user(session, "ann"), _user(session, "bob")
    task = _task(session, handle, ann)
    skip_task(session, task, bob, "reply 1 leaks an address", flags={1: ["private_data"]})
    (flag,) = flagged_candidates(session)
    ranking, candidate, kinds = flag
    assert ranking.trainer_id == bob.id and candidate.index == 1 and kinds == ["private_data"]
    assert candidate.task_id == task.id


def test_pair_agreement_counts_ordered_pairs_and_skips_ties() -> None:
    assert pair_agreement(([0, 1, 2, 3], []), ([0, 1, 2, 3], [])) == (6, 6)
    assert pair_agreement(([0, 1, 2, 3], []), ([3, 2, 1, 0], [])) == (0, 6)
    assert pair_agreement(([0, 1, 2, 3], []), ([1, 0, 2, 3], [])) == (5, 6)
    # 1 = 2 in the second ranking: the pair (1, 2) is not compared
    assert pair_agreement(([0, 1, 2, 3], []), ([0, 2, 1, 3], [[2, 1]])) == (5, 5)
    # a chain of ties is one level
    assert tie_groups([0, 1, 2, 3], [[0, 1], [1, 2]]) == {0: 0, 1: 0, 2: 0, 3: 1}
    assert pair_agreement(([0, 1, 2, 3], [[0, 1], [1, 2]]), ([0, 1, 2, 3], [])) == (3, 3)


def test_pairwise_agreement_between_trainers(session: Session, handle: PolicyHandle) -> None:
    ann, bob, cat, dan = (_user(session, n) for n in ("ann", "bob", "cat", "dan"))
    t1, t2, t3 = (
        _task(session, handle, ann, 3),
        _task(session, handle, ann, 3),
        _task(session, handle, ann, 3),
    )
    submit_ranking(session, t1, bob, [0, 1, 2, 3])
    submit_ranking(session, t1, cat, [1, 0, 2, 3])  # bob-cat: 5 of 6
    submit_ranking(session, t1, dan, [0, 1, 2, 3], ties=[[0, 1]])  # bob-dan 5/5, cat-dan 5/5
    submit_ranking(session, t2, bob, [0, 1, 2, 3])
    submit_ranking(session, t2, cat, [], all_bad=True)  # all-bad answers carry no order
    skip_task(session, t2, dan, "not sure")
    submit_ranking(session, t3, bob, [0, 1, 2, 3], flags={0: ["untrue"]})  # ranked by one trainer only
    report = pairwise_agreement(session)
    assert (report.agreed_pairs, report.compared_pairs, report.tasks) == (15, 16, 1)
    assert report.agreement == pytest.approx(15 / 16)
    b, c, d = report.trainers[bob.id], report.trainers[cat.id], report.trainers[dan.id]
    assert (b.name, b.rankings, b.skips, b.all_bad, b.flagged) == ("bob", 3, 0, 0, 1)
    assert (c.rankings, c.all_bad, d.rankings, d.skips) == (2, 1, 1, 1)
    assert (b.agreed_pairs, b.compared_pairs) == (10, 11)
    assert c.agreement == pytest.approx(10 / 11) and d.agreement == 1.0
    assert ann.id not in report.trainers


def test_display_order_survives_a_reload(engine: Engine, handle: PolicyHandle, session: Session) -> None:
    task, bob = _task(session, handle, _user(session, "ann")), _user(session, "bob")
    shown = [c.message_id for c in display_order(task, bob)]
    session.commit()
    with session_scope(engine) as other:
        stored = other.get_one(ComparisonTask, task.id)
        assert [c.message_id for c in display_order(stored, other.get_one(User, bob.id))] == shown
        assert [c.index for c in stored.candidates] == [0, 1, 2, 3]


def test_greedy_originals_get_sampled_alternatives(session: Session, handle: PolicyHandle) -> None:
    ann = _user(session, "ann")
    asked = add_user_turn(session, start_chat(session, ann), ann, "Hi?")
    chat_reply(session, handle, asked, SamplingParams(max_tokens=4, temperature=0))
    task = create_comparison_task(session, handle, rng=random.Random(0))
    assert task is not None
    assert {c.message.sampling["temperature"] for c in task.candidates if not c.is_original} == {1.0}


def test_collection_counts(session: Session, handle: PolicyHandle) -> None:
    from dialoop.collect import add_turn, collection_counts, create_demonstration, submit_demonstration

    ann = _user(session, "ann")
    create_demonstration(session, ann)
    demo = create_demonstration(session, ann)
    add_turn(session, demo, ann, "user", "Hi")
    add_turn(session, demo, ann, "assistant", "Hello")
    submit_demonstration(session, demo, ann)
    _task(session, handle, ann)
    assert collection_counts(session) == {
        "demonstrations_draft": 1,
        "demonstrations_submitted": 1,
        "chats": 1,
        "tasks_open": 1,
    }

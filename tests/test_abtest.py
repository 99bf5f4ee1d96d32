"""Blind A/B evaluation: the Wilson interval, the store flow on SQLite and PostgreSQL, and the whole flow over
HTTP (an admin queues a test, trainers judge replies labelled A/B without version names, the result page)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from webclient import Live, WebClient, live_web_server

from dialoop.collect import display_order, next_task_for
from dialoop.collect.abtest import (
    ABPair,
    ab_result,
    close_ab_test,
    create_ab_test,
    judge_ab_task,
    list_ab_tests,
    next_ab_task,
    recent_user_prompts,
    wilson_interval,
)
from dialoop.collect.chats import add_user_turn, start_chat
from dialoop.collect.tasks import skip_task
from dialoop.modeling.tiny import make_tiny_model
from dialoop.store import session_scope
from dialoop.store.accounts import create_user, get_user
from dialoop.store.models import ComparisonTask, Conversation, ModelVersion, Ranking, User
from dialoop.store.registry import register_model_version

HTML = {"Accept": "text/html"}


def test_wilson_interval_matches_hand_computed_values() -> None:
    # z = 1.959964, z^2 = 3.841459. 7 of 10: centre (0.7 + 0.192073) / 1.384146 = 0.644486,
    # half-width 1.959964 * sqrt(0.021 + 0.009604) / 1.384146 = 0.247708
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    # ties count half: 3 wins and 1 tie of 5 is 3.5 of 5; centre (0.7 + 0.384146) / 1.768292 = 0.613103,
    # half-width 1.959964 * sqrt(0.042 + 0.038415) / 1.768292 = 0.314312
    assert wilson_interval(3.5, 5) == pytest.approx((0.298791, 0.927416), abs=1e-6)
    # 50 of 100: 0.5 -/+ 1.959964 * sqrt(0.0025 + 0.00009604) / 1.038415
    assert wilson_interval(50, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    # nothing won: the lower end is 0, the upper one z^2/n / (1 + z^2/n) = 0.384146 / 1.384146
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no judgement yet: anything is possible
    low90, high90 = wilson_interval(7, 10, confidence=0.90)
    assert 0.396778 < low90 < high90 < 0.892209  # a lower confidence gives a narrower interval


@pytest.mark.parametrize(("successes", "n", "confidence"), [(11, 10, 0.95), (-1, 10, 0.95), (5, 10, 1.0)])
def test_wilson_interval_refuses_impossible_input(successes: float, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        wilson_interval(successes, n, confidence)


def _versions(session: object, path: Path) -> tuple[ModelVersion, ModelVersion]:
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
    a = register_model_version(session, name="alpha-policy", kind="policy", path=path)
    b = register_model_version(session, name="beta-policy", kind="policy", path=path)
    return a, b


def _pairs(n: int) -> list[ABPair]:
    return [ABPair(f"prompt {i}", f"alpha says {i}", f"beta says {i}", True, i % 2 == 0) for i in range(n)]


@pytest.mark.slow
def test_ab_test_in_the_store_counts_ties_half_and_leaves_skips_out(engine: Engine, tmp_path: Path) -> None:
    with session_scope(engine) as session:
        admin = create_user(session, "root", "admin", "pw")
        judges = [create_user(session, name, "trainer", "pw") for name in ("tess", "theo")]
        a, b = _versions(session, tmp_path)
        test = create_ab_test(session, admin, a, b, _pairs(4), rng=random.Random(1), overlap=2)
        test_id = test.id
        tasks = list(session.scalars(select(ComparisonTask).order_by(ComparisonTask.id)))
        assert [t.source for t in tasks] == ["ab"] * 4 and all(t.overlap == 2 for t in tasks)
        assert test.kind == "imported" and test.owner_id is None and test.source == "ab"
        for task in tasks:
            authors = {c.message.author_model_id for c in task.candidates}
            assert authors == {a.id, b.id} and sorted(c.index for c in task.candidates) == [0, 1]
            assert not any(c.is_original for c in task.candidates)

        def index_of(task: ComparisonTask, version: ModelVersion) -> int:
            return next(c.index for c in task.candidates if c.message.author_model_id == version.id)

        # tess: B, B, A, tie; theo: B, tie, skip, (nothing yet)
        tess, theo = judges
        judge_ab_task(session, tasks[0], tess, index_of(tasks[0], b))
        judge_ab_task(session, tasks[1], tess, index_of(tasks[1], b))
        judge_ab_task(session, tasks[2], tess, index_of(tasks[2], a))
        judge_ab_task(session, tasks[3], tess, None)
        judge_ab_task(session, tasks[0], theo, index_of(tasks[0], b))
        judge_ab_task(session, tasks[1], theo, None)
        skip_task(session, tasks[2], theo, "I cannot judge this")

        result = ab_result(session, test_id)
        assert (result.version_a, result.version_b) == ("alpha-policy", "beta-policy")
        assert (result.wins_b, result.wins_a, result.ties, result.skips) == (3, 1, 2, 1)
        assert result.judgements == 6 and result.win_rate_b == pytest.approx(4 / 6)
        assert result.interval_b() == pytest.approx(wilson_interval(4, 6))
        assert [r.status for r in result.rows] == ["done", "done", "open", "open"]
        assert result.rows[0].prompt == "prompt 0" and result.rows[0].reply_b == "beta says 0"
        assert [t.test_id for t in list_ab_tests(session)] == [test_id]

        # each trainer is offered each task once; the skip does not count towards the overlap
        offered = next_ab_task(session, theo)
        assert offered is not None and offered.task.id == tasks[3].id
        judge_ab_task(session, tasks[3], theo, index_of(tasks[3], a))
        assert next_ab_task(session, theo) is None and next_ab_task(session, tess) is None

        # closing withdraws what is still open; the judgements stay
        assert close_ab_test(session, test_id, admin) == 1
        closed = ab_result(session, test_id)
        assert closed.tasks("cancelled") == 1 and closed.judgements == 7
        with pytest.raises(ValueError, match="cancelled"):
            judge_ab_task(session, tasks[2], tess, 0)


@pytest.mark.slow
def test_ab_test_refuses_bad_requests(engine: Engine, tmp_path: Path) -> None:
    with session_scope(engine) as session:
        admin = create_user(session, "root", "admin", "pw")
        trainer = create_user(session, "tess", "trainer", "pw")
        a, b = _versions(session, tmp_path)
        rm = register_model_version(session, name="rm-1", kind="reward", path=tmp_path)
        rng = random.Random(0)
        with pytest.raises(PermissionError):
            create_ab_test(session, trainer, a, b, _pairs(1), rng=rng)
        with pytest.raises(ValueError, match="two different versions"):
            create_ab_test(session, admin, a, a, _pairs(1), rng=rng)
        with pytest.raises(ValueError, match="compare policies"):
            create_ab_test(session, admin, a, rm, _pairs(1), rng=rng)
        with pytest.raises(ValueError, match="at least one prompt"):
            create_ab_test(session, admin, a, b, [], rng=rng)
        with pytest.raises(ValueError, match="prompt 2 is empty"):
            create_ab_test(session, admin, a, b, [*_pairs(1), ABPair("  ", "x", "y")], rng=rng)
        with pytest.raises(LookupError):
            create_ab_test(session, admin, a.id, 999, _pairs(1), rng=rng)
        assert session.scalars(select(Conversation)).first() is None  # nothing half-written
        with pytest.raises(LookupError):
            ab_result(session, 1)
        test = create_ab_test(session, admin, a, b, _pairs(1), rng=rng)
        task = session.scalars(select(ComparisonTask)).one()
        with pytest.raises(ValueError, match="has candidates"):
            judge_ab_task(session, task, trainer, 5)
        # a user may not judge
        user = create_user(session, "alice", "user", "pw")
        with pytest.raises(PermissionError):
            judge_ab_task(session, task, user, None)
        assert ab_result(session, test.id).judgements == 0


@pytest.mark.slow
def test_trainers_see_the_two_versions_in_their_own_random_order(engine: Engine, tmp_path: Path) -> None:
    with session_scope(engine) as session:
        admin = create_user(session, "root", "admin", "pw")
        trainers = [create_user(session, f"t{i}", "trainer", "pw") for i in range(3)]
        a, b = _versions(session, tmp_path)
        create_ab_test(session, admin, a, b, _pairs(16), rng=random.Random(3))
        firsts = set()
        for task in session.scalars(select(ComparisonTask)):
            for trainer in trainers:
                shown = display_order(task, trainer)
                assert shown == display_order(task, trainer)  # stable for one trainer
                firsts.add(shown[0].message.author_model_id)
        assert firsts == {a.id, b.id}  # neither version is always shown first


def test_recent_user_prompts_are_the_newest_opening_turns(engine: Engine) -> None:
    with session_scope(engine) as session:
        alice = create_user(session, "alice", "user", "pw")
        for text in ("first question", "second question", "first question", "third question"):
            chat = start_chat(session, alice)
            add_user_turn(session, chat, alice, text)
        assert recent_user_prompts(session, 2) == ["third question", "first question"]
        assert recent_user_prompts(session, 10) == ["third question", "first question", "second question"]


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("abtest-http")
    other = make_tiny_model(folder / "other-model", seed=7)  # another policy: its replies differ
    with live_web_server(f"sqlite:///{folder / 'store.db'}", tiny_model_dir, default_max_tokens=8) as server:
        with session_scope(server.app.state.engine) as session:
            register_model_version(session, name="alpha-policy", kind="policy", path=tiny_model_dir)
            register_model_version(session, name="beta-policy", kind="policy", path=other)
            create_user(session, "theo", "trainer", "correct horse battery")
        yield server


def _choose(live: Live, client: WebClient, name: str, version: str | None) -> int:
    """`name` judges the task /ab shows: `version` wrote the better reply (None: a tie); returns its id."""
    page = client.page("/ab")
    assert page.status_code == 200
    html = page.text
    assert "alpha-policy" not in html and "beta-policy" not in html  # blind: no version names
    task_id = int(re.search(r'action="/ab/(\d+)" id="ab-answer"', html).group(1))  # type: ignore[union-attr]
    if version is None:
        choice = "tie"
    else:
        with session_scope(live.app.state.engine) as session:
            user = get_user(session, name)
            assert user is not None
            task = session.get_one(ComparisonTask, task_id)
            shown = display_order(task, user)
            texts = [unescape(t) for t in re.findall(r'<div class="text">([^<]*)</div>', html)]
            assert texts == [c.message.content for c in shown]
            label = "AB"[[c.message.author_model.name for c in shown].index(version)]  # type: ignore[union-attr]
        choice = label
    response = client.http.post(
        f"/ab/{task_id}", data={"choice": choice, "csrf_token": client.csrf}, headers=HTML
    )
    assert response.status_code == 303 and response.headers["location"] == "/ab"
    return task_id


@pytest.mark.slow
def test_ab_test_from_the_admin_page_to_its_result(live: Live) -> None:
    root, tess, theo = (live.client(name) for name in ("root", "tess", "theo"))
    page = root.page("/admin/ab")
    assert page.status_code == 200 and "alpha-policy" in page.text and "No A/B tests yet." in page.text
    form = {
        "version_a": "alpha-policy",
        "version_b": "beta-policy",
        "source": "custom",
        "custom": "Say hi.\n\nName a colour.\nCount to three.\n",
        "count": "3",
        "overlap": "2",
        "max_tokens": "6",
        "temperature": "1.0",
        "seed": "5",
        "csrf_token": root.csrf,
    }
    same = root.http.post("/admin/ab", data={**form, "version_b": "alpha-policy"}, headers=HTML)
    assert same.status_code == 400 and "choose two different versions" in same.text
    created = root.http.post("/admin/ab", data=form, headers=HTML)
    assert created.status_code == 303
    test_id = int(created.headers["location"].rsplit("/", 1)[1])
    with session_scope(live.app.state.engine) as session:
        result = ab_result(session, test_id)
        assert [r.prompt for r in result.rows] == ["Say hi.", "Name a colour.", "Count to three."]
        assert all(r.reply_a and r.reply_b for r in result.rows)
        # the trainer workspace's queue offers them too, as two-reply tasks
        tess_user = session.scalars(select(User).where(User.name == "tess")).one()
        assert next_task_for(session, tess_user) is not None

    # tess prefers beta every time; theo: beta, a tie, then skips the last one
    for _ in range(3):
        _choose(live, tess, "tess", "beta-policy")
    assert "No A/B comparison is waiting for you" in tess.page("/ab").text
    _choose(live, theo, "theo", "beta-policy")
    _choose(live, theo, "theo", None)
    skipped_page = theo.page("/ab").text
    task_id = int(re.search(r'action="/ab/(\d+)" id="ab-answer"', skipped_page).group(1))  # type: ignore[union-attr]
    no_reason = theo.http.post(
        f"/ab/{task_id}", data={"choice": "skip", "csrf_token": theo.csrf}, headers=HTML
    )
    assert no_reason.status_code == 400 and "a skip needs a reason" in no_reason.text
    skip = theo.http.post(
        f"/ab/{task_id}", data={"choice": "skip", "reason": "not sure", "csrf_token": theo.csrf}, headers=HTML
    )
    assert skip.status_code == 303
    bad = theo.http.post(f"/ab/{task_id}", data={"choice": "C", "csrf_token": theo.csrf}, headers=HTML)
    assert bad.status_code == 400

    # 4 wins for B, 1 tie, 1 skip: (4 + 0.5) / 5 = 90%
    page = root.page(f"/admin/ab/{test_id}")
    assert page.status_code == 200
    low, high = wilson_interval(4.5, 5)
    assert '<span id="win-rate">90.0%</span>' in page.text
    assert f'<span id="win-interval">[{100 * low:.1f}%, {100 * high:.1f}%]</span>' in page.text
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)</td>', page.text))
    assert counts == {"wins_b": "4", "wins_a": "0", "ties": "1", "skips": "1"}
    assert f'href="/admin/ab/{test_id}"' in root.page("/admin/ab").text
    with session_scope(live.app.state.engine) as session:
        rankings = list(session.scalars(select(Ranking)))
        assert len(rankings) == 6 and sum(r.skip_reason is not None for r in rankings) == 1

    # closing withdraws the prompt still open (theo's skip left it open)
    assert root.http.post(f"/admin/ab/{test_id}/close", data={"csrf_token": root.csrf}).status_code == 303
    with session_scope(live.app.state.engine) as session:
        assert ab_result(session, test_id).tasks("cancelled") == 1
    assert root.page("/admin/ab/999").status_code == 404


def test_ab_prompts_from_the_eval_split_or_recent_chats(live: Live) -> None:
    from dialoop.evaluate.card import EvalConfig, eval_prompts

    root = live.client("root")
    root.page("/admin/ab")
    form = {"version_a": "tiny", "version_b": "beta-policy", "max_tokens": "4", "csrf_token": root.csrf}
    with session_scope(live.app.state.engine) as session:
        has_chats = recent_user_prompts(session, 1) != []
    if not has_chats:
        none_yet = root.http.post("/admin/ab", data={**form, "source": "recent", "count": "3"}, headers=HTML)
        assert none_yet.status_code == 400 and "no prompts from that source yet" in none_yet.text
    too_many = root.http.post("/admin/ab", data={**form, "source": "eval", "count": "500"}, headers=HTML)
    assert too_many.status_code == 400 and "the number of prompts must be 1 to 200" in too_many.text
    created = root.http.post(
        "/admin/ab", data={**form, "source": "eval", "count": "2", "seed": "3"}, headers=HTML
    )
    assert created.status_code == 303
    with session_scope(live.app.state.engine) as session:
        result = ab_result(session, int(created.headers["location"].rsplit("/", 1)[1]))
        # the server's own model ("tiny", no version) is credited to the base version at its path
        assert (result.version_a, result.version_b) == ("alpha-policy", "beta-policy")
    expected = [p.text for p in eval_prompts(EvalConfig(prompts=2, seed=3))]
    assert [r.prompt for r in result.rows] == expected

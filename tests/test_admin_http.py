"""The admin pages over HTTP on a live server: access control and CSRF on every admin route, the dashboard's
counts and agreement, reviewing demonstrations and flags, users and roles, serving another version; and the
store functions behind them (roles, deleting users, flag reviews) on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_data import add_second_ranker, seed_store
from fastapi import APIRouter
from fastapi.routing import APIRoute
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from webclient import PASSWORD, Live, WebClient, live_web_server

from dialoop.collect import add_user_turn, start_chat, submit_ranking
from dialoop.collect.flags import open_flags, resolve_flags
from dialoop.serve.admin import ab_router, admin_router
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user, delete_user, get_user, set_role
from dialoop.store.models import ApiKey, ComparisonTask, Conversation, Message, ModelVersion, Ranking
from dialoop.store.registry import register_model_version

HTML = {"Accept": "text/html"}
# a value for each path parameter of the admin routes
PATH_VALUES = {"filename": "report.json"}


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("admin-http") / "store.db"
    with live_web_server(f"sqlite:///{db}", tiny_model_dir) as server:
        engine = server.app.state.engine
        seeded = seed_store(engine, tiny_model_dir)  # tess's chats, ranked (and skipped) by theo
        # tina ranks the two ranked tasks: like theo on the first, the reverse on the second
        add_second_ranker(engine, seeded.tasks[:1], "tina", agree=True)
        add_second_ranker(engine, seeded.tasks[1:2], "tina", agree=False)
        yield server


@pytest.fixture(scope="module")
def root(live: Live) -> WebClient:
    return live.client("root")


def routes(router: APIRouter) -> list[tuple[str, str]]:
    """(method, concrete path) of each route of `router` (the app serves them: a 404 fails the tests)."""
    found = []
    for route in router.routes:
        assert isinstance(route, APIRoute)
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES.get(m.group(1), "1"), route.path)
        found.extend((method, path) for method in sorted(route.methods - {"HEAD"}))
    return found


def user_id(session: Session, name: str) -> int:
    user = get_user(session, name)
    assert user is not None
    return user.id


def post_form(client: WebClient, path: str, data: dict[str, Any], *, csrf: bool = True) -> httpx.Response:
    fields = {**data, "csrf_token": client.csrf} if csrf else dict(data)
    return client.http.post(path, data=fields, headers=HTML)


@pytest.mark.slow
def test_every_admin_route_is_for_admins_only(live: Live) -> None:
    admin_routes = routes(admin_router)
    assert len(admin_routes) >= 18 and ("POST", "/admin/iterations") in admin_routes
    anonymous = live.client()
    for name in ("alice", "tess"):
        client = live.client(name)
        for method, path in admin_routes:
            response = client.http.request(method, path, headers={**HTML, "X-CSRF-Token": client.csrf})
            assert response.status_code == 403, (name, method, path, response.status_code)
            assert "this needs the role admin" in response.text
    for method, path in admin_routes:
        response = anonymous.http.request(method, path, headers=HTML)
        if method == "GET":  # a page visit goes to the login page, and comes back after it
            assert response.status_code == 303, (method, path)
            assert response.headers["location"] == f"/login?next={path}"
        else:
            assert response.status_code == 401, (method, path)


def test_the_ab_page_is_for_trainers_and_admins(live: Live) -> None:
    ab_routes = routes(ab_router)
    assert {("GET", "/ab"), ("POST", "/ab/1")} <= set(ab_routes)
    alice = live.client("alice")
    for method, path in ab_routes:
        response = alice.http.request(method, path, headers={**HTML, "X-CSRF-Token": alice.csrf})
        assert response.status_code == 403, (method, path)
    for name in ("tess", "root"):
        assert live.client(name).page("/ab").status_code == 200


def test_state_changing_admin_routes_need_the_csrf_token(live: Live, root: WebClient) -> None:
    changing = [(m, p) for m, p in routes(admin_router) if m != "GET"] + [("POST", "/ab/1")]
    assert len(changing) >= 12
    for method, path in changing:
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            response = root.http.request(method, path, headers={**HTML, **headers})
            assert response.status_code == 403, (method, path, headers)
            assert "CSRF token missing or invalid" in response.text
    # a form with a wrong token is refused too, and nothing was created
    response = root.http.post(
        "/admin/users", data={"name": "mallory", "role": "admin", "csrf_token": "forged"}, headers=HTML
    )
    assert response.status_code == 403
    with session_scope(live.app.state.engine) as session:
        assert get_user(session, "mallory") is None


def tile(page: str, key: str) -> int:
    found = re.search(rf'data-count="{key}"><span class="value">(\d+)</span>', page)
    assert found, key
    return int(found.group(1))


def test_dashboard_counts_agreement_flags_and_reviews(live: Live, root: WebClient) -> None:
    page = root.page("/admin")
    assert page.status_code == 200
    html = page.text
    expected = {
        "demonstrations_draft": 1,
        "demonstrations_submitted": 4,
        "demonstrations_accepted": 0,
        "chats": 4,
        "tasks_open": 1,  # the skipped one still wants two rankings
        "tasks_done": 2,
        "rankings": 5,  # theo: 2 rankings and a skip; tina: 2 rankings
    }
    assert {key: tile(html, key) for key in expected} == expected
    # K=3: 3 pairs per task; tina agrees with theo on the first task and reverses the second
    assert re.search(r'id="agreement-overall">50.0%</strong>', html)
    assert "3 of 6 candidate pairs ordered the same way, over 2 tasks" in html
    for trainer, rankings, skips in (("theo", 2, 1), ("tina", 2, 0)):
        row = re.search(rf'<tr data-trainer="{trainer}">(.*?)</tr>', html, re.S)
        assert row, trainer
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        assert cells[:3] == [trainer, str(rankings), str(skips)] and cells[-1] == "50.0%"

    # one open flag: theo called a reply untrue
    with session_scope(live.app.state.engine) as session:
        [flag] = open_flags(session)
        flagged_id = flag.message.id
    assert f'data-message-id="{flagged_id}"' in html and "untrue" in html
    response = post_form(root, f"/admin/flags/{flagged_id}/resolve", {"outcome": "upheld", "note": "made up"})
    assert response.status_code == 303
    with session_scope(live.app.state.engine) as session:
        assert open_flags(session) == []
        review = session.get_one(Message, flagged_id).extra["flag_review"]
        assert (
            review["outcome"] == "upheld" and review["note"] == "made up" and review["kinds"] == {"untrue": 1}
        )
    assert f'data-message-id="{flagged_id}"' not in root.page("/admin").text
    assert post_form(root, f"/admin/flags/{flagged_id}/resolve", {"outcome": "upheld"}).status_code == 404
    assert post_form(root, f"/admin/flags/{flagged_id}/resolve", {"outcome": "maybe"}).status_code == 400

    # demonstrations: accept one, reject another; a second review of the same one is a conflict
    with session_scope(live.app.state.engine) as session:
        submitted = [
            c.id
            for c in session.query(Conversation)
            .filter_by(kind="demonstration", status="submitted")
            .order_by(Conversation.id)
        ]
    assert all(f'data-demonstration-id="{i}"' in html for i in submitted)
    assert (
        post_form(root, f"/admin/demonstrations/{submitted[0]}/review", {"decision": "accept"}).status_code
        == 303
    )
    assert (
        post_form(root, f"/admin/demonstrations/{submitted[1]}/review", {"decision": "reject"}).status_code
        == 303
    )
    again = post_form(root, f"/admin/demonstrations/{submitted[0]}/review", {"decision": "reject"})
    assert again.status_code == 409 and "is accepted, not submitted" in again.text
    assert (
        post_form(root, f"/admin/demonstrations/{submitted[2]}/review", {"decision": "x"}).status_code == 400
    )
    with session_scope(live.app.state.engine) as session:
        statuses = [session.get_one(Conversation, i).status for i in submitted]
    assert statuses == ["accepted", "rejected", "submitted", "submitted"]
    after = root.page("/admin").text
    assert tile(after, "demonstrations_submitted") == 2 and tile(after, "demonstrations_accepted") == 1


@pytest.mark.slow
def test_users_create_role_reset_and_delete(live: Live, root: WebClient) -> None:
    engine = live.app.state.engine
    # create with a one-time password, shown once
    root.page("/admin/users")
    created = post_form(root, "/admin/users", {"name": "carol", "role": "trainer", "password": ""})
    assert created.status_code == 200
    found = re.search(r'<code id="one-time-value">([^<]+)</code>', created.text)
    assert found
    one_time = found.group(1)
    assert "one-time-value" not in root.page("/admin/users").text
    carol = live.client()
    assert carol.login("carol", one_time).status_code == 303
    assert carol.page("/ab").status_code == 200  # a trainer

    duplicate = post_form(root, "/admin/users", {"name": "carol", "role": "user", "password": "x"})
    assert duplicate.status_code == 400 and "already exists" in duplicate.text
    bad_role = post_form(root, "/admin/users", {"name": "dave", "role": "boss", "password": "x"})
    assert bad_role.status_code == 400 and "invalid role" in bad_role.text

    with session_scope(engine) as session:
        carol_id, root_id = (user_id(session, name) for name in ("carol", "root"))
    changed = post_form(root, f"/admin/users/{carol_id}/role", {"role": "user"})
    assert changed.status_code == 200 and "carol is now user" in changed.text
    assert carol.page("/ab").status_code == 403
    own = post_form(root, f"/admin/users/{root_id}/role", {"role": "user"})
    assert own.status_code == 400 and "own role" in own.text

    # reset: a new one-time password; the old one and carol's open session stop working
    reset = post_form(root, f"/admin/users/{carol_id}/password", {})
    new_password = re.search(r'<code id="one-time-value">([^<]+)</code>', reset.text)
    assert reset.status_code == 200 and new_password and new_password.group(1) != one_time
    assert carol.page("/chat").status_code == 303
    assert live.client().login("carol", one_time).status_code == 400
    assert live.client().login("carol", new_password.group(1)).status_code == 303

    # delete: carol's account goes; what a deleted trainer ranked stays, without an owner
    with session_scope(engine) as session:
        theo = get_user(session, "theo")
        assert theo is not None
        theo_id, theo_rankings = theo.id, len(session.query(Ranking).filter_by(trainer_id=theo.id).all())
    assert post_form(root, f"/admin/users/{carol_id}/delete", {}).status_code == 200
    assert post_form(root, f"/admin/users/{theo_id}/delete", {}).status_code == 200
    with session_scope(engine) as session:
        assert get_user(session, "carol") is None and get_user(session, "theo") is None
        assert len(session.query(Ranking).filter_by(trainer_id=None).all()) == theo_rankings
    assert post_form(root, f"/admin/users/{carol_id}/delete", {}).status_code == 404
    yourself = post_form(root, f"/admin/users/{root_id}/delete", {})
    assert yourself.status_code == 400 and "your own account" in yourself.text
    assert live.client().login("root", PASSWORD).status_code == 303


def test_serving_another_version_swaps_the_model(live: Live, root: WebClient, tiny_model_dir: Path) -> None:
    with session_scope(live.app.state.engine) as session:
        register_model_version(session, name="tiny-copy", kind="policy", path=tiny_model_dir)
    page = root.page("/admin/versions")
    assert page.status_code == 200 and 'data-version="tiny-copy"' in page.text
    assert post_form(root, "/admin/versions/serve", {"name": "tiny-copy"}).status_code == 303
    assert live.app.state.registry.served == "tiny-copy"
    models = root.api("GET", "/api/chat/models").json()
    assert models["served"] == "tiny-copy"
    with session_scope(live.app.state.engine) as session:
        served = session.query(ModelVersion).filter_by(served=True).all()
        assert [v.name for v in served] == ["tiny-copy"]
    missing = post_form(root, "/admin/versions/serve", {"name": "no-such-version"})
    assert missing.status_code == 404 and "does not exist" in missing.text
    assert post_form(root, "/admin/versions/serve", {"name": "tiny"}).status_code == 303
    assert live.app.state.registry.served == "tiny"
    # a base version has no report card; a file outside a report never comes back
    assert root.page("/admin/versions/1/report/report.json").status_code == 404
    assert root.page("/admin/versions/1/report/..%2F..%2Fstore.db").status_code == 404


def test_the_iteration_form_refuses_bad_settings(live: Live, root: WebClient) -> None:
    page = root.page("/admin/iterations")
    assert page.status_code == 200 and 'id="iteration-form"' in page.text
    bad = post_form(root, "/admin/iterations", {"ppo_steps": "0", "sft_lr": "fast", "precision": "fp8"})
    assert bad.status_code == 400
    for problem in ("ppo_steps: Input should be greater than or equal to 1", "sft_lr:", "precision:"):
        assert problem in bad.text
    assert 'value="fast"' in bad.text  # the form keeps what was typed
    unknown = post_form(root, "/admin/jobs/99/cancel", {})
    assert unknown.status_code == 404
    assert root.api("GET", "/admin/api/jobs").json() == []


def test_the_last_admin_cannot_be_demoted_or_deleted(engine: Engine) -> None:
    with session_scope(engine) as session:
        root = create_user(session, "root", "admin", "pw")
        with pytest.raises(ValueError, match="only admin"):
            set_role(session, root, "trainer")
        with pytest.raises(ValueError, match="only admin"):
            delete_user(session, root)
        with pytest.raises(ValueError, match="invalid role"):
            set_role(session, root, "owner")
        second = create_user(session, "second", "user", "pw")
        set_role(session, second, "admin")
        set_role(session, root, "trainer")  # another admin is left
        assert (root.role, second.role) == ("trainer", "admin")


def test_deleting_a_user_keeps_their_conversations_and_rankings(engine: Engine) -> None:
    with session_scope(engine) as session:
        tess = create_user(session, "tess", "trainer", "pw")
        create_user(session, "root", "admin", "pw")
        chat = start_chat(session, tess)
        add_user_turn(session, chat, tess, "hello")
        create_api_key(session, tess)
        chat_id = chat.id
    with session_scope(engine) as session:
        user = get_user(session, "tess")
        assert user is not None
        delete_user(session, user)
    with session_scope(engine) as session:
        kept = session.get_one(Conversation, chat_id)
        assert kept.owner_id is None and [m.content for m in kept.messages] == ["hello"]
        assert session.query(ApiKey).count() == 0


@pytest.mark.slow
def test_a_flag_raised_after_a_review_is_open_again(engine: Engine, tiny_model_dir: Path) -> None:
    seeded = seed_store(engine, tiny_model_dir)
    with session_scope(engine) as session:
        root = create_user(session, "root", "admin", "pw")
        [flag] = open_flags(session)
        assert flag.kinds == {"untrue": 1} and flag.task_id == seeded.flagged_task
        resolve_flags(session, flag.message.id, root, "dismissed")
        assert open_flags(session) == []
        # tina flags the same reply as harmful: open again, with only the new flag
        task = session.get_one(ComparisonTask, seeded.flagged_task)
        index = next(c.index for c in task.candidates if c.message_id == flag.message.id)
        tina = create_user(session, "tina", "trainer", "pw")
        submit_ranking(session, task, tina, [c.index for c in task.candidates], flags={index: ["harmful"]})
        [again] = open_flags(session)
        assert again.message.id == flag.message.id and again.kinds == {"harmful": 1}
        with pytest.raises(PermissionError):
            resolve_flags(session, flag.message.id, tina, "upheld")
        resolve_flags(session, flag.message.id, root, "upheld")
        review = session.get_one(Message, flag.message.id).extra["flag_review"]
        assert review["outcome"] == "upheld" and len(review["ranking_ids"]) == 2
        with pytest.raises(LookupError):
            resolve_flags(session, flag.message.id, root, "upheld")

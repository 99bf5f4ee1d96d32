"""The trainer workspace over HTTP against a live server with a tiny model: who may reach it, CSRF on every
state-changing call, demonstrations with streamed suggestions and autosave, comparison tasks made on demand,
rankings (validation, ties, flags, all-bad, changing one's answer) and skips with a reason."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import func, select
from starlette.routing import BaseRoute
from trainer_web import VERSION, chat_once, live_trainer_server
from webclient import Live, WebClient, live_web_server

from dialoop.collect import display_order, review_demonstration
from dialoop.serve.trainer.pages import guide_html
from dialoop.store import ComparisonTask, Conversation, Message, ModelVersion, Ranking, User, session_scope
from dialoop.store.accounts import get_user

TRAINER_PREFIXES = ("/trainer", "/api/trainer", "/guide")


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("trainer-http") / "store.db"
    with live_trainer_server(f"sqlite:///{db}", tiny_model_dir) as server:
        yield server


def served_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route an app serves, into included routers, path parameters filled with 1."""
    for route in routes:
        if isinstance(route, APIRoute):
            path = re.sub(r"\{[^}]+\}", "1", prefix + route.path)
            yield from ((method, path) for method in sorted(route.methods))
        elif hasattr(route, "original_router"):  # FastAPI >= 0.165 keeps included routers as they are
            yield from served_routes(route.original_router.routes, prefix + route.include_context.prefix)


def trainer_routes(live: Live) -> list[tuple[str, str]]:
    return [(m, p) for m, p in served_routes(live.app.routes) if p.startswith(TRAINER_PREFIXES)]


def counts(live: Live) -> tuple[int, ...]:
    """What a refused call must not change."""
    with session_scope(live.app.state.engine) as session:
        return tuple(
            session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Conversation, Message, ComparisonTask, Ranking)
        ) + tuple(session.scalars(select(Message.content).order_by(Message.id)))


def new_demo(client: WebClient, **body: Any) -> dict[str, Any]:
    response = client.api("POST", "/api/trainer/demonstrations", body)
    assert response.status_code == 201, response.text
    demo: dict[str, Any] = response.json()
    return demo


def add_turn(client: WebClient, did: int, role: str, content: str, **extra: Any) -> dict[str, Any]:
    response = client.api(
        "POST", f"/api/trainer/demonstrations/{did}/turns", {"role": role, "content": content, **extra}
    )
    assert response.status_code == 201, response.text
    turn: dict[str, Any] = response.json()["turn"]
    return turn


def suggest(client: WebClient, did: int, **body: Any) -> tuple[int, list[dict[str, Any]]]:
    return client.stream(f"/api/trainer/demonstrations/{did}/suggestions", {"n": 3, "max_tokens": 6, **body})


def make_task(live: Live, owner: str, ranker: str) -> dict[str, Any]:
    """A chat of `owner` with the model, then the next task of `ranker` (made on demand from it)."""
    chat_once(live.client(owner), "Tell me about the sea.")
    data = live.client(ranker).api("POST", "/api/trainer/tasks/next").json()
    assert data["task"] is not None, data
    task: dict[str, Any] = data["task"]
    return task


# access control


@pytest.mark.slow
def test_every_trainer_route_is_403_for_a_user_even_with_a_valid_csrf_token(live: Live) -> None:
    routes = trainer_routes(live)
    assert len(routes) >= 20 and ("GET", "/guide") in routes
    before = counts(live)
    for name in ("alice", "bob"):
        client = live.client(name)
        for method, path in routes:
            if method == "GET" and not path.startswith("/api/"):
                response = client.page(path)
            else:
                response = client.api(method, path, {})
            assert response.status_code == 403, (name, method, path, response.status_code)
            assert "trainer or admin" in response.text
    assert counts(live) == before


def test_anonymous_pages_redirect_to_login_and_calls_get_401(live: Live) -> None:
    anon = live.client()
    page = anon.page("/trainer/rank")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/trainer/rank"
    assert anon.page("/guide").headers["location"] == "/login?next=/guide"
    anon.page("/login")  # an anonymous session with a valid token: the refusal is about the login
    before = counts(live)
    for method, path in trainer_routes(live):
        if method == "GET" and not path.startswith("/api/"):
            continue
        assert anon.api(method, path, {}).status_code == 401, (method, path)
    assert counts(live) == before


def test_a_trainer_cannot_reach_admin_routes(live: Live) -> None:
    admin_routes = [
        (m, p) for m, p in served_routes(live.app.routes) if p.startswith(("/admin", "/api/admin"))
    ]
    if not admin_routes:
        pytest.skip("no admin routes are registered in this build")
    tess = live.client("tess")
    for method, path in admin_routes:
        response = tess.page(path) if method == "GET" else tess.api(method, path, {})
        assert response.status_code == 403, (method, path, response.status_code)


def test_csrf_is_enforced_on_every_state_changing_trainer_route(live: Live) -> None:
    tess = live.client("tess")
    did = new_demo(tess)["id"]
    mid = add_turn(tess, did, "user", "Hello")["id"]
    changing = [(m, p) for m, p in trainer_routes(live) if m not in ("GET", "HEAD", "OPTIONS")]
    assert len(changing) >= 10
    before = counts(live)
    for method, path in changing:
        path = path.replace("/demonstrations/1", f"/demonstrations/{did}").replace(
            "/turns/1", f"/turns/{mid}"
        )
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            response = tess.http.request(method, path, json={"content": "x"}, headers=headers)
            assert response.status_code == 403 and "CSRF" in response.text, (method, path, response.text)
    # the form of the "New demonstration" button too
    assert tess.http.post("/trainer/demonstrations", data={"title": "t"}).status_code == 403
    assert counts(live) == before


# demonstrations


def test_a_demonstration_with_a_streamed_suggestion_inserted_edited_and_submitted(live: Live) -> None:
    tess = live.client("tess")
    demo = new_demo(tess, system_prompt="Be brief.")
    did = demo["id"]
    assert demo["status"] == "draft" and demo["editable"] and demo["turns"] == []
    add_turn(tess, did, "user", "What is 2 plus 3?")

    status, events = suggest(tess, did, n=3, temperature=0.9, seed=7)
    assert status == 200, events
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and events[0]["n"] == 3
    # streamed: text of every suggestion arrives as deltas before the end
    assert {e["index"] for e in events if e["type"] == "delta"} == {0, 1, 2}
    assert sorted(e["index"] for e in events if e["type"] == "end") == [0, 1, 2]
    suggestions = events[-1]["suggestions"]
    assert len(suggestions) == 3
    for s in suggestions:
        streamed = "".join(e["text"] for e in events if e["type"] == "delta" and e["index"] == s["index"])
        assert s["text"] == streamed
    gid = events[0]["generation_id"]
    # the same seed gives the same suggestions (choice i uses seed + i)
    _, again = suggest(tess, did, n=3, temperature=0.9, seed=7)
    assert [s["text"] for s in again[-1]["suggestions"]] == [s["text"] for s in suggestions]

    turn = add_turn(
        tess, did, "assistant", suggestions[1]["text"], suggestion={"generation_id": gid, "index": 1}
    )
    assert turn["from_suggestion"] and not turn["suggestion_edited"]
    # autosave: the trainer edits the inserted suggestion
    edited = "2 plus 3 is 5."
    saved = tess.api("PUT", f"/api/trainer/demonstrations/{did}/turns/{turn['id']}", {"content": edited})
    assert saved.status_code == 200 and saved.json()["turn"]["suggestion_edited"]
    with session_scope(live.app.state.engine) as session:
        row = session.get_one(Message, turn["id"])
        origin = row.extra["suggestion"]
        version = session.scalars(select(ModelVersion).where(ModelVersion.name == VERSION)).one()
        assert row.content == edited and origin["text"] == suggestions[1]["text"]
        assert origin["model_version_id"] == version.id and origin["sampling"]["temperature"] == 0.9
        assert origin["sampling"]["seed"] == 8 and origin["sampling"]["max_tokens"] == 6

    submitted = tess.api("POST", f"/api/trainer/demonstrations/{did}/submit")
    assert submitted.status_code == 200 and submitted.json()["status"] == "submitted"
    # still editable until an admin accepts it
    url = f"/api/trainer/demonstrations/{did}/turns/{turn['id']}"
    assert tess.api("PUT", url, {"content": "2 + 3 = 5."}).status_code == 200
    listed = tess.api("GET", "/api/trainer/demonstrations").json()
    assert [(d["id"], d["status"], d["turn_count"]) for d in listed][:1] == [(did, "submitted", 2)]
    with session_scope(live.app.state.engine) as session:
        admin = get_user(session, "root")
        assert admin is not None
        review_demonstration(session, session.get_one(Conversation, did), admin, accept=True)
    refused = tess.api("PUT", url, {"content": "changed after acceptance"})
    assert refused.status_code == 422 and "accepted" in refused.json()["detail"]
    assert tess.api("DELETE", f"/api/trainer/demonstrations/{did}").status_code == 422
    assert tess.api("POST", f"/api/trainer/demonstrations/{did}/suggestions", {"n": 1}).status_code == 422
    assert tess.api("GET", f"/api/trainer/demonstrations/{did}").json()["turns"][1]["content"] == "2 + 3 = 5."


@pytest.mark.slow
def test_a_suggestion_replaces_the_reply_and_stale_or_foreign_ones_are_refused(live: Live) -> None:
    tess, tom = live.client("tess"), live.client("tom")
    did = new_demo(tess)["id"]
    add_turn(tess, did, "user", "Name a colour.")
    mine = add_turn(tess, did, "assistant", "I was typing my own repl")
    _, events = suggest(tess, did, n=2)  # the last turn is the assistant's: they answer the user turn
    gid = events[0]["generation_id"]
    text = events[-1]["suggestions"][0]["text"]
    ref = {"generation_id": gid, "index": 0}
    # without replace_last the conversation goes on from the assistant turn: a stale suggestion
    stale = tess.api(
        "POST",
        f"/api/trainer/demonstrations/{did}/turns",
        {"role": "user", "content": "x", "suggestion": ref},
    )
    assert stale.status_code == 409 and "changed since" in stale.json()["detail"]
    replaced = add_turn(tess, did, "assistant", text, suggestion=ref, replace_last=True)
    turns = tess.api("GET", f"/api/trainer/demonstrations/{did}").json()["turns"]
    assert [t["content"] for t in turns] == ["Name a colour.", text]
    assert turns[1]["from_suggestion"] and replaced["from_suggestion"] and not mine["from_suggestion"]
    # another suggestion of the same set can still replace it
    add_turn(
        tess,
        did,
        "assistant",
        events[-1]["suggestions"][1]["text"],
        suggestion={**ref, "index": 1},
        replace_last=True,
    )

    add_turn(tess, did, "user", "Another one?")
    before = counts(live)
    cases = [
        (tess, {"role": "assistant", "content": "t", "suggestion": ref}, 409, "changed since"),
        (
            tess,
            {"role": "assistant", "content": "t", "suggestion": {**ref, "index": 5}},
            422,
            "2 suggestions",
        ),
        (
            tess,
            {"role": "assistant", "content": "t", "suggestion": {**ref, "generation_id": "nope"}},
            404,
            "no longer",
        ),
        (tess, {"role": "user", "content": "t"}, 422, "has role assistant"),
        (tess, {"role": "user", "content": "t", "replace_last": True}, 422, "nothing to replace"),
        (tess, {"role": "assistant", "content": "x" * 40_000}, 413, "limit"),
        (tom, {"role": "assistant", "content": "t"}, 404, "no demonstration"),
    ]
    for client, body, status, words in cases:
        response = client.api("POST", f"/api/trainer/demonstrations/{did}/turns", body)
        assert response.status_code == status and words in response.text, (body, response.text)
    assert counts(live) == before


def test_suggestion_requests_are_validated(live: Live) -> None:
    tess, tom = live.client("tess"), live.client("tom")
    did = new_demo(tess)["id"]
    url = f"/api/trainer/demonstrations/{did}/suggestions"
    first = tess.api("POST", url, {"n": 2})
    assert first.status_code == 422 and "user's first turn" in first.json()["detail"]
    add_turn(tess, did, "user", "Hi")
    for body, words in [
        ({"n": 9}, "at most 8"),
        ({"n": 0}, "greater than or equal"),
        ({"n": 2, "temperature": 3}, "less than or equal"),
        ({"n": 2, "max_tokens": 100_000}, "limit"),
    ]:
        response = tess.api("POST", url, body)
        assert response.status_code == 422 and words in response.text, (body, response.text)
    assert tess.api("POST", url, {"n": 2, "max_tokens": 2047}).status_code == 413  # beyond the context
    assert tom.api("POST", url, {"n": 2}).status_code == 404


def test_stop_cancels_suggestions_on_the_server(live: Live) -> None:
    tess = live.client("tess")
    did = new_demo(tess)["id"]
    add_turn(tess, did, "user", "Write a long story.")
    events: list[dict[str, Any]] = []
    started = threading.Event()

    def read() -> None:
        with tess.http.stream(
            "POST",
            f"/api/trainer/demonstrations/{did}/suggestions",
            json={"n": 2, "max_tokens": 1800},
            headers={"X-CSRF-Token": tess.csrf},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if events[-1]["type"] == "delta":
                        started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    gid = events[0]["generation_id"]
    assert live.client("tom").api("POST", f"/api/trainer/suggestions/{gid}/stop").status_code == 404
    assert tess.api("POST", f"/api/trainer/suggestions/{gid}/stop").status_code == 204
    reader.join(30)
    assert not reader.is_alive()
    assert {e["finish_reason"] for e in events if e["type"] == "end"} == {"cancelled"}
    assert gid in live.worker.stats.cancelled_ids
    done = events[-1]
    assert done["type"] == "done" and all(not s["finished"] for s in done["suggestions"])


def test_turns_autosave_remove_and_submit_rules(live: Live) -> None:
    tess = live.client("tess")
    did = new_demo(tess, title="Greeting")["id"]
    user = add_turn(tess, did, "user", "He")
    url = f"/api/trainer/demonstrations/{did}"
    for text in ("Hell", "Hello the", "Hello there!"):  # what the page sends as the trainer types
        assert tess.api("PUT", f"{url}/turns/{user['id']}", {"content": text}).status_code == 200
    reply = add_turn(tess, did, "assistant", "")
    submit = tess.api("POST", f"{url}/submit")
    assert submit.status_code == 422 and "empty" in submit.json()["detail"]
    # only the last turn can be removed, and only when named
    wrong = tess.api("DELETE", f"{url}/turns/{user['id']}")
    assert wrong.status_code == 409 and "not the last" in wrong.json()["detail"]
    assert tess.api("DELETE", f"{url}/turns/{reply['id']}").status_code == 204
    submit = tess.api("POST", f"{url}/submit")
    assert submit.status_code == 422 and "end with an assistant turn" in submit.json()["detail"]
    add_turn(tess, did, "assistant", "Hi! How can I help?")
    assert tess.api("POST", f"{url}/submit").json()["status"] == "submitted"
    data = tess.api("GET", url).json()
    assert data["title"] == "Greeting" and [t["content"] for t in data["turns"]] == [
        "Hello there!",
        "Hi! How can I help?",
    ]
    # another trainer neither sees nor changes it
    tom = live.client("tom")
    assert tom.api("GET", url).status_code == 404
    assert tom.api("PUT", f"{url}/turns/{user['id']}", {"content": "mine now"}).status_code == 404
    assert did not in [d["id"] for d in tom.api("GET", "/api/trainer/demonstrations").json()]
    # a draft can be deleted
    other = new_demo(tess)["id"]
    assert tess.api("DELETE", f"/api/trainer/demonstrations/{other}").status_code == 204
    assert tess.api("GET", f"/api/trainer/demonstrations/{other}").status_code == 404


def test_the_new_demonstration_form_opens_the_editor(live: Live) -> None:
    tess = live.client("tess")
    tess.page("/trainer/demonstrations")
    response = tess.http.post(
        "/trainer/demonstrations",
        data={"title": "From the form", "system_prompt": "", "csrf_token": tess.csrf},
    )
    assert response.status_code == 303
    did = int(response.headers["location"].rsplit("/", 1)[1])
    page = tess.page(response.headers["location"])
    assert (
        page.status_code == 200
        and 'id="demo-app"' in page.text
        and f'data-demonstration-id="{did}"' in page.text
    )
    assert "From the form" in tess.page("/trainer/demonstrations").text


# comparison tasks


def test_tasks_are_made_on_demand_and_never_from_ones_own_chat(live: Live) -> None:
    task = make_task(live, "tess", "tom")
    assert task["k"] == 4 and task["overlap"] == 2 and task["answer"] is None
    assert task["context"][-1] == {"role": "user", "content": "Tell me about the sea."}
    assert sorted(c["index"] for c in task["candidates"]) == [0, 1, 2, 3]
    with session_scope(live.app.state.engine) as session:
        row = session.get_one(ComparisonTask, task["id"])
        tom = session.get_one(User, get_user(session, "tom").id)  # type: ignore[union-attr]
        assert [c["index"] for c in task["candidates"]] == [c.index for c in display_order(row, tom)]
        owner = row.context_message.conversation.owner
        assert owner is not None and owner.name == "tess"
        texts = {c.message.content for c in row.candidates}
    assert {c["content"] for c in task["candidates"]} == texts
    # tess made it: she is never offered it, nor may she open it
    tess = live.client("tess")
    offered = tess.api("POST", "/api/trainer/tasks/next").json()["task"]
    assert offered is None or offered["id"] != task["id"]
    assert tess.api("GET", f"/api/trainer/tasks/{task['id']}").status_code == 403
    mine = tess.api("POST", f"/api/trainer/tasks/{task['id']}/ranking", {"order": [0, 1, 2, 3]})
    assert mine.status_code == 403 and "own chat" in mine.json()["detail"]


def test_ranking_validation_errors_are_4xx_with_a_message(live: Live) -> None:
    task = make_task(live, "tess", "tom")
    tom = live.client("tom")
    url = f"/api/trainer/tasks/{task['id']}"
    before = counts(live)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("ranking", {"order": [0, 1, 2]}, "exactly once"),
        ("ranking", {"order": [0, 1, 2, 2]}, "exactly once"),
        ("ranking", {"order": [0, 1, 2, 7]}, "exactly once"),
        ("ranking", {"order": []}, "exactly once"),
        ("ranking", {"order": [0, 1, 2, 3], "ties": [[0, 2]]}, "next to each other"),
        ("ranking", {"order": [0, 1, 2, 3], "ties": [[1, 1]]}, "two different"),
        ("ranking", {"order": [0, 1, 2, 3], "flags": {"1": ["boring"]}}, "unknown flag"),
        ("ranking", {"order": [0, 1, 2, 3], "flags": {"9": ["harmful"]}}, "candidates are 0..3"),
        ("ranking", {"order": "first"}, "valid list"),
        ("skip", {"reason": "   "}, "needs a reason"),
        ("skip", {}, "Field required"),
    ]
    for action, body, words in cases:
        response = tom.api("POST", f"{url}/{action}", body)
        assert response.status_code == 422 and words in response.text, (body, response.text)
    assert tom.api("POST", "/api/trainer/tasks/999999/ranking", {"order": [0]}).status_code == 404
    assert counts(live) == before


@pytest.mark.slow
def test_rankings_with_ties_flags_all_bad_overlap_and_changing_ones_answer(live: Live) -> None:
    task = make_task(live, "tess", "tom")
    tid = task["id"]
    url = f"/api/trainer/tasks/{tid}"
    tom, root = live.client("tom"), live.client("root")
    shown = [c["index"] for c in task["candidates"]]
    order = [shown[2], shown[0], shown[3], shown[1]]
    saved = tom.api(
        "POST",
        f"{url}/ranking",
        {"order": order, "ties": [[order[1], order[2]]], "flags": {str(order[3]): ["untrue"]}},
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["ties"] == [[order[1], order[2]]] and saved.json()["flags"] == {
        str(order[3]): ["untrue"]
    }
    # tom is not offered it again; the admin is (overlap 2), and finishes it
    assert (tom.api("POST", "/api/trainer/tasks/next").json()["task"] or {}).get("id") != tid
    assert root.api("GET", url).json()["id"] == tid
    assert root.api("POST", f"{url}/ranking", {"order": [], "all_bad": True}).status_code == 200
    with session_scope(live.app.state.engine) as session:
        row = session.get_one(ComparisonTask, tid)
        assert row.status == "done" and len(row.rankings) == 2
    # a third trainer cannot add a ranking to a finished task
    late = live.client("tina").api("POST", f"{url}/ranking", {"order": order})
    assert late.status_code == 409 and "all the rankings" in late.json()["detail"]
    # tom changes his answer: reordered, then a skip; still one answer of his
    again = tom.api("GET", url).json()
    assert again["answer"]["order"] == order
    assert tom.api("POST", f"{url}/ranking", {"order": list(reversed(order))}).json()["order"] == list(
        reversed(order)
    )
    skipped = tom.api(
        "POST", f"{url}/skip", {"reason": "I don't know enough about this topic", "flags": {"0": ["harmful"]}}
    )
    assert (
        skipped.status_code == 200 and skipped.json()["skip_reason"] == "I don't know enough about this topic"
    )
    with session_scope(live.app.state.engine) as session:
        row = session.get_one(ComparisonTask, tid)
        toms = [r for r in row.rankings if r.trainer_id == get_user(session, "tom").id]  # type: ignore[union-attr]
        assert len(toms) == 1 and toms[0].order == [] and toms[0].flags == {"0": ["harmful"]}
        assert row.status == "open"  # a skip does not count towards the overlap
    answers = tom.api("GET", "/api/trainer/rankings").json()
    assert answers[0]["task_id"] == tid and answers[0]["skip_reason"]
    page = tom.page("/trainer/rankings")
    assert page.status_code == 200 and f'href="/trainer/rank/{tid}"' in page.text and "skipped" in page.text
    assert tom.page(f"/trainer/rank/{tid}").status_code == 200


@pytest.mark.slow
def test_no_task_is_offered_when_no_chat_is_waiting(tiny_model_dir: Path, sqlite_url: str) -> None:
    with live_trainer_server(sqlite_url, tiny_model_dir) as server:
        data = server.client("tom").api("POST", "/api/trainer/tasks/next").json()
        assert data["task"] is None and "chat with the model" in data["message"]
        chat_once(server.client("tom"), "Hello")  # his own chat: a task is made, but not for him
        assert server.client("tom").api("POST", "/api/trainer/tasks/next").json()["task"] is None
        task = server.client("tess").api("POST", "/api/trainer/tasks/next").json()["task"]
        assert task is not None and task["context"][-1]["content"] == "Hello"


# pages and the guide


@pytest.mark.slow
def test_the_workspace_pages_render_with_the_guide_one_click_away(live: Live) -> None:
    tess = live.client("tess")
    did = new_demo(tess)["id"]
    for path in (
        "/trainer",
        "/trainer/demonstrations",
        f"/trainer/demonstrations/{did}",
        "/trainer/rank",
        "/trainer/rankings",
    ):
        page = tess.page(path)
        assert page.status_code == 200, path
        assert 'href="/guide"' in page.text and "script-src 'self'" in page.headers["content-security-policy"]
        assert "<script>" not in page.text and " style=" not in page.text
    assert 'href="/trainer"' in tess.page("/chat").text  # the top bar links the workspace
    assert 'href="/trainer"' not in live.client("alice").page("/chat").text
    assert "dialoop export" in live.client("root").page("/trainer").text  # admins see how to export
    guide = tess.page("/guide")
    assert guide.status_code == 200 and "<h1>Labeling guide</h1>" in guide.text and "<table>" in guide.text


def test_the_guide_is_rendered_without_any_html_from_the_file(tmp_path: Path) -> None:
    source = tmp_path / "guide.md"
    source.write_text(
        "# Guide\n\n<script>alert(1)</script>\n\n[bad](javascript:alert(2)) [good](https://example.com)\n\n"
        '<img src=x onerror="alert(3)">\n'
    )
    html = str(guide_html(source))
    assert (
        "<script" not in html
        and "<img" not in html
        and "javascript:" not in html.replace("[bad](javascript:", "")
    )
    assert "&lt;script&gt;" in html and '<a href="https://example.com"' in html


@pytest.mark.slow
def test_suggestions_of_an_unregistered_base_model_are_credited_to_a_new_base_version(
    tiny_model_dir: Path, sqlite_url: str
) -> None:
    with live_web_server(sqlite_url, tiny_model_dir, default_max_tokens=8) as server:
        tess = server.client("tess")
        did = new_demo(tess)["id"]
        add_turn(tess, did, "user", "Hi")
        _, events = suggest(tess, did, n=1)
        turn = add_turn(
            tess,
            did,
            "assistant",
            events[-1]["suggestions"][0]["text"],
            suggestion={"generation_id": events[0]["generation_id"], "index": 0},
        )
        with session_scope(server.app.state.engine) as session:
            version = session.scalars(select(ModelVersion)).one()
            # registered under the name it is served as
            assert version.name == "tiny" and Path(version.path).resolve() == tiny_model_dir.resolve()
            assert session.get_one(Message, turn["id"]).extra["suggestion"]["model_version_id"] == version.id


@pytest.mark.slow
def test_demonstration_and_ranking_flow_on_sqlite_and_postgresql(db_url: str, tiny_model_dir: Path) -> None:
    with live_trainer_server(db_url, tiny_model_dir) as server:
        tess, tom, tina, root = (server.client(n) for n in ("tess", "tom", "tina", "root"))
        did = new_demo(tess)["id"]
        add_turn(tess, did, "user", "Say hi.")
        _, events = suggest(tess, did, n=2)
        ref = {"generation_id": events[0]["generation_id"], "index": 1}
        turn = add_turn(tess, did, "assistant", events[-1]["suggestions"][1]["text"], suggestion=ref)
        url = f"/api/trainer/demonstrations/{did}"
        assert tess.api("PUT", f"{url}/turns/{turn['id']}", {"content": "Hi!"}).status_code == 200
        assert tess.api("POST", f"{url}/submit").json()["status"] == "submitted"

        task = make_task(server, "tess", "tom")
        shown = [c["index"] for c in task["candidates"]]
        tid = task["id"]
        body = {"order": shown, "ties": [shown[:2]], "flags": {str(shown[0]): ["private_data", "harmful"]}}
        assert tom.api("POST", f"/api/trainer/tasks/{tid}/ranking", body).status_code == 200
        assert tina.api("POST", f"/api/trainer/tasks/{tid}/skip", {"reason": "unclear"}).status_code == 200
        assert (
            root.api("POST", f"/api/trainer/tasks/{tid}/ranking", {"order": shown[::-1]}).status_code == 200
        )
        assert "<span>1 ranked</span> · <span>0 skipped</span>" in tom.page("/trainer").text
        assert "<span>0 ranked</span> · <span>1 skipped</span>" in tina.page("/trainer").text
        assert "<span>1 submitted</span>" in tess.page("/trainer").text
        with session_scope(server.app.state.engine) as session:
            conv = session.get_one(Conversation, did)
            assert conv.status == "submitted" and [m.content for m in conv.messages] == ["Say hi.", "Hi!"]
            row = session.get_one(ComparisonTask, tid)
            assert row.status == "done" and len(row.candidates) == 4
            answers = {r.trainer_id: r for r in row.rankings}
            tom_id = get_user(session, "tom").id  # type: ignore[union-attr]
            assert answers[tom_id].ties == [shown[:2]]
            assert answers[tom_id].flags == {str(shown[0]): ["harmful", "private_data"]}
            assert sorted(r.skip_reason or "" for r in row.rankings) == ["", "", "unclear"]

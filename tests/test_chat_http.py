"""The chat over HTTP against a live server with a tiny model: access control on every route, the chat
operations (stream, stop, regenerate, edit, feedback), server-side cancellation and bad input."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from webclient import ACCOUNTS, PASSWORD, Live, WebClient, live_web_server, make_web_app

from dialoop.collect.tasks import eligible_originals
from dialoop.store import ComparisonTask, Conversation, Feedback, Message, session_scope
from dialoop.store.accounts import get_user
from dialoop.store.trees import add_message


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("chat-http") / "store.db"
    with live_web_server(f"sqlite:///{db}", tiny_model_dir) as server:
        yield server


def seed_chat(live: Live, owner: str, title: str = "private plans") -> dict[str, int]:
    """A chat of `owner` with a user message and two sibling replies, written straight into the store."""
    with session_scope(live.app.state.engine) as session:
        user = get_user(session, owner)
        assert user is not None
        conv = Conversation(owner_id=user.id, kind="chat", title=title, system_prompt="Be brief.")
        session.add(conv)
        session.flush()
        question = add_message(session, conv, None, "user", "What is my secret?", author_user_id=user.id)
        first = add_message(session, conv, question, "assistant", "The first reply.", extra={"model": "tiny"})
        second = add_message(
            session, conv, question, "assistant", "The second reply.", extra={"model": "tiny"}
        )
        return {"cid": conv.id, "uid": question.id, "aid": first.id, "aid2": second.id}


def snapshot(live: Live, cid: int) -> tuple[Any, ...]:
    """What another user must not be able to change: title, prompt, messages, feedback."""
    with session_scope(live.app.state.engine) as session:
        conv = session.get(Conversation, cid)
        assert conv is not None
        messages = session.scalar(
            select(func.count()).select_from(Message).where(Message.conversation_id == cid)
        )
        feedback = session.scalar(
            select(func.count())
            .select_from(Feedback)
            .join(Message, Message.id == Feedback.message_id)
            .where(Message.conversation_id == cid)
        )
        return conv.title, conv.system_prompt, messages, feedback


# every route that touches one conversation: (name, method, path, body); {cid}, {uid}, {aid}, {aid2} filled in
CONVERSATION_ROUTES: list[tuple[str, str, str, Any]] = [
    ("page", "GET", "/chat/{cid}", None),
    ("read", "GET", "/api/chat/conversations/{cid}", None),
    ("rename", "PATCH", "/api/chat/conversations/{cid}", {"title": "stolen"}),
    ("system prompt", "PATCH", "/api/chat/conversations/{cid}", {"system_prompt": "Obey me."}),
    ("delete", "DELETE", "/api/chat/conversations/{cid}", None),
    (
        "post",
        "POST",
        "/api/chat/conversations/{cid}/messages",
        {"parent_id": "{aid}", "content": "hi", "max_tokens": 2},
    ),
    (
        "edit",
        "POST",
        "/api/chat/conversations/{cid}/messages",
        {"parent_id": None, "content": "edit", "max_tokens": 2},
    ),
    ("regenerate", "POST", "/api/chat/conversations/{cid}/messages/{uid}/replies", {"max_tokens": 2}),
    ("thumbs", "PUT", "/api/chat/conversations/{cid}/messages/{aid}/feedback", {"value": 1}),
    ("preference", "POST", "/api/chat/conversations/{cid}/messages/{aid}/preference", {"other_id": "{aid2}"}),
    ("stop", "POST", "/api/chat/conversations/{cid}/generations/unknown/stop", None),
]


def fill(template: Any, ids: dict[str, int]) -> Any:
    if isinstance(template, str):
        if template.startswith("{") and template.endswith("}") and template[1:-1] in ids:
            return ids[template[1:-1]]
        return template.format(**ids)
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    return template


def call(client: WebClient, method: str, path: str, body: Any) -> int:
    if method == "GET" and not path.startswith("/api/"):
        return client.page(path).status_code
    return client.api(method, path, body).status_code


@pytest.mark.parametrize("intruder", ["root", "tess", "bob"])
@pytest.mark.slow
def test_another_user_of_any_role_gets_404_on_every_route_and_changes_nothing(
    live: Live, intruder: str
) -> None:
    ids = seed_chat(live, "alice")
    before = snapshot(live, ids["cid"])
    client = live.client(intruder)
    for name, method, path, body in CONVERSATION_ROUTES:
        status = call(client, method, fill(path, ids), fill(body, ids))
        assert status == 404, f"{ACCOUNTS[intruder]} {intruder} on {name}: {status}"
    assert snapshot(live, ids["cid"]) == before
    listed = client.api("GET", "/api/chat/conversations").json()
    assert ids["cid"] not in [c["id"] for c in listed]


def test_anonymous_pages_redirect_to_login_and_calls_get_401(live: Live) -> None:
    ids = seed_chat(live, "alice")
    before = snapshot(live, ids["cid"])
    anon = live.client()
    page = anon.page("/chat")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/chat"
    assert anon.page("/chat/{cid}".format(**ids)).headers["location"] == "/login?next=/chat/{cid}".format(
        **ids
    )
    anon.page("/login")  # an anonymous session with a valid token: the refusal is about the login
    for name, method, path, body in CONVERSATION_ROUTES[1:]:
        status = anon.api(method, fill(path, ids), fill(body, ids)).status_code
        assert status == 401, f"anonymous {name}: {status}"
    for method, path in [("GET", "/api/chat/models"), ("GET", "/api/chat/conversations")]:
        assert anon.api(method, path).status_code == 401
    assert anon.api("POST", "/api/chat/conversations", {}).status_code == 401
    assert snapshot(live, ids["cid"]) == before


@pytest.mark.parametrize("name", ["root", "tess", "alice"])
@pytest.mark.slow
def test_each_role_uses_its_own_chat_end_to_end(live: Live, name: str, tiny_model_dir: Path) -> None:
    client = live.client(name)
    assert client.page("/chat").status_code == 200
    models = client.api("GET", "/api/chat/models").json()
    assert models["served"] == "tiny" and [m["name"] for m in models["models"]] == ["tiny"]

    created = client.api("POST", "/api/chat/conversations", {"system_prompt": "Answer in French."})
    assert created.status_code == 201
    cid = created.json()["id"]
    assert client.page(f"/chat/{cid}").status_code == 200

    status, events = client.stream(
        f"/api/chat/conversations/{cid}/messages", {"parent_id": None, "content": "Bonjour", "max_tokens": 6}
    )
    assert status == 200
    assert [e["type"] for e in events][:2] == ["user", "start"] and events[-1]["type"] == "done"
    question, reply = events[0]["message"], events[-1]["message"]
    assert reply["content"] == "".join(e["text"] for e in events if e["type"] == "delta")
    assert reply["parent_id"] == question["id"] and reply["model"] == "tiny"
    with session_scope(live.app.state.engine) as session:
        stored = session.get_one(Message, reply["id"])
        # the plainly served model is credited as a base version: a trainer's chat feeds comparison tasks
        assert stored.author_model is not None and stored.author_model.path == str(tiny_model_dir)
        assert ((reply["id"], question["id"]) in eligible_originals(session)) == (name != "alice")

    status, events = client.stream(
        f"/api/chat/conversations/{cid}/messages/{question['id']}/replies", {"max_tokens": 4}
    )
    assert status == 200 and events[-1]["type"] == "done"
    sibling = events[-1]["message"]
    assert sibling["parent_id"] == question["id"] and sibling["id"] != reply["id"]

    status, events = client.stream(
        f"/api/chat/conversations/{cid}/messages", {"parent_id": None, "content": "Salut", "max_tokens": 3}
    )
    assert status == 200
    edited = events[0]["message"]
    assert edited["parent_id"] is None and edited["id"] != question["id"]

    thumbs = client.api("PUT", f"/api/chat/conversations/{cid}/messages/{reply['id']}/feedback", {"value": 1})
    assert thumbs.status_code == 200
    pref = client.api(
        "POST",
        f"/api/chat/conversations/{cid}/messages/{sibling['id']}/preference",
        {"other_id": reply["id"]},
    )
    assert pref.status_code == 200
    assert (
        client.api("PATCH", f"/api/chat/conversations/{cid}", {"title": "Renamed"}).json()["title"]
        == "Renamed"
    )

    tree = client.api("GET", f"/api/chat/conversations/{cid}").json()
    assert tree["conversation"]["title"] == "Renamed"
    assert tree["conversation"]["system_prompt"] == "Answer in French."
    by_id = {m["id"]: m for m in tree["messages"]}
    assert len(by_id) == 5  # two roots (original and edit), two replies to the first, one to the edit
    assert by_id[reply["id"]]["thumbs"] == 1 and by_id[sibling["id"]]["thumbs"] == 0
    assert next(c["id"] for c in client.api("GET", "/api/chat/conversations").json()) == cid

    assert client.api("DELETE", f"/api/chat/conversations/{cid}").status_code == 204
    assert client.api("GET", f"/api/chat/conversations/{cid}").status_code == 404
    with session_scope(live.app.state.engine) as session:
        assert (
            session.scalar(select(func.count()).select_from(Message).where(Message.conversation_id == cid))
            == 0
        )


def test_deleting_a_chat_used_by_comparison_tasks_hides_it_and_keeps_the_data(live: Live) -> None:
    ids = seed_chat(live, "tess")
    with session_scope(live.app.state.engine) as session:
        session.add(ComparisonTask(context_message_id=ids["aid"]))
    client = live.client("tess")
    assert client.api("DELETE", "/api/chat/conversations/{cid}".format(**ids)).status_code == 204
    assert client.api("GET", "/api/chat/conversations/{cid}".format(**ids)).status_code == 404
    assert ids["cid"] not in [c["id"] for c in client.api("GET", "/api/chat/conversations").json()]
    with session_scope(live.app.state.engine) as session:
        conv = session.get(Conversation, ids["cid"])
        assert conv is not None and conv.status == "deleted" and len(conv.messages) == 3


@pytest.mark.slow
def test_chat_tree_feedback_and_delete_on_sqlite_and_postgresql(db_url: str, tiny_model_dir: Path) -> None:
    """The store side of the chat routes (no generation) on both databases."""
    app = make_web_app(db_url, tiny_model_dir)
    try:
        client = TestClient(app, follow_redirects=False)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text)
        assert csrf
        login = {"name": "alice", "password": PASSWORD, "csrf_token": csrf.group(1)}
        assert client.post("/login", data=login).status_code == 303
        page = client.get("/chat", headers={"Accept": "text/html"}).text
        found = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert found
        headers = {"X-CSRF-Token": found.group(1)}
        live = Live("", app)
        ids = seed_chat(live, "alice")
        base = "/api/chat/conversations/{cid}".format(**ids)
        assert (
            client.put(
                f"{base}/messages/{ids['aid']}/feedback", json={"value": 1}, headers=headers
            ).status_code
            == 200
        )
        body = {"other_id": ids["aid"]}
        assert (
            client.post(f"{base}/messages/{ids['aid2']}/preference", json=body, headers=headers).status_code
            == 200
        )
        tree = client.get(base).json()
        assert [(m["id"], m["parent_id"], m["thumbs"]) for m in tree["messages"]] == [
            (ids["uid"], None, 0),
            (ids["aid"], ids["uid"], 1),
            (ids["aid2"], ids["uid"], 0),
        ]
        assert client.patch(base, json={"title": "Kept"}, headers=headers).json()["title"] == "Kept"
        assert client.delete(base, headers=headers).status_code == 204
        with session_scope(app.state.engine) as session:
            assert session.get(Conversation, ids["cid"]) is None
            assert session.scalar(select(func.count()).select_from(Message)) == 0
            assert session.scalar(select(func.count()).select_from(Feedback)) == 0
    finally:
        app.state.engine.dispose()


def test_reply_is_generated_from_the_branch_and_the_system_prompt(live: Live) -> None:
    """The prompt is the system prompt plus the path to the parent: a sibling branch is not in it."""
    ids = seed_chat(live, "alice")
    client = live.client("alice")
    seen: list[list[dict[str, str]]] = []
    worker = live.worker
    original = worker.submit

    async def spy(messages: Any = None, **kwargs: Any) -> Any:
        seen.append(messages)
        return await original(messages, **kwargs)

    worker.submit = spy  # type: ignore[method-assign]
    try:
        status, _ = client.stream(
            "/api/chat/conversations/{cid}/messages".format(**ids),
            {"parent_id": ids["aid2"], "content": "And now?", "max_tokens": 2},
        )
    finally:
        del worker.submit
    assert status == 200
    assert seen == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is my secret?"},
            {"role": "assistant", "content": "The second reply."},
            {"role": "user", "content": "And now?"},
        ]
    ]


def test_feedback_rows_thumbs_replace_and_preference_between_siblings(live: Live) -> None:
    ids = seed_chat(live, "alice")
    client = live.client("alice")
    base = "/api/chat/conversations/{cid}/messages".format(**ids)
    assert client.api("PUT", f"{base}/{ids['aid']}/feedback", {"value": 1}).status_code == 200
    assert client.api("PUT", f"{base}/{ids['aid']}/feedback", {"value": -1}).status_code == 200
    assert client.api("POST", f"{base}/{ids['aid2']}/preference", {"other_id": ids["aid"]}).status_code == 200
    assert client.api("POST", f"{base}/{ids['aid']}/preference", {"other_id": ids["aid2"]}).status_code == 200
    with session_scope(live.app.state.engine) as session:
        rows = session.scalars(
            select(Feedback).where(Feedback.message_id.in_([ids["aid"], ids["aid2"]])).order_by(Feedback.id)
        ).all()
        assert [(f.kind, f.message_id, f.value, f.other_message_id) for f in rows] == [
            ("thumbs", ids["aid"], -1, None),
            ("ab", ids["aid"], 1, ids["aid2"]),
        ]
    assert client.api("PUT", f"{base}/{ids['aid']}/feedback", {"value": 0}).status_code == 200
    assert (
        client.api("PUT", f"{base}/{ids['uid']}/feedback", {"value": 1}).status_code == 422
    )  # a user message
    assert client.api("PUT", f"{base}/{ids['aid']}/feedback", {"value": 2}).status_code == 422
    assert client.api("POST", f"{base}/{ids['aid']}/preference", {"other_id": ids["aid"]}).status_code == 422


def _start_long_reply(client: WebClient, cid: int, parent_id: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """Open a long streamed reply and read until its first text: (context manager, response, start event)."""
    ctx = client.http.stream(
        "POST",
        f"/api/chat/conversations/{cid}/messages",
        json={"parent_id": parent_id, "content": "Tell me a very long story.", "max_tokens": 1500},
        headers={"X-CSRF-Token": client.csrf},
    )
    response = ctx.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    start: dict[str, Any] = {}
    for line in lines:
        if line.startswith("data:"):
            event = json.loads(line[5:])
            if event["type"] == "start":
                start = event
            if event["type"] == "delta":
                break
    start["lines"] = lines
    return ctx, response, start


def test_stop_cancels_the_generation_on_the_server_and_keeps_the_text(live: Live) -> None:
    ids = seed_chat(live, "alice")
    alice = live.client("alice")
    ctx, _, start = _start_long_reply(alice, ids["cid"], ids["aid"])
    gid = start["generation_id"]
    try:
        stop_url = "/api/chat/conversations/{cid}/generations/".format(**ids) + gid + "/stop"
        # not bob's generation, and not without the CSRF token
        assert live.client("bob").api("POST", stop_url).status_code == 404
        assert alice.api("POST", stop_url, csrf=False).status_code == 403
        assert alice.api("POST", stop_url).status_code == 204
        rest = [json.loads(line[5:]) for line in start["lines"] if line.startswith("data:")]
    finally:
        ctx.__exit__(None, None, None)
    done = rest[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert gid in live.worker.stats.cancelled_ids
    reply = done["message"]
    assert reply["stopped"] is True and reply["finished"] is False and reply["content"]
    with session_scope(live.app.state.engine) as session:
        row = session.get(Message, reply["id"])
        assert row is not None and row.extra["stopped"] and row.extra["completion_tokens"] < 1500


def test_a_client_that_goes_away_cancels_its_generation(live: Live) -> None:
    ids = seed_chat(live, "alice")
    alice = live.client("alice")
    ctx, _, start = _start_long_reply(alice, ids["cid"], ids["aid"])
    ctx.__exit__(None, None, None)  # closes the connection mid-reply
    deadline = time.monotonic() + 20
    while start["generation_id"] not in live.worker.stats.cancelled_ids:
        assert time.monotonic() < deadline, "the generation was not cancelled after the client left"
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while True:  # the partial reply is kept, marked as stopped
        with session_scope(live.app.state.engine) as session:
            replies = session.scalars(
                select(Message).where(Message.conversation_id == ids["cid"], Message.role == "assistant")
            ).all()
            stopped = [m for m in replies if m.extra.get("stopped")]
        if stopped or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(stopped) == 1 and stopped[0].content


def test_bad_input_is_refused_with_a_message_and_saves_nothing(live: Live) -> None:
    ids = seed_chat(live, "alice")
    client = live.client("alice")
    before = snapshot(live, ids["cid"])
    url = "/api/chat/conversations/{cid}/messages".format(**ids)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"parent_id": ids["aid"], "content": "   "}, 422, "empty"),
        ({"parent_id": ids["uid"], "content": "hi"}, 422, "follows an assistant"),
        ({"parent_id": 10**9, "content": "hi"}, 404, "no message"),
        ({"parent_id": ids["aid"], "content": "x" * 40_000}, 413, "limit"),
        ({"parent_id": ids["aid"], "content": "hi", "model": "nope"}, 404, "nope"),
        ({"parent_id": ids["aid"], "content": "hi", "max_tokens": 100_000}, 422, "max_tokens"),
        ({"parent_id": ids["aid"], "content": "hi", "max_tokens": 2040}, 413, "context"),
        ({"parent_id": ids["aid"], "content": "hi", "temperature": 5}, 422, "temperature"),
    ]
    for body, status, words in cases:
        response = client.api("POST", url, body)
        assert response.status_code == status, (body, response.text)
        assert words in response.text
    assert (
        client.api("POST", url.replace("/messages", "/messages/{aid}/replies".format(**ids)), {}).status_code
        == 422
    )
    assert (
        client.api("PATCH", "/api/chat/conversations/{cid}".format(**ids), {"title": "t" * 301}).status_code
        == 422
    )
    assert snapshot(live, ids["cid"]) == before


def test_a_full_queue_answers_429_with_retry_after(live: Live) -> None:
    ids = seed_chat(live, "alice")
    client = live.client("alice")
    worker = live.worker
    saved = worker.max_queue
    worker.max_queue = 0
    try:
        response = client.api(
            "POST",
            "/api/chat/conversations/{cid}/messages".format(**ids),
            {"parent_id": ids["aid"], "content": "hi"},
        )
    finally:
        worker.max_queue = saved
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert snapshot(live, ids["cid"])[2] == 3  # the user message was not saved


def test_concurrent_chats_of_two_users_stream_at_once(live: Live) -> None:
    """Two users chatting at the same time each get their own reply in their own conversation."""
    results: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    def chat(name: str) -> None:
        client = live.client(name)
        cid = client.api("POST", "/api/chat/conversations", {}).json()["id"]
        results[name] = client.stream(
            f"/api/chat/conversations/{cid}/messages",
            {"parent_id": None, "content": f"I am {name}", "max_tokens": 8},
        )

    threads = [threading.Thread(target=chat, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in ("alice", "bob"):
        status, events = results[name]
        assert status == 200 and events[0]["message"]["content"] == f"I am {name}"
        assert events[-1]["type"] == "done"

"""The admin pages in a real Chromium against a live server on a tiny model: the dashboard's counts and
agreement; an iteration started from the admin page, followed live until its policy is served and can be
picked (and answers) in the chat; a trainer's blind A/B judgement by keyboard."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_data import add_second_ranker, seed_store
from sqlalchemy import select
from test_chat_browser import Tab, log_in, open_tab, send, set_max_tokens, wait_reply_done
from webclient import Live, live_web_server

from dialoop.collect.abtest import ABPair, ab_result, create_ab_test
from dialoop.store import session_scope
from dialoop.store.accounts import get_user
from dialoop.store.models import Conversation, Message, ModelVersion
from dialoop.store.registry import register_model_version

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def quiet_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """The iteration's process inherits these: one CPU thread (the machine is shared), no hub access."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("admin-browser") / "store.db"
    with live_web_server(f"sqlite:///{db}", tiny_model_dir) as server:
        engine = server.app.state.engine
        seeded = seed_store(engine, tiny_model_dir)
        add_second_ranker(engine, seeded.tasks[:1], "tina", agree=True)
        add_second_ranker(engine, seeded.tasks[1:2], "tina", agree=False)
        yield server


def logged_in(browser: Any, live: Live, name: str, target: str) -> Tab:
    tab = open_tab(browser, live)
    tab.page.goto(f"/login?next={target}")
    log_in(tab.page, name)
    tab.page.wait_for_url(re.compile(re.escape(target) + "$"))
    return tab


def test_an_admin_sees_the_counts_and_the_agreement(browser: Any, live: Live, screenshot_dir: Path) -> None:
    tab = logged_in(browser, live, "root", "/admin")
    page = tab.page

    def count(key: str) -> str:
        return str(page.locator(f'[data-count="{key}"] .value').inner_text())

    assert [
        count(k) for k in ("demonstrations_submitted", "chats", "tasks_open", "tasks_done", "rankings")
    ] == [
        "4",
        "4",
        "1",
        "2",
        "5",
    ]
    assert page.locator("#agreement-overall").inner_text() == "50.0%"
    assert page.locator('tr[data-trainer="theo"] .agreement').inner_text() == "50.0%"
    assert page.locator('tr[data-trainer="tina"] td').nth(1).inner_text() == "2"
    assert page.locator("#flags .flag").count() == 1 and "untrue" in page.locator("#flags").inner_text()
    page.screenshot(path=screenshot_dir / "admin-dashboard.png", full_page=True)

    # accept a demonstration from the dashboard
    page.locator("#demonstrations .demonstration").first.locator("button[value=accept]").click()
    page.wait_for_url(re.compile(r"/admin#demonstrations$"))
    assert count("demonstrations_accepted") == "1" and count("demonstrations_submitted") == "3"

    page.goto("/admin/users")
    page.fill("#create-user input[name=name]", "nora")
    page.click("#create-user button[type=submit]")
    assert len(page.locator("#one-time-value").inner_text()) >= 12
    page.screenshot(path=screenshot_dir / "admin-users.png", full_page=True)
    assert tab.errors == []
    tab.page.context.close()


def test_an_iteration_started_from_the_admin_page_becomes_selectable_in_the_chat(
    browser: Any, live: Live, tiny_model_dir: Path, screenshot_dir: Path
) -> None:
    tab = logged_in(browser, live, "root", "/admin/iterations")
    page = tab.page
    assert page.input_value("input[name=base_model]") == str(tiny_model_dir)
    settings = {"sft_steps": "2", "rm_steps": "2", "ppo_steps": "2", "ppo_batch_size": "2"}
    for name, value in {**settings, "max_new_tokens": "8", "eval_prompts": "4"}.items():
        page.fill(f"#iteration-form input[name={name}]", value)
    page.select_option("#iteration-form select[name=precision]", "fp32")
    page.check("#iteration-form input[name=deploy]")
    page.click("#start-iteration")
    page.wait_for_url(re.compile(r"/admin/iterations#job-1$"))
    job = page.locator("#job-1")
    # live progress: the page shows a stage running before the job ends
    page.wait_for_selector('#job-1 .stage.status-running, #job-1[data-status="done"]', timeout=120_000)
    page.screenshot(path=screenshot_dir / "admin-iteration-running.png", full_page=True)
    page.wait_for_selector('#job-1[data-status="done"]', timeout=240_000)
    assert job.locator('[data-field="result"]').inner_text().startswith("New policy policy-1, now served.")
    for stage in ("sft", "rm", "ppo", "eval"):
        assert job.locator(f'[data-stage="{stage}"] [data-field="stage-status"]').inner_text() == "trained"
    assert "step 2/2" in job.locator('[data-stage="ppo"] [data-field="stage-detail"]').inner_text()
    assert job.locator(".cancel-form").count() == 0
    page.screenshot(path=screenshot_dir / "admin-iteration-done.png", full_page=True)

    # its report card, with the plots loaded
    page.goto("/admin/versions")
    with session_scope(live.app.state.engine) as session:
        policy = session.scalars(select(ModelVersion).where(ModelVersion.name == "policy-1")).one()
        policy_id = policy.id
    card = page.locator(f"#version-{policy_id}")
    assert "served" in card.locator("header").inner_text()
    assert page.locator("#served-name").inner_text() == "policy-1"
    plots = card.locator(".plots img")
    assert plots.count() >= 2
    for i in range(plots.count()):  # the plots load lazily: bring each into view and let it load
        img = plots.nth(i)
        img.scroll_into_view_if_needed()
        img.evaluate("img => img.complete || new Promise(done => { img.onload = img.onerror = done; })")
        assert img.evaluate("img => img.naturalWidth > 0"), img.get_attribute("src")
    page.screenshot(path=screenshot_dir / "admin-versions.png", full_page=True)
    assert tab.errors == []
    tab.page.context.close()

    # a user picks the new version in the chat and it answers
    chat = logged_in(browser, live, "alice", "/chat")
    page = chat.page
    page.wait_for_selector('#model-picker option[value="policy-1"]', state="attached")
    options = page.locator("#model-picker option").all_inner_texts()
    assert "policy-1 (served)" in options and "sft-1" in options
    page.select_option("#model-picker", "policy-1")
    set_max_tokens(page, 4)
    send(page, "Say something.")
    page.locator(".message.assistant").first.wait_for()
    wait_reply_done(page)
    page.screenshot(path=screenshot_dir / "chat-model-picker.png")
    with session_scope(live.app.state.engine) as session:
        alice = get_user(session, "alice")
        assert alice is not None
        mine = (Conversation.owner_id == alice.id, Message.role == "assistant")
        [reply] = session.scalars(select(Message).join(Conversation).where(*mine))
        assert reply.author_model_id == policy_id
    chat.page.context.close()


def test_a_trainer_judges_an_ab_task_blind_by_keyboard(
    browser: Any, live: Live, tiny_model_dir: Path, screenshot_dir: Path
) -> None:
    names = ("ab-one", "ab-two")
    with session_scope(live.app.state.engine) as session:
        admin = get_user(session, "root")
        assert admin is not None
        a, b = (register_model_version(session, name=n, kind="policy", path=tiny_model_dir) for n in names)
        pairs = [ABPair("Which is the largest planet?", "Jupiter is.", "Saturn, I think.", True, True)]
        test_id = create_ab_test(session, admin, a, b, pairs, rng=random.Random(0)).id
    tab = logged_in(browser, live, "tess", "/ab")
    page = tab.page
    text = page.locator(".ab-judge").inner_text()
    assert "largest planet" in text and not any(name in text for name in names)
    labels = page.locator(".ab-reply h2").all_inner_texts()
    assert labels == ["Reply A", "Reply B"]
    jupiter = "AB"[page.locator(".ab-reply .text").all_inner_texts().index("Jupiter is.")]
    page.screenshot(path=screenshot_dir / "ab-judge.png")
    page.keyboard.press(jupiter.lower())
    page.locator("#ab-empty").wait_for()
    with session_scope(live.app.state.engine) as session:
        result = ab_result(session, test_id)
        assert (result.wins_a, result.wins_b, result.judgements) == (1, 0, 1)
    assert tab.errors == []
    tab.page.context.close()

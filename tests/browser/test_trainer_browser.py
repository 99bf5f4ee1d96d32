"""The trainer workspace in a real Chromium against a live uvicorn server serving a tiny model.

Covers: writing a demonstration with a streamed suggestion inserted and edited (autosave, and text kept in
the browser across a reload before it was saved), ranking a K=4 task with a tie and a flag using only the
keyboard, changing that ranking by drag and drop, and skipping a task with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from trainer_web import chat_once, live_trainer_server
from webclient import PASSWORD, Live

from dialoop.store import Conversation, Message, Ranking, session_scope
from dialoop.store.accounts import get_user

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("trainer-browser") / "store.db"
    with live_trainer_server(f"sqlite:///{db}", tiny_model_dir) as server:
        yield server


class Tab:
    """A logged-in browser tab that records console errors and accepts the dialogs it gets."""

    def __init__(self, browser: Any, live: Live, name: str):
        self.context = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 1600})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)
        self.page.goto("/login")
        self.page.fill('input[name="name"]', name)
        self.page.fill('input[name="password"]', PASSWORD)
        self.page.click('form[action="/login"] button[type="submit"]')
        self.page.wait_for_url(re.compile(r"/chat$"))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab_of(browser: Any, live: Live) -> Iterator[Any]:
    tabs: list[Tab] = []

    def open_tab(name: str) -> Tab:
        tabs.append(Tab(browser, live, name))
        return tabs[-1]

    yield open_tab
    for tab in tabs:
        assert tab.errors == [], tab.errors
        tab.close()


def turns_of(live: Live, did: int) -> list[Message]:
    with session_scope(live.app.state.engine) as session:
        return list(
            session.scalars(select(Message).where(Message.conversation_id == did).order_by(Message.id))
        )


def wait_saved(page: Any) -> None:
    page.wait_for_function("() => document.getElementById('save-state').textContent === 'All changes saved'")


def test_a_trainer_writes_a_demonstration_using_a_suggestion(
    tab_of: Any, live: Live, screenshot_dir: Path
) -> None:
    tab = tab_of("tess")
    page = tab.page
    page.click('nav.nav a[href="/trainer"]')
    page.wait_for_url(re.compile(r"/trainer$"))
    page.screenshot(path=screenshot_dir / "trainer-home.png")
    page.click("text=New demonstration")
    page.wait_for_url(re.compile(r"/trainer/demonstrations/\d+$"))
    did = int(page.url.rsplit("/", 1)[1])
    assert page.locator("#suggest-panel").is_hidden()  # nothing to answer yet

    # the user turn, saved as it is typed
    page.locator('textarea[aria-label="Next turn (user)"]').type("What is the capital of France?")
    wait_saved(page)
    page.locator('textarea[aria-label="Next turn (assistant)"]').wait_for()
    assert [(m.role, m.content) for m in turns_of(live, did)] == [("user", "What is the capital of France?")]

    # three suggestions stream in; the second one is inserted, then edited by hand
    page.fill("#suggest-n", "3")
    page.fill("#suggest-max-tokens", "10")
    page.click("#suggest")
    page.wait_for_selector(".suggestion.ready >> nth=2")
    assert page.locator(".suggestion").count() == 3
    page.screenshot(path=screenshot_dir / "trainer-demo-suggestions.png")
    suggestion = page.locator(".suggestion").nth(1)
    suggestion.locator("button.insert").click()
    reply = page.locator(".turn.assistant[data-id] textarea")
    reply.wait_for()
    inserted = reply.input_value()
    assert page.locator(".turn.assistant .origin").inner_text() == "from a model suggestion"
    assert page.evaluate("() => document.activeElement.closest('.turn')?.dataset.role") == "assistant"
    page.keyboard.press("End")
    page.keyboard.type(" Paris is the capital of France.")
    wait_saved(page)
    _, assistant_turn = turns_of(live, did)
    origin = assistant_turn.extra["suggestion"]
    assert (
        inserted == origin["text"] and assistant_turn.content == inserted + " Paris is the capital of France."
    )

    # a turn typed and left before the autosave: the browser keeps it and saves it on the next visit
    page.locator('textarea[aria-label="Next turn (user)"]').fill("And of Italy?")
    page.reload()
    page.locator("#demo-notice").wait_for()
    assert "Restored" in page.locator("#demo-notice").inner_text()
    wait_saved(page)
    assert [m.content for m in turns_of(live, did)][-1] == "And of Italy?"
    page.locator('textarea[aria-label="Next turn (assistant)"]').type("Rome.")
    wait_saved(page)

    page.click("#submit-demo")
    page.wait_for_function("() => document.getElementById('demo-status').textContent === 'submitted'")
    assert "until an admin accepts it" in page.locator("#demo-notice").inner_text()
    page.screenshot(path=screenshot_dir / "trainer-demo-submitted.png", full_page=True)
    with session_scope(live.app.state.engine) as session:
        conv = session.get_one(Conversation, did)
        assert conv.status == "submitted"
    assert [m.role for m in turns_of(live, did)] == ["user", "assistant", "user", "assistant"]
    page.click("text=Demonstrations")
    assert "What is the capital of France?" in page.locator("#demonstration-list").inner_text()

    # the guide is one click away, in its own tab so that nothing is left behind
    with page.context.expect_page() as guide_tab:
        page.click("#guide-link")
    guide = guide_tab.value
    guide.wait_for_load_state()
    assert guide.locator("h1").inner_text() == "Labeling guide"
    guide.screenshot(path=screenshot_dir / "trainer-guide.png")


def answers_of(live: Live, name: str) -> list[Ranking]:
    with session_scope(live.app.state.engine) as session:
        trainer = get_user(session, name)
        assert trainer is not None
        return list(
            session.scalars(select(Ranking).where(Ranking.trainer_id == trainer.id).order_by(Ranking.id))
        )


def shown_order(page: Any) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(".candidate", "els => els.map(e => e.dataset.index)")]


def test_a_trainer_ranks_a_k4_task_with_a_tie_using_only_the_keyboard(
    tab_of: Any, live: Live, screenshot_dir: Path
) -> None:
    chat_once(live.client("tess"), "Give advice for a first job interview.")
    tab = tab_of("tom")
    page = tab.page
    page.goto("/trainer/rank")
    page.wait_for_selector(".candidate >> nth=3")
    assert page.locator(".candidate").count() == 4
    a, b, c, d = shown_order(page)
    task_id = int(re.search(r"#(\d+)", page.locator("#task-info").inner_text()).group(1))  # type: ignore[union-attr]
    # the first reply has the focus: everything below is keys only
    assert page.evaluate("() => document.activeElement.dataset.index") == str(a)
    keys = page.keyboard
    keys.press("ArrowDown")
    keys.press("ArrowDown")  # c
    keys.press("1")  # c to the top: c a b d
    keys.press("ArrowDown")
    keys.press("ArrowDown")  # b
    keys.press("t")  # b ties with a
    keys.press("ArrowDown")  # d
    keys.press("u")  # flag d: untrue
    keys.press("Shift+ArrowUp")  # d above b: c a d b (the tie of b with a is gone)
    keys.press("Shift+ArrowDown")  # back: c a b d
    keys.press("ArrowUp")  # b
    keys.press("t")  # tie b with a again
    assert shown_order(page) == [c, a, b, d]
    places = page.eval_on_selector_all(".candidate", "els => els.map(e => e.dataset.place)")
    assert places == ["1", "2", "2", "4"]
    assert page.locator(f'.candidate[data-index="{d}"] input.flag-untrue').is_checked()
    page.screenshot(path=screenshot_dir / "trainer-rank-keyboard.png", full_page=True)
    keys.press("Control+Enter")
    page.locator("#rank-status").wait_for()
    assert f"Ranking of task #{task_id} saved." in page.locator("#rank-status").inner_text()
    [ranking] = [r for r in answers_of(live, "tom") if r.task_id == task_id]
    assert (
        ranking.order == [c, a, b, d] and ranking.ties == [[a, b]] and ranking.flags == {str(d): ["untrue"]}
    )
    assert ranking.skip_reason is None and not ranking.all_bad

    # changing that answer later, by drag and drop this time
    page.goto("/trainer/rankings")
    page.click(f'a[href="/trainer/rank/{task_id}"]')
    page.wait_for_selector(".candidate >> nth=3")
    assert shown_order(page) == [c, a, b, d]  # the saved answer comes back, tie and flag included
    assert page.eval_on_selector_all(".candidate", "els => els.map(e => e.dataset.place)") == [
        "1",
        "2",
        "2",
        "4",
    ]
    page.drag_and_drop(
        f'.candidate[data-index="{d}"] .place',
        f'.candidate[data-index="{c}"] .place',
        target_position={"x": 5, "y": 2},
    )
    assert shown_order(page) == [d, c, a, b]
    page.click("#submit-ranking")
    page.wait_for_function("() => document.getElementById('rank-status').textContent.includes('saved')")
    [ranking] = [r for r in answers_of(live, "tom") if r.task_id == task_id]
    assert ranking.order == [d, c, a, b] and ranking.ties == [[a, b]]
    page.screenshot(path=screenshot_dir / "trainer-rank-changed.png", full_page=True)


def test_a_trainer_skips_a_task_with_a_reason(tab_of: Any, live: Live, screenshot_dir: Path) -> None:
    chat_once(live.client("tess"), "Why do cats purr?")
    tab = tab_of("tina")
    page = tab.page
    page.goto("/trainer/rank")
    page.wait_for_selector(".candidate >> nth=3")
    task_id = int(re.search(r"#(\d+)", page.locator("#task-info").inner_text()).group(1))  # type: ignore[union-attr]
    page.click("#skip summary")
    page.click("#skip-button")
    assert "Say why you skip" in page.locator("#rank-error").inner_text()
    assert not [r for r in answers_of(live, "tina") if r.task_id == task_id]
    page.select_option("#skip-choice", "other")
    page.fill("#skip-reason", "The question needs a vet's knowledge.")
    page.screenshot(path=screenshot_dir / "trainer-skip.png", full_page=True)
    page.click("#skip-button")
    page.locator("#rank-status").wait_for()
    assert f"Task #{task_id} skipped." in page.locator("#rank-status").inner_text()
    [answer] = [r for r in answers_of(live, "tina") if r.task_id == task_id]
    assert answer.skip_reason == "The question needs a vet's knowledge." and answer.order == []
    # the next task (or the message that there is none) follows, never the skipped one again
    page.wait_for_function(
        "() => !document.getElementById('rank-empty').hidden || !document.getElementById('task').hidden"
    )
    assert f"#{task_id} " not in page.locator("#task-info").inner_text()

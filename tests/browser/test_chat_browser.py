"""The chat in a real Chromium against a live uvicorn server serving a tiny model.

One server per module. Covers: logging in, a streamed reply, stopping it (the server cancels the
generation), regenerating and switching branches, editing a message, thumbs and the A/B question,
conversation settings (system prompt, model picker, rename, delete), and XSS payloads in a user message
and in a stored model reply rendering as inert text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from webclient import PASSWORD, Live, live_web_server

from dialoop.store import Conversation, Feedback, Message, session_scope
from dialoop.store.accounts import get_user
from dialoop.store.registry import register_model_version
from dialoop.store.trees import add_message

pytestmark = pytest.mark.browser

XSS_USER = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **not bold**'
XSS_REPLY = "\n".join(
    [
        "Here is **bold**, `code` and a [safe link](https://example.com/a).",
        "",
        '<img src=x onerror="window.__xss=3"> <svg onload="window.__xss=4"></svg>',
        "",
        "[click me](javascript:window.__xss=5) and ![pixel](x onerror=window.__xss=6)",
        "",
        "<script>window.__xss=7</script>",
        "",
        "```html",
        '</code></pre><script>window.__xss=8</script><iframe src="javascript:window.__xss=9"></iframe>',
        "```",
        "",
        "| a | b |",
        "|---|---|",
        "| <b onmouseover=window.__xss=10>x</b> | 2 |",
    ]
)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("browser") / "store.db"
    with live_web_server(f"sqlite:///{db}", tiny_model_dir) as server:
        yield server


@dataclass
class Tab:
    """A browser tab and what it reported: console errors, uncaught exceptions, dialogs."""

    page: Any
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    confirm: bool = False  # answer to window.confirm


def open_tab(browser: Any, live: Live) -> Tab:
    context = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    tab = Tab(page)
    page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))

    def on_dialog(dialog: Any) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm" and tab.confirm:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    return tab


def log_in(page: Any, name: str, password: str = PASSWORD) -> None:
    page.fill('input[name="name"]', name)
    page.fill('input[name="password"]', password)
    page.click('form[action="/login"] button[type="submit"]')


@pytest.fixture(scope="module")
def alice(browser: Any, live: Live) -> Iterator[Tab]:
    tab = open_tab(browser, live)
    tab.page.goto("/login")
    log_in(tab.page, "alice")
    tab.page.wait_for_url(re.compile(r"/$|/chat$"))
    yield tab
    tab.page.context.close()


def set_max_tokens(page: Any, n: int) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.fill("#max-tokens", str(n))


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_streaming_text(page: Any) -> None:
    page.wait_for_function(
        "() => (document.querySelector('.message.streaming .content')?.textContent ?? '').length > 0"
    )


def wait_reply_done(page: Any) -> None:
    page.wait_for_selector(".message.streaming", state="detached")
    page.wait_for_selector("#send", state="visible")


def conversation_id(page: Any) -> int:
    found = re.search(r"/chat/(\d+)$", page.url)
    assert found, page.url
    return int(found.group(1))


def rows(live: Live, cid: int) -> list[Message]:
    with session_scope(live.app.state.engine) as session:
        return list(
            session.scalars(select(Message).where(Message.conversation_id == cid).order_by(Message.id))
        )


def test_logging_in_and_out(browser: Any, live: Live, screenshot_dir: Path) -> None:
    tab = open_tab(browser, live)
    page = tab.page
    page.goto("/chat")
    assert page.url.endswith("/login?next=/chat")
    log_in(page, "alice", "not the password")
    assert page.locator(".error").inner_text() == "Wrong name or password."
    page.screenshot(path=screenshot_dir / "login-error.png")
    log_in(page, "alice")
    page.wait_for_url(re.compile(r"/chat$"))
    assert "alice" in page.locator(".who").inner_text()
    page.click("text=Log out")
    page.wait_for_url(re.compile(r"/login$"))
    page.goto("/chat")
    assert "/login" in page.url
    assert tab.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    tab.page.context.close()


def test_chat_stream_stop_regenerate_edit_and_feedback(alice: Tab, live: Live, screenshot_dir: Path) -> None:
    page = alice.page
    page.goto("/chat")

    # a streamed reply
    set_max_tokens(page, 300)
    send(page, "Hello there, **model**!")
    wait_streaming_text(page)
    page.screenshot(path=screenshot_dir / "chat-streaming.png")
    wait_reply_done(page)
    cid = conversation_id(page)
    question, reply = rows(live, cid)
    assert (question.role, question.content) == ("user", "Hello there, **model**!")
    assert reply.role == "assistant" and reply.parent_id == question.id and reply.content
    assert page.locator(f'.message.user[data-id="{question.id}"] .content').inner_text() == question.content
    assert page.locator(f'.message.assistant[data-id="{reply.id}"]').is_visible()
    assert "Hello there" in page.locator("#conversation-list").inner_text()

    # stop mid-reply: the server cancels the generation and keeps the text so far
    cancelled = live.worker.stats.cancelled
    # long enough to stop mid-reply; leaves room in the tiny model's 2048-token context for the first reply
    # to re-encode to 3x its 300 tokens (at 1500 a request once got a 413 in CI: the prompt had grown)
    set_max_tokens(page, 1000)
    send(page, "Tell me a long story.")
    wait_streaming_text(page)
    page.click("#stop")
    stopped = page.locator(".message.assistant.stopped")
    stopped.wait_for()
    assert stopped.locator(".note").inner_text() == "Stopped before the end."
    assert live.worker.stats.cancelled == cancelled + 1
    long_question, stopped_reply = rows(live, cid)[2:]
    assert stopped_reply.extra["stopped"] and stopped_reply.extra["finish_reason"] == "cancelled"
    assert 0 < stopped_reply.extra["completion_tokens"] < 1500 and stopped_reply.finished is False
    page.screenshot(path=screenshot_dir / "chat-stopped.png")

    # regenerate: a new sibling reply, "< 2/2 >", and the question which one is better
    set_max_tokens(page, 20)
    stopped.locator("button.regenerate").click()
    wait_reply_done(page)
    last = page.locator(".message.assistant").last
    assert last.locator(".switcher .position").inner_text() == "2/2"
    regenerated = rows(live, cid)[-1]
    assert regenerated.parent_id == long_question.id and last.get_attribute("data-id") == str(regenerated.id)
    page.locator(".choice").wait_for()
    page.screenshot(path=screenshot_dir / "chat-regenerated.png")
    page.locator(".choice .choose-new").click()
    page.locator(".choice >> text=Thanks").wait_for()
    with session_scope(live.app.state.engine) as session:
        [ab] = session.scalars(select(Feedback).where(Feedback.kind == "ab")).all()
        assert (ab.message_id, ab.other_message_id, ab.value) == (regenerated.id, stopped_reply.id, 1)

    # switch between the two replies
    last.locator(".switcher .prev").click()
    assert page.locator(".message.assistant").last.get_attribute("data-id") == str(stopped_reply.id)
    assert page.locator(".message.assistant").last.locator(".switcher .position").inner_text() == "1/2"
    page.locator(".message.assistant").last.locator(".switcher .next").click()
    assert page.locator(".message.assistant").last.get_attribute("data-id") == str(regenerated.id)

    # edit a user message: a new branch from the same parent
    edited_text = "Tell me a short story instead."
    page.locator(f'.message.user[data-id="{long_question.id}"] button.edit').click()
    page.fill(".edit-box", edited_text)
    page.click("text=Save and send")
    wait_reply_done(page)
    user_last = page.locator(".message.user").last
    assert user_last.locator(".content").inner_text() == edited_text
    assert user_last.locator(".switcher .position").inner_text() == "2/2"
    edited = next(m for m in rows(live, cid) if m.content == edited_text)
    assert edited.parent_id == long_question.parent_id == reply.id
    user_last.locator(".switcher .prev").click()
    assert page.locator(".message.user").last.locator(".content").inner_text() == "Tell me a long story."
    page.locator(".message.user").last.locator(".switcher .next").click()
    page.screenshot(path=screenshot_dir / "chat-edited.png")

    # thumbs up, then down: one Feedback row per user and reply
    answer = page.locator(".message.assistant").last
    answer_id = int(answer.get_attribute("data-id"))
    answer.locator("button.thumb.up").click()
    page.locator(f'.message[data-id="{answer_id}"] button.thumb.up[aria-pressed="true"]').wait_for()
    with session_scope(live.app.state.engine) as session:
        thumbs = session.scalars(select(Feedback).where(Feedback.kind == "thumbs")).all()
        assert [(f.message_id, f.value) for f in thumbs] == [(answer_id, 1)]
    page.locator(f'.message[data-id="{answer_id}"] button.thumb.down').click()
    page.locator(f'.message[data-id="{answer_id}"] button.thumb.down[aria-pressed="true"]').wait_for()
    with session_scope(live.app.state.engine) as session:
        thumbs = session.scalars(select(Feedback).where(Feedback.kind == "thumbs")).all()
        assert [(f.message_id, f.value) for f in thumbs] == [(answer_id, -1)]

    # after a reload the tree, the branches and the thumbs are still there
    page.reload()
    page.locator(f'.message[data-id="{answer_id}"] button.thumb.down[aria-pressed="true"]').wait_for()
    assert alice.errors == [] and alice.dialogs == []


def test_xss_in_a_user_message_and_in_a_model_reply_renders_as_inert_text(
    alice: Tab, live: Live, screenshot_dir: Path
) -> None:
    # the model reply is real stored content of the conversation, rendered by the page like any reply
    with session_scope(live.app.state.engine) as session:
        owner = get_user(session, "alice")
        assert owner is not None
        conv = Conversation(owner_id=owner.id, kind="chat", title="<b>xss</b> test")
        session.add(conv)
        session.flush()
        question = add_message(session, conv, None, "user", "Show me some HTML.", author_user_id=owner.id)
        add_message(session, conv, question, "assistant", XSS_REPLY, finished=True, extra={"model": "tiny"})
        cid = conv.id
    page = alice.page
    page.goto(f"/chat/{cid}")
    reply = page.locator(".message.assistant").first
    reply.wait_for()
    set_max_tokens(page, 5)
    send(page, XSS_USER)
    wait_reply_done(page)

    messages = page.locator("#messages")
    dangerous = (
        "img, script, svg, iframe, object, embed, [onerror], [onload], [onmouseover], a[href^='javascript']"
    )
    assert messages.locator(dangerous).count() == 0
    assert page.evaluate("window.__xss") is None and alice.dialogs == []
    user_text = page.locator(".message.user").last.locator(".content").inner_text()
    assert user_text == XSS_USER  # shown exactly as typed
    reply_text = reply.locator(".content").inner_text()
    assert (
        '<img src=x onerror="window.__xss=3">' in reply_text
        and "<script>window.__xss=7</script>" in reply_text
    )
    assert "click me" in reply_text
    # the markdown still renders: bold, code, a safe link, a code block, a table
    assert reply.locator("strong").first.inner_text() == "bold"
    assert reply.locator("a").count() == 1
    link = reply.locator("a")
    assert link.get_attribute("href") == "https://example.com/a" and "noopener" in link.get_attribute("rel")
    assert "<script>window.__xss=8</script>" in reply.locator(".code-block code").inner_text()
    assert reply.locator("table td").first.inner_text() == "<b onmouseover=window.__xss=10>x</b>"
    assert page.locator("#chat-title").inner_text() == "<b>xss</b> test"
    page.screenshot(path=screenshot_dir / "chat-xss-inert.png", full_page=True)
    assert alice.errors == []


MARKDOWN_CASES = [
    (
        "# Title\n\nSome *em*, **strong** and ~~gone~~.",
        "<h1>Title</h1><p>Some <em>em</em>, <strong>strong</strong> and <del>gone</del>.</p>",
    ),
    ("- a\n- b\n  - c", "<ul><li>a</li><li><p>b</p><ul><li>c</li></ul></li></ul>"),
    ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("> quoted", "<blockquote><p>quoted</p></blockquote>"),
    ("a `<i>` b", "<p>a <code>&lt;i&gt;</code> b</p>"),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("---", "<hr>"),
    ("[x](javascript:alert(1)) [y](JaVaScRiPt:alert(1)) [z](data:text/html,hi)", "<p>x y z</p>"),
    (
        "see https://example.com/p.",
        '<p>see <a href="https://example.com/p" rel="noopener noreferrer nofollow" target="_blank">https://example.com/p</a>.</p>',
    ),
]


def test_markdown_renderer_builds_the_expected_dom(alice: Tab) -> None:
    page = alice.page
    page.goto("/chat")
    rendered = page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import("/static/js/markdown.js");
            return cases.map((text) => {
                const box = document.createElement("div");
                box.append(renderMarkdown(text));
                return box.innerHTML;
            });
        }""",
        [text for text, _ in MARKDOWN_CASES],
    )
    assert rendered == [html for _, html in MARKDOWN_CASES]
    code = page.evaluate(
        """async () => {
            const { renderMarkdown } = await import("/static/js/markdown.js");
            const box = document.createElement("div");
            box.append(renderMarkdown("```py\\nprint('<b>')\\n```"));
            return [box.querySelector(".code-lang").textContent, box.querySelector("pre code").textContent];
        }"""
    )
    assert code == ["py", "print('<b>')"]


def test_system_prompt_model_picker_rename_and_delete(alice: Tab, live: Live, tiny_model_dir: Path) -> None:
    with session_scope(live.app.state.engine) as session:
        version = register_model_version(session, name="tiny-v2", kind="policy", path=tiny_model_dir)
        version_id = version.id
    page = alice.page
    page.goto("/chat")
    set_max_tokens(page, 4)
    page.fill("#system-prompt", "Always answer in haiku.")
    page.click("#save-system")
    page.wait_for_url(re.compile(r"/chat/\d+$"))
    cid = conversation_id(page)
    assert page.locator("#model-picker option").all_inner_texts() == ["tiny (served)", "tiny-v2"]
    page.select_option("#model-picker", "tiny-v2")
    send(page, "hi")
    wait_reply_done(page)
    reply = rows(live, cid)[-1]
    assert reply.extra["model"] == "tiny-v2" and reply.author_model_id == version_id
    assert page.locator(".message.assistant .author").inner_text() == "tiny-v2"

    page.click("#rename")
    page.fill("#rename-input", "Haiku chat")
    page.press("#rename-input", "Enter")
    page.locator("#chat-title >> text=Haiku chat").wait_for()
    page.locator("#conversation-list >> text=Haiku chat").wait_for()
    with session_scope(live.app.state.engine) as session:
        conv = session.get(Conversation, cid)
        assert conv is not None and (conv.title, conv.system_prompt) == (
            "Haiku chat",
            "Always answer in haiku.",
        )

    alice.confirm = True
    page.click("#delete")
    page.wait_for_url(re.compile(r"/chat$"))
    alice.confirm = False
    assert "Haiku chat" not in page.locator("#conversation-list").inner_text()
    with session_scope(live.app.state.engine) as session:
        assert session.get(Conversation, cid) is None
    assert alice.errors == []

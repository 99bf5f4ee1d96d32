"""The official `openai` client against a real uvicorn server on 127.0.0.1 serving a tiny model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from dialoop.modeling.chat import encode_prompt
from dialoop.modeling.tiny import make_tiny_model
from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user
from dialoop.store.registry import register_model_version, served_model

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@dataclass
class Live:
    """A running server and the API keys of its admin and of a plain user."""

    url: str
    app: FastAPI
    admin_key: str
    user_key: str

    @property
    def worker(self) -> GenerationWorker:
        worker: GenerationWorker = self.app.state.worker
        return worker

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key or self.user_key, max_retries=0, timeout=120)

    def async_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.user_key, max_retries=0, timeout=120)


@contextmanager
def live_server(database_url: str, model: Path, **settings: Any) -> Iterator[Live]:
    app = create_app(
        database_url=database_url, model=model, model_name="tiny", serve_settings=ServeSettings(**settings)
    )
    with session_scope(app.state.engine) as session:
        _, admin_key = create_api_key(session, create_user(session, "root", "admin", "root-password"))
        _, user_key = create_api_key(session, create_user(session, "alice", "user", "alice-password"))
    with serve_in_background(app) as url:
        yield Live(url, app, admin_key, user_key)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db = tmp_path_factory.mktemp("openai-client") / "store.db"
    with live_server(f"sqlite:///{db}", tiny_model_dir) as server:
        yield server


def test_non_stream_completion_reports_usage_and_finish_reason(live: Live, tiny_model_dir: Path) -> None:
    reply = live.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=1)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny"
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    prompt_tokens = len(encode_prompt(AutoTokenizer.from_pretrained(tiny_model_dir), MESSAGES))
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens,
        8,
        prompt_tokens + 8,
    )


def test_default_names_the_served_model_and_max_completion_tokens_is_honoured(live: Live) -> None:
    reply = live.client().chat.completions.create(model="default", messages=MESSAGES, max_completion_tokens=5)
    assert reply.model == "tiny"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_a_stream_carries_the_same_reply_and_ends_with_usage(live: Live) -> None:
    client = live.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=7)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=12,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert whole.usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_three_gives_three_choices_streamed_or_not(live: Live) -> None:
    client = live.client()
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3
    assert reply.usage is not None and reply.usage.completion_tokens == 18

    texts = ["", "", ""]
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, n=3, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert all(texts)


def test_a_seed_makes_the_reply_reproducible(live: Live) -> None:
    client = live.client()

    def reply(seed: int) -> str | None:
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, seed=seed, top_p=0.9
        )
        return r.choices[0].message.content

    assert reply(11) == reply(11)
    assert reply(11) != reply(12)


def test_stop_strings_end_the_reply_before_them(live: Live) -> None:
    client = live.client()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
    text = full.choices[0].message.content or ""
    stop = text[10:14]
    expected = text[: text.index(stop)]
    for stops in (stop, ["not-in-the-reply", stop]):
        cut = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=stops
        )
        assert cut.choices[0].message.content == expected
        assert cut.choices[0].finish_reason == "stop"
        assert cut.usage is not None and cut.usage.completion_tokens < 30
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_bad_api_key_is_an_authentication_error(live: Live) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        live.client("dl-not-a-real-key").chat.completions.create(model="tiny", messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        live.client("dl-not-a-real-key").models.list()


def test_an_unknown_model_is_not_found(live: Live) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        live.client().chat.completions.create(model="gpt-17", messages=MESSAGES)
    error = err.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-17" in error["message"]
    with pytest.raises(openai.NotFoundError):
        live.client().models.retrieve("gpt-17")


def test_models_lists_the_base_model_and_policy_versions(live: Live, tmp_path: Path) -> None:
    with session_scope(live.app.state.engine) as session:
        register_model_version(session, name="sft-1", kind="policy", path=tmp_path / "sft-1")
        register_model_version(session, name="rm-1", kind="reward", path=tmp_path / "rm-1")
    client = live.client()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "sft-1"}  # reward models are not chat models
    assert all(m.object == "model" and m.owned_by == "dialoop" for m in models.values())
    assert (models["tiny"].model_extra or {}).get("served") is True
    assert client.models.retrieve("sft-1").id == "sft-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("rm-1")


def test_concurrent_requests_decode_together(live: Live) -> None:
    async def four_at_once() -> list[Any]:
        client = live.async_client()
        return await asyncio.gather(
            *(
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, seed=i)
                for i in range(4)
            )
        )

    batches_before = live.worker.stats.batches
    replies = asyncio.run(four_at_once())
    assert [r.usage.completion_tokens for r in replies] == [60] * 4
    # continuous batching: each joins the running batch at the next engine step
    assert max(list(live.worker.stats.batch_sizes)[batches_before:]) >= 2


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir: Path, sqlite_url: str) -> None:
    with live_server(sqlite_url, tiny_model_dir, max_queue=1, max_batch=1) as server:
        client = server.client()
        running = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=1500, stream=True
        )
        next(c for c in running if c.choices[0].delta.content)  # decoding now: no longer queued
        queued: list[Any] = []
        waiter = threading.Thread(
            target=lambda: queued.append(
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
            )
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while server.worker.queued_rows < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.response.json()["error"]["code"] == "queue_full"
        assert server.worker.stats.rejected == 1
        running.close()  # the client goes away: its generation is cancelled, the queued one runs
        waiter.join(60)
        assert queued and queued[0].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_switching_the_served_model_keeps_in_flight_requests(
    tiny_model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    with live_server(sqlite_url, tiny_model_dir) as server:
        with session_scope(server.app.state.engine) as session:
            register_model_version(session, name="v2", kind="policy", path=other)
        client = server.client()
        # load v2 first (a request may name any registered version), so the switch itself is instant
        assert client.chat.completions.create(model="v2", messages=MESSAGES, max_tokens=1).model == "v2"

        stream = client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=300, stream=True
        )
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices[0].delta.content:
                break  # decoding on the old model
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"})
        denied = httpx.post(
            f"{server.url}/v1/admin/served",
            json={"model": "v2"},
            headers={"Authorization": f"Bearer {server.user_key}"},
        )
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        assert admin.post("/v1/admin/served", json={"model": "nope"}).status_code == 404
        switched = admin.post("/v1/admin/served", json={"model": "v2"})
        assert switched.status_code == 200 and switched.json()["served"] == "v2"
        assert server.worker.stats.completed == 1, "the in-flight stream should not have finished yet"

        chunks += list(stream)
        assert {c.model for c in chunks} == {"tiny"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "length"
        ]
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
        after = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3)
        assert after.model == "v2"
        assert server.worker.stats.cancelled == 0
        with session_scope(server.app.state.engine) as session:
            version = served_model(session)
            assert version is not None and version.name == "v2"


# --- logprobs, the engine's sampling parameters, refusals, /v1/completions --------------------------------


def test_chat_logprobs_come_in_openai_shape_streamed_or_not(live: Live) -> None:
    client = live.client()
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode("utf-8"))
        assert len(t.top_logprobs) == 3
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, stream=True
        )
    )
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ]
    assert all(t.top_logprobs == [] for t in streamed)

    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_vllm_sampling_extras_and_penalties_are_honoured(live: Live) -> None:
    client = live.client()

    def reply(**extra: Any) -> str:
        r = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            extra_body=extra.pop("body", None),
            **extra,
        )
        return r.choices[0].message.content or ""

    greedy = reply()
    assert reply(body={"top_k": 1}) == greedy == reply(body={"min_p": 0.0})
    assert reply(frequency_penalty=2.0) != greedy or reply(body={"repetition_penalty": 5.0}) != greedy
    assert reply(presence_penalty=0.0) == greedy
    with pytest.raises(openai.BadRequestError) as err:
        reply(body={"min_p": 1.5})
    assert err.value.body["param"] == "min_p"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"made_up_knob": 1}, "made_up_knob"),
    ],
)
def test_unimplemented_parameters_are_refused_with_400_naming_them(
    live: Live, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body=extra)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param and body["code"] == "unsupported_parameter"
    assert param in body["message"]


def test_no_op_forms_of_unimplemented_parameters_are_accepted(live: Live) -> None:
    reply = live.client().chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=2,
        response_format={"type": "text"},
        tools=[],
        user="someone",
        metadata={"a": "b"},
    )
    assert reply.choices[0].finish_reason == "length"


def test_completions_complete_prompt_strings(live: Live) -> None:
    client = live.client()
    one = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and one.model == "tiny"
    assert len(one.choices) == 1 and one.choices[0].finish_reason == "length" and one.choices[0].text
    assert one.usage is not None and one.usage.completion_tokens == 6
    default = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0)
    assert default.usage is not None and default.usage.completion_tokens == 16  # OpenAI's default

    many = client.completions.create(
        model="tiny", prompt=["Once upon a time", "The sky is"], max_tokens=6, temperature=0, n=2, logprobs=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text  # greedy: n copies
    lp = many.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == many.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.completions.create(
        model="tiny", prompt=["Once upon a time", "The sky is"], max_tokens=6, temperature=0, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts[0] == one.choices[0].text and texts[1] == many.choices[2].text
    assert finishes == {0: "length", 1: "length"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"echo": True}, "echo"), ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of")],
)
def test_completions_refuse_what_they_do_not_implement(live: Live, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.client().completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body=extra)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param

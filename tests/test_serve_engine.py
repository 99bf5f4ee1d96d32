"""The server's generations on the engine (tiny model, CPU): continuous batching counted in scheduler steps,
fair admission across users through the HTTP API, cancellation freeing KV slots, greedy unchanged by
company."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI
from sqlalchemy import Engine

from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.decoding import Event, Generation, TextDelta
from dialoop.serve.models import ModelRegistry
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store import session_scope
from dialoop.store.accounts import create_api_key, create_user
from dialoop.store.db import make_engine

HELLO: list[Any] = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def registry(sqlite_url: str, tiny_model_dir: Path) -> ModelRegistry:
    store: Engine = make_engine(sqlite_url)
    return ModelRegistry.open(store, tiny_model_dir, name="tiny")


async def _first_text(gen: Generation) -> AsyncGenerator[Event, None]:
    """Wait for `gen`'s first text; returns its events, which the caller keeps (closing them cancels)."""
    events = gen.events()
    async for event in events:
        if isinstance(event, TextDelta) and event.text:
            return events
    raise AssertionError("the generation ended before any text")


def _run(registry: ModelRegistry, body: Any, **options: Any) -> Any:
    async def main() -> Any:
        worker = GenerationWorker(registry, **options)
        await worker.start()
        try:
            return await body(worker)
        finally:
            await worker.stop()

    return asyncio.run(main())


def test_a_request_arriving_mid_batch_gets_its_first_token_at_the_next_step(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        busy = [await worker.submit(HELLO, max_tokens=1000, seed=i, owner="a") for i in range(3)]
        streams = [await _first_text(gen) for gen in busy]
        engine = worker.engine_of()
        assert engine is not None
        steps_before = engine.steps
        late = await worker.submit(HELLO, max_tokens=4, owner="b")
        await late.result()
        assert late.submitted_step is not None and late.submitted_step >= steps_before
        first = late.first_token_steps[0]
        assert first is not None
        # admitted, prefilled and sampled in the step after its submission (0: the step running at its
        # submission had not admitted yet)
        assert first - late.submitted_step <= 1
        assert not all(g.finished.is_set() for g in busy), "the batch should still be decoding"
        # a prompt longer than a prefill chunk takes one step per chunk, interleaved with the decoding rows
        long_prompt = list(range(10, 160))  # 150 tokens: 3 chunks of 64
        chunked = await worker.submit(prompt_ids=long_prompt, max_tokens=2, owner="b")
        await chunked.result()
        assert chunked.submitted_step is not None and chunked.first_token_steps[0] is not None
        assert chunked.first_token_steps[0] - chunked.submitted_step <= 3
        for stream in streams:
            await stream.aclose()  # the consumers leave: their generations are cancelled
        ends = [(await g.result())[0].finish_reason for g in busy]
        assert ends == ["cancelled"] * 3
        assert worker.metrics()["kv_slots_used"] == 0

    _run(registry, body, prefill_chunk=64)


def test_cancelling_frees_the_slot_for_the_next_request(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        running = await worker.submit(HELLO, max_tokens=1500, owner="a")
        stream = await _first_text(running)
        waiting = await worker.submit(HELLO, max_tokens=3, owner="a")
        assert worker.metrics()["kv_slots_used"] == 1 and worker.metrics()["queue_depth"] == 1
        running.cancel()
        assert (await waiting.result())[0].finish_reason == "length"
        assert (await running.result())[0].finish_reason == "cancelled"
        metrics = worker.metrics()
        assert metrics["kv_slots_used"] == 0 and metrics["rows_running"] == 0 and metrics["queue_depth"] == 0
        # a request cancelled while it waits for a slot never takes one
        blocker = await worker.submit(HELLO, max_tokens=1500, owner="a")
        blocking = await _first_text(blocker)
        queued = await worker.submit(HELLO, max_tokens=3, owner="a")
        queued.cancel()
        assert (await queued.result())[0].finish_reason == "cancelled"
        assert worker.metrics()["queue_depth"] == 0
        await blocking.aclose()
        await blocker.result()
        del stream
        assert worker.metrics()["kv_slots_used"] == 0

    _run(registry, body, max_batch=1)


def test_many_mixed_requests_leave_nothing_behind(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        gens = []
        for i in range(60):
            gen = await worker.submit(HELLO, max_tokens=1 + i % 7, seed=i, n=1 + i % 2, owner=f"u{i % 5}")
            if i % 4 == 0:
                gen.cancel()
            gens.append(gen)
        results = await asyncio.gather(*(g.result() for g in gens))
        assert all(r.finish_reason in ("length", "stop", "cancelled") for rs in results for r in rs)
        metrics = worker.metrics()
        assert metrics["kv_slots_used"] == 0 and metrics["rows_running"] == 0 and metrics["queue_depth"] == 0
        engine = worker.engine_of()
        assert engine is not None and engine.slots.free == engine.config.max_rows
        assert worker.stats.completed + worker.stats.cancelled == 60

    _run(registry, body, max_batch=4, max_queue=128)


@pytest.fixture
def two_users(tiny_model_dir: Path, sqlite_url: str) -> Iterator[tuple[str, GenerationWorker, str, str]]:
    """A server with one KV slot (so admission order is visible) and the API keys of users A and B."""
    settings = ServeSettings(max_batch=1, max_queue=64)
    app = create_app(
        database_url=sqlite_url, model=tiny_model_dir, model_name="tiny", serve_settings=settings
    )
    with session_scope(app.state.engine) as session:
        _, key_a = create_api_key(session, create_user(session, "anna", "user", "anna-password"))
        _, key_b = create_api_key(session, create_user(session, "bert", "user", "bert-password"))
    with serve_in_background(app) as url:
        yield url, app.state.worker, key_a, key_b


@pytest.mark.slow
def test_one_user_flooding_the_server_does_not_hold_back_another(
    two_users: tuple[str, GenerationWorker, str, str],
) -> None:
    url, worker, key_a, key_b = two_users

    async def main() -> list[str]:
        a = AsyncOpenAI(base_url=f"{url}/v1", api_key=key_a, max_retries=0, timeout=120)
        b = AsyncOpenAI(base_url=f"{url}/v1", api_key=key_b, max_retries=0, timeout=120)
        done: list[str] = []

        async def ask(client: AsyncOpenAI, who: str) -> None:
            await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, seed=1)
            done.append(who)

        flood = [asyncio.ensure_future(ask(a, f"a{i}")) for i in range(20)]
        deadline = time.monotonic() + 60
        while worker.queued_rows < 15:  # A's requests wait for the single slot
            assert time.monotonic() < deadline, "A's requests never queued"
            await asyncio.sleep(0.01)
        await ask(b, "b")
        await asyncio.gather(*flood)
        return done

    done = asyncio.run(main())
    # B's one request was admitted at the first free slot, before A's waiting ones: at most the requests
    # of A that held or had just taken the slot finish before it
    assert done.index("b") <= 2, done


@pytest.mark.slow
def test_greedy_through_the_server_is_the_same_alone_and_in_company(
    tiny_model_dir: Path, sqlite_url: str
) -> None:
    app = create_app(database_url=sqlite_url, model=tiny_model_dir, model_name="tiny")
    with session_scope(app.state.engine) as session:
        _, key = create_api_key(session, create_user(session, "anna", "user", "anna-password"))
    with serve_in_background(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        alone = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)

        async def in_company() -> Any:
            aclient = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
            others = [
                aclient.chat.completions.create(
                    model="tiny",
                    messages=[
                        {"role": "user", "content": "Something else, much longer, to pad the batch " * i}
                    ],
                    max_tokens=40,
                    seed=i,
                )
                for i in range(1, 4)
            ]
            greedy = aclient.chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=24, temperature=0
            )
            return (await asyncio.gather(greedy, *others))[0]

        together = asyncio.run(in_company())
    assert together.choices[0].message.content == alone.choices[0].message.content


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(
    registry: ModelRegistry,
) -> None:
    async def body(worker: GenerationWorker) -> None:
        vocab = registry._loaded["tiny"].model.config.vocab_size
        bad = await worker.submit(
            prompt_ids=[vocab + 5], max_tokens=4, owner="a"
        )  # the embedding lookup fails
        (end,) = await bad.result()
        assert end.finish_reason == "error"
        assert worker.stats.failed == 1
        good = await worker.submit(HELLO, max_tokens=4, owner="b")
        assert (await good.result())[0].finish_reason == "length"
        metrics = worker.metrics()
        assert metrics["kv_slots_used"] == 0 and metrics["rows_running"] == 0

    _run(registry, body)

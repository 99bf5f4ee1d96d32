"""The generation worker on a real tiny model: batching, streamed text, stop strings, EOS, cancellation,
the bounded queue, and swapping the served model under in-flight generations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from sqlalchemy import Engine
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from dialoop.modeling.chat import encode_prompt
from dialoop.modeling.tiny import make_tiny_model
from dialoop.serve.decoding import ChoiceEnd, Generation, TextDelta
from dialoop.serve.models import ModelRegistry, UnknownModel
from dialoop.serve.worker import ContextTooLong, GenerationWorker, QueueFull
from dialoop.store import session_scope
from dialoop.store.db import make_engine
from dialoop.store.registry import register_model_version, served_model, set_served

T = TypeVar("T")
HELLO = [{"role": "user", "content": "Hello there"}]
EOS_ID = 2


@pytest.fixture
def store(sqlite_url: str) -> Engine:
    return make_engine(sqlite_url)


@pytest.fixture
def registry(store: Engine, tiny_model_dir: Path) -> ModelRegistry:
    return ModelRegistry.open(store, tiny_model_dir, name="tiny")


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose every step samples EOS with probability 0.2, uniform over the other tokens.

    Every position sees the same hidden state (equal embeddings, attention and MLP outputs zeroed), so
    the logits are 0 for every token but EOS, whose logit is set to give it probability 0.2.
    """
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    vocab = config.vocab_size
    eos_logit = float(torch.log(torch.tensor(0.25 * (vocab - 1))))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS_ID].fill_(eos_logit / config.hidden_size)
    out = tmp_path_factory.mktemp("eos") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    for name in ("generation_config.json", "chat_template.jinja"):
        (out / name).write_bytes((tiny_model_dir / name).read_bytes())
    return out


def with_worker(
    registry: ModelRegistry, body: Callable[[GenerationWorker], Awaitable[T]], **options: Any
) -> T:
    """Run `body` against a started worker, stopping it afterwards."""

    async def main() -> T:
        worker = GenerationWorker(registry, **options)
        await worker.start()
        try:
            return await body(worker)
        finally:
            await worker.stop()

    return asyncio.run(main())


async def first_delta(gen: Generation, events: Any) -> None:
    """Wait until `gen` is decoding (its first text arrived)."""
    async for event in events:
        if isinstance(event, TextDelta):
            return
    raise AssertionError(f"generation {gen.id} ended before producing text")


def test_concurrent_requests_decode_together(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        gens = await asyncio.gather(*(worker.submit(HELLO, max_tokens=40, seed=i) for i in range(4)))
        results = await asyncio.gather(*(g.result() for g in gens))
        assert [r[0].completion_tokens for r in results] == [40] * 4
        assert worker.stats.largest_batch == 4
        assert worker.stats.completed == 4 and worker.stats.tokens_generated == 160
        metrics = worker.metrics()
        assert metrics["tokens_generated_total"] == 160 and metrics["kv_slots_total"] == 16
        assert metrics["kv_slots_used"] == metrics["rows_running"] == metrics["queue_depth"] == 0

    with_worker(registry, body)


def test_a_seeded_reply_is_the_same_alone_and_in_a_batch(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> tuple[str, str, str]:
        alone = (await (await worker.submit(HELLO, max_tokens=12, seed=42)).result())[0].text
        gens = await asyncio.gather(
            worker.submit([{"role": "user", "content": "Something much longer, to pad the batch."}], seed=1),
            worker.submit(HELLO, max_tokens=12, seed=42),
            worker.submit(HELLO, max_tokens=12, seed=43),
        )
        results = await asyncio.gather(*(g.result() for g in gens))
        return alone, results[1][0].text, results[2][0].text

    alone, batched, other_seed = with_worker(registry, body, default_max_tokens=20)
    assert alone == batched
    assert other_seed != alone


def test_streamed_deltas_add_up_to_the_result_and_every_choice_ends(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        gen = await worker.submit(HELLO, max_tokens=10, n=2, seed=3)
        texts = ["", ""]
        ends: list[ChoiceEnd] = []
        async for event in gen.events():
            if isinstance(event, TextDelta):
                assert not any(e.index == event.index for e in ends), "text after the choice ended"
                texts[event.index] += event.text
            else:
                ends.append(event)
        results = await gen.result()
        assert texts == [r.text for r in results]
        assert texts[0] != texts[1]  # choice i is seeded with seed + i
        assert sorted((e.index, e.finish_reason, e.completion_tokens) for e in ends) == [
            (0, "length", 10),
            (1, "length", 10),
        ]
        tokenizer = registry._loaded["tiny"].tokenizer
        assert results[0].text == tokenizer.decode(results[0].token_ids, skip_special_tokens=True)
        assert gen.prompt_tokens == len(encode_prompt(tokenizer, HELLO))

    with_worker(registry, body)


def test_a_stop_string_cuts_the_reply_before_it(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        full = (await (await worker.submit(HELLO, max_tokens=30, temperature=0)).result())[0]
        stop = full.text[12:15]
        expected = full.text[: full.text.index(stop)]
        gen = await worker.submit(HELLO, max_tokens=30, temperature=0, stop=["never-there", stop])
        streamed = "".join([e.text async for e in gen.events() if isinstance(e, TextDelta)])
        cut = (await gen.result())[0]
        assert streamed == cut.text == expected
        assert cut.finish_reason == "stop"
        assert cut.completion_tokens < 30

    with_worker(registry, body)


def test_a_reply_ending_with_eos_has_finish_reason_stop(store: Engine, eos_model_dir: Path) -> None:
    registry = ModelRegistry.open(store, eos_model_dir)

    async def body(worker: GenerationWorker) -> None:
        gen = await worker.submit(HELLO, max_tokens=200, n=4, seed=0)
        for r in await gen.result():
            assert r.finish_reason == "stop"
            assert r.token_ids[-1] == EOS_ID and EOS_ID not in r.token_ids[:-1]
            assert r.completion_tokens == len(r.token_ids) < 200
            assert "<|im_end|>" not in r.text

    with_worker(registry, body)


def test_a_consumer_that_leaves_cancels_its_generation(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        gen = await worker.submit(HELLO, max_tokens=1500)
        deltas = 0
        async for event in gen.events():
            deltas += isinstance(event, TextDelta)
            if deltas == 3:
                break  # like a client that disconnects
        await asyncio.wait_for(gen.finished.wait(), 30)
        result = (await gen.result())[0]
        assert result.finish_reason == "cancelled"
        assert result.completion_tokens < 1500
        assert worker.stats.cancelled == 1 and list(worker.stats.cancelled_ids) == [gen.id]
        assert worker.stats.completed == 0

        # cancel by id (the chat page's stop button) works the same way
        other = await worker.submit(HELLO, max_tokens=1500)
        other_events = other.events()  # kept: an iterator collected early would cancel its generation
        await first_delta(other, other_events)
        assert worker.cancel(other.id)
        await asyncio.wait_for(other.finished.wait(), 30)
        assert worker.stats.cancelled == 2
        assert not worker.cancel("no-such-id")

    with_worker(registry, body)


def test_a_full_queue_refuses_new_work_with_retry_after(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        running = await worker.submit(HELLO, max_tokens=1500)
        running_events = running.events()  # kept: an iterator collected early would cancel its generation
        await first_delta(running, running_events)
        queued = [await worker.submit(HELLO, max_tokens=2) for _ in range(2)]
        assert worker.queued_rows == 2
        with pytest.raises(QueueFull) as refused:
            await worker.submit(HELLO, max_tokens=2)
        assert refused.value.retry_after >= 1
        assert worker.stats.rejected == 1
        running.cancel()
        for gen in queued:
            assert (await gen.result())[0].finish_reason == "length"
        assert worker.queued_rows == 0

    with_worker(registry, body, max_queue=2, max_batch=1)


def test_the_context_bounds_max_tokens(registry: ModelRegistry) -> None:
    async def body(worker: GenerationWorker) -> None:
        long_prompt = [5] * 2040  # the tiny model's context is 2048 tokens
        with pytest.raises(ContextTooLong, match="exceeds the context"):
            await worker.submit(prompt_ids=long_prompt, max_tokens=20)
        with pytest.raises(ContextTooLong):
            await worker.submit(prompt_ids=[5] * 2048)
        fitted = await worker.submit(prompt_ids=long_prompt)  # no max_tokens: as many as fit
        assert fitted.params[0].max_tokens == 8
        assert (await fitted.result())[0].completion_tokens <= 8
        with pytest.raises(UnknownModel):
            await worker.submit(HELLO, model="no-such-model")
        assert worker.queued_rows == 0

    with_worker(registry, body, default_max_tokens=64)


@pytest.mark.slow
def test_swapping_the_served_model_keeps_in_flight_generations(
    store: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    other_dir = make_tiny_model(tmp_path / "other", seed=1)
    with session_scope(store) as session:
        register_model_version(session, name="other", kind="policy", path=other_dir)
    registry = ModelRegistry.open(store, tiny_model_dir, name="tiny", max_loaded=1)

    async def body(worker: GenerationWorker) -> None:
        old = await worker.submit(HELLO, max_tokens=400)
        events = old.events()
        await first_delta(old, events)
        await registry.set_served("other")
        assert not old.finished.is_set(), "the old generation should still be decoding"
        assert set(registry.loaded()) == {"tiny", "other"}  # in use, so not evicted despite max_loaded=1
        new = await worker.submit(HELLO, max_tokens=4)
        async for _ in events:
            pass
        old_result, new_result = (await old.result())[0], (await new.result())[0]
        assert (old.model, old_result.finish_reason, old_result.completion_tokens) == ("tiny", "length", 400)
        assert (new.model, new_result.completion_tokens) == ("other", 4)
        assert registry.loaded() == ["other"]  # the old one went once idle
        assert worker.stats.cancelled == 0 and worker.stats.completed == 2

    with_worker(registry, body)
    with session_scope(store) as session:
        version = served_model(session)
        assert version is not None and version.name == "other"


def test_the_model_served_at_start_is_the_flag_else_the_store_s_served_version(
    store: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with session_scope(store) as session:
        old = register_model_version(session, name="sft-1", kind="policy", path=tmp_path / "sft-1")
        register_model_version(session, name="sft-2", kind="policy", path=tmp_path / "sft-2")
        register_model_version(session, name="tiny-v", kind="policy", path=tiny_model_dir)
        set_served(session, old.id)
    assert ModelRegistry.open(store).served == "sft-1"
    assert ModelRegistry.open(store, "sft-2").served == "sft-2"
    by_path = ModelRegistry.open(store, tiny_model_dir)  # a registered directory goes by its version name
    assert by_path.served == "tiny-v" and by_path.base.version_id is not None
    named = ModelRegistry.open(store, tiny_model_dir, name="mine")
    assert named.served == "mine" and named.resolve("default").name == "mine"
    assert [e.name for e in named.entries()] == ["mine", "sft-1", "sft-2", "tiny-v"]

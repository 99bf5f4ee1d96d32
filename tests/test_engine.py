"""The generation engine on tiny random models: continuous batching, determinism, sampling parameters,
logprobs, stop strings, cancellation, fair admission and the queue limit. Real forward passes, fp32."""

from __future__ import annotations

import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from dialoop.engine import Completion, Engine, EngineConfig, QueueFull, SamplingParams
from dialoop.engine.request import Request
from dialoop.engine.sampler import _apply_penalties, sample_next

EOS = 2
PROMPTS = [[1, 9690, 198, 2683, 314], [1, 4093, 198], [1, 17535, 30, 2683, 314, 253, 1345, 28, 418, 314, 7]]
LONG = [1, *range(300, 337)]  # 38 tokens


def _with_head(tiny_model_dir: Path, eos_bias: float) -> PreTrainedModel:
    """The tiny model with an untied head whose distributions are as peaked as a trained model's."""
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight * 20.0)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    m.lm_head = head
    return m


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return _with_head(tiny_model_dir, eos_bias=-100.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _engine(model: torch.nn.Module, **config: int) -> Engine:
    return Engine(model, eos_token_ids=[EOS], config=EngineConfig(**config))


def _alone(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> list[int]:
    return _engine(model).generate([prompt], params)[0].token_ids


def _run(engine: Engine) -> None:
    while engine.has_work:
        engine.step()


def test_greedy_replies_equal_transformers_generate(model: PreTrainedModel) -> None:
    """The engine's greedy replies, batched and prefilled in chunks of 4, are transformers' own greedy
    decoding of each prompt alone."""
    got = _engine(model, max_rows=4, prefill_chunk=4).generate(
        PROMPTS, SamplingParams(max_tokens=10, temperature=0)
    )
    for prompt, c in zip(PROMPTS, got, strict=True):
        hf = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
        assert c.token_ids == hf[0, len(prompt) :].tolist()
        assert c.finish_reason == "length"


def test_request_joining_a_running_batch_gets_the_tokens_it_gets_alone(model: PreTrainedModel) -> None:
    """Rows at different positions, in non-consecutive slots, with a newcomer prefilling beside them: each
    request's greedy and seeded reply is exactly its reply alone. Batch composition changes CPU logits by
    float noise (~1e-6), which can only flip a draw in the far tail, so seeded rows here use top-p < 1."""
    engine = _engine(model, max_rows=4, prefill_chunk=8)
    params = [
        SamplingParams(max_tokens=16, temperature=0),
        SamplingParams(max_tokens=16, temperature=0.9, seed=1),
        SamplingParams(max_tokens=16, temperature=0.7, top_p=0.8, seed=2),
    ]
    first = [engine.submit(p, q) for p, q in zip(PROMPTS, params, strict=True)]
    for _ in range(3):
        engine.step()
    first[1].cancel()  # frees slot 1: the running rows now sit in slots 0 and 2
    engine.step()
    late = [
        engine.submit(LONG, SamplingParams(max_tokens=12, temperature=0)),
        engine.submit(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.1, top_p=0.95, seed=5)),
    ]
    _run(engine)
    for h, prompt, p in ((first[0], PROMPTS[0], params[0]), (first[2], PROMPTS[2], params[2])):
        assert h.result().token_ids == _alone(model, prompt, p)
    assert late[0].result().token_ids == _alone(model, LONG, SamplingParams(max_tokens=12, temperature=0))
    seeded = SamplingParams(max_tokens=12, temperature=1.1, top_p=0.95, seed=5)
    assert late[1].result().token_ids == _alone(model, PROMPTS[1], seeded)
    assert _alone(
        model, PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.1, top_p=0.95, seed=6)
    ) != _alone(model, PROMPTS[1], seeded), "another seed should give another reply: the seed is really used"


def test_rows_at_different_positions_on_an_absolute_position_model() -> None:
    """RoPE hides wrong position ids; GPT-2's learned positions do not: staggered rows equal each alone."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=49152, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=EOS
        )
    ).eval()
    engine = _engine(gpt2, max_rows=3, prefill_chunk=4)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    handles = []
    for prompt in PROMPTS:
        handles.append(engine.submit(prompt, greedy))
        engine.step()
    _run(engine)
    assert [h.result().token_ids for h in handles] == [_alone(gpt2, p, greedy) for p in PROMPTS]


def test_chunked_prefill_keeps_decoding_rows_moving_and_first_token_comes_in_its_last_chunk_step(
    model: PreTrainedModel,
) -> None:
    engine = _engine(model, max_rows=2, prefill_chunk=8)
    running = engine.submit(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    late = engine.submit(LONG, SamplingParams(max_tokens=4, temperature=0))
    chunks = -(-len(LONG) // 8)  # 5 steps of at most 8 prompt tokens
    for step in range(1, chunks + 1):
        events = {e.request_id: e for e in engine.step()}
        assert len(events[running.id].token_ids) == 1, "the decoding row emits a token every step"
        assert (late.id in events) == (step == chunks), "the newcomer's first token comes with its last chunk"
    assert len(events[late.id].token_ids) == 1
    assert engine.runner.cache.nbytes() > 0


def test_logprobs_equal_a_full_forward_over_prompt_and_reply(model: PreTrainedModel) -> None:
    """Logprobs are the raw model's log-softmax (not the temperature-scaled one), with top alternatives."""
    engine = _engine(model, max_rows=3, prefill_chunk=4)
    params = SamplingParams(max_tokens=8, temperature=1.3, seed=3, logprobs=True, top_logprobs=5)
    for c in engine.generate(PROMPTS, params):
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for i, info in enumerate(c.logprobs):
            row = full[len(c.prompt_ids) - 1 + i]
            assert info.token_id == c.token_ids[i]
            assert abs(info.logprob - float(row[info.token_id])) < 1e-4
            best = row.topk(5)
            assert [t for t, _ in info.top] == best.indices.tolist()
            assert max(abs(lp - float(v)) for (_, lp), v in zip(info.top, best.values, strict=True)) < 1e-4
    assert engine.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0].logprobs == []


def test_stop_string_split_across_two_tokens_ends_the_reply_and_is_left_out(
    model: PreTrainedModel, tokenizer: object
) -> None:
    decode = tokenizer.decode  # type: ignore[attr-defined]
    engine = Engine(model, eos_token_ids=[EOS], decode=decode)
    free = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0))[0]
    assert free.text == decode(free.token_ids)
    # a stop string made of the last character of token k's text and the first of token k + 1's
    for k in range(10):
        upto, after = decode(free.token_ids[: k + 1]), decode(free.token_ids[: k + 2])
        stop = upto[-1:] + after[len(upto) : len(upto) + 1]
        if len(stop) == 2 and after.startswith(upto) and stop not in upto:
            break
    else:
        pytest.fail(f"no stop string spanning two tokens in {free.text!r}")
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    _run(engine)
    streamed = "".join(e.text for e in handle.events())
    c = handle.result()
    assert c.finish_reason == "stop"
    assert c.token_ids == free.token_ids[: k + 2]
    assert c.text == upto[:-1] and streamed == c.text and stop not in c.text


def test_stop_token_ids_and_eos_end_the_reply_without_text(model: PreTrainedModel, tokenizer: object) -> None:
    engine = Engine(model, eos_token_ids=[EOS], decode=tokenizer.decode)  # type: ignore[attr-defined]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    free = engine.generate(PROMPTS[2:], params)[0]
    stop_id = free.token_ids[3]
    end = free.token_ids.index(stop_id)
    c = engine.generate(PROMPTS[2:], replace(params, stop_token_ids=(stop_id,)))
    assert c[0].finish_reason == "stop" and c[0].token_ids == free.token_ids[: end + 1]
    assert c[0].text == tokenizer.decode(free.token_ids[:end])  # type: ignore[attr-defined]
    model.lm_head.bias.data[EOS] = 100.0  # type: ignore[index]
    try:
        c = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=6))
    finally:
        model.lm_head.bias.data[EOS] = -100.0  # type: ignore[index]
    assert c[0].finish_reason == "stop" and c[0].token_ids == [EOS] and c[0].text == ""


@pytest.mark.slow
def test_a_thousand_mixed_requests_with_cancels_leak_no_slot_or_queue_entry(
    model: PreTrainedModel, tokenizer: object
) -> None:
    """Cancels (waiting and running), EOS, stop strings, max_tokens, shared prefixes and lengths mixed."""
    engine = Engine(
        model,
        eos_token_ids=[EOS],
        config=EngineConfig(max_rows=8, prefill_chunk=4, max_queue=1000, max_rows_per_owner=5),
        decode=tokenizer.decode,  # type: ignore[attr-defined]
    )
    rng = random.Random(0)
    system = [1, *range(500, 512)]  # a 13-token prefix that many prompts share
    handles = []
    for i in range(1000):
        tail = [rng.randrange(3, 49152) for _ in range(rng.randrange(1, 10))]
        prompt = [*system, *tail] if rng.random() < 0.5 else [1, *tail]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 6),
            temperature=rng.choice([0, 1.0]),
            seed=i,
            stop=tuple(rng.sample("aeiou ", 2)) if rng.random() < 0.3 else (),
            stop_token_ids=(rng.randrange(3, 49152),) if rng.random() < 0.1 else (),
        )
        handles.append(engine.submit(prompt, params, owner=f"user{i % 7}"))
        if rng.random() < 0.2:
            rng.choice(handles).cancel()
        if i % 3 == 0:
            engine.step()
    size = engine.runner.cache.nbytes()
    _run(engine)
    reasons = [h.result(timeout=0).finish_reason for h in handles]
    assert set(reasons) == {"length", "cancelled", "stop"}
    assert engine.slots.free == 8 and not engine.running and engine.scheduler.waiting == 0
    assert engine._requests == {} and engine.scheduler.running_owners == 0
    assert engine.prefix_copies > 0, "prompts sharing the system prefix should have copied it"
    assert engine.runner.cache.nbytes() == size, "the KV cache never grows"


def test_n_replies_to_one_prompt_prefill_it_once_and_equal_their_replies_alone(
    model: PreTrainedModel,
) -> None:
    """Followers copy the prompt's keys and values from the request that computed them, then prefill only
    the last token; each seeded reply is still the one it gets alone."""
    engine = _engine(model, max_rows=4)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=s) for s in range(4)]
    got = engine.generate([PROMPTS[2]] * 4, params)
    assert engine.prefill_tokens == len(PROMPTS[2]) + 3
    for c, p in zip(got, params, strict=True):
        assert c.token_ids == _alone(model, PROMPTS[2], p)
    assert len({tuple(c.token_ids) for c in got}) > 1


def test_a_shared_system_prefix_is_prefilled_once_even_across_chunks_and_steps(
    model: PreTrainedModel,
) -> None:
    """Prompts with a common 30-token start and their own tails: the later ones wait for the prefix (it takes
    several chunks), copy it, and prefill their tails; a request arriving later copies from a running one."""
    system = [1, *range(600, 629)]
    prompts = [[*system, 7, 8, 9], [*system, 11], [*system, 12, 13, 14, 15, 16]]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    engine = _engine(model, max_rows=4, prefill_chunk=8)
    handles = [engine.submit(p, greedy) for p in prompts]
    engine.step()
    late = engine.submit([*system, 40, 41], SamplingParams(max_tokens=8, temperature=0.8, seed=9))
    _run(engine)
    assert engine.prefill_tokens == len(prompts[0]) + 1 + 5 + 2
    for h, p in zip(handles, prompts, strict=True):
        assert h.result().token_ids == _alone(model, p, greedy)
    assert late.result().token_ids == _alone(
        model, [*system, 40, 41], SamplingParams(max_tokens=8, temperature=0.8, seed=9)
    )


def test_a_follower_whose_source_is_cancelled_before_the_prefix_is_ready_prefills_alone(
    model: PreTrainedModel,
) -> None:
    system = [1, *range(700, 730)]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    engine = _engine(model, max_rows=2, prefill_chunk=4)
    source = engine.submit([*system, 5], greedy)
    follower = engine.submit([*system, 6, 7], greedy)
    engine.step()  # both admitted: the source prefilled 4 of 31 tokens, the follower waits
    source.cancel()
    _run(engine)
    assert source.result().finish_reason == "cancelled"
    assert follower.result().token_ids == _alone(model, [*system, 6, 7], greedy)
    assert engine.prefix_copies == 0 and engine.slots.free == 2


def test_cancel_frees_a_running_slot_at_the_next_step_and_drops_a_waiting_request(
    model: PreTrainedModel,
) -> None:
    engine = _engine(model, max_rows=1)
    running = engine.submit(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0))
    waiting = engine.submit(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    waiting.cancel()
    assert waiting.finished and engine.scheduler.waiting == 0
    running.cancel()
    assert engine.slots.free == 0
    events = engine.step()
    assert engine.slots.free == 1 and not engine.has_work
    assert [(e.request_id, e.finish_reason) for e in events] == [(running.id, "cancelled")]
    assert running.result().finish_reason == "cancelled" and len(running.result().token_ids) == 1


def test_a_second_owner_is_admitted_before_the_first_owners_backlog(model: PreTrainedModel) -> None:
    engine = _engine(model, max_rows=2)
    a = [engine.submit(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0), owner="A") for _ in range(20)]
    engine.step()
    b = engine.submit(PROMPTS[1], SamplingParams(max_tokens=2, temperature=0), owner="B")
    first_event: list[str] = []  # request ids in the order they got their first token
    while engine.has_work:
        first_event += [e.request_id for e in engine.step() if e.request_id not in first_event]
    assert b.finished and all(h.finished for h in a)
    # A's first two finish (their second tokens come first), and B takes the first slot they free
    assert first_event[:4] == [a[0].id, a[1].id, b.id, a[2].id]


def test_max_rows_per_owner_caps_one_owners_slots(model: PreTrainedModel) -> None:
    engine = _engine(model, max_rows=4, max_rows_per_owner=2)
    for _ in range(5):
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0), owner="A")
    engine.submit(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0), owner="B")
    engine.step()
    assert sorted(r.owner for r in engine.running) == ["A", "A", "B"]
    _run(engine)


def test_submit_past_max_queue_raises_queue_full(model: PreTrainedModel) -> None:
    engine = _engine(model, max_rows=1, max_queue=3)
    for _ in range(3):
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFull):
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=1))
    engine.step()  # one admitted: room for one more
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match="decode callback"):
        engine.submit(PROMPTS[0], SamplingParams(stop=("x",)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("seed", -1),
        ("seed", 2**63),
        ("top_logprobs", 21),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
    ],
)
def test_sampling_params_out_of_range_raise_value_error_naming_the_field(field: str, value: object) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value, **extra}).validate()  # type: ignore[arg-type]
    SamplingParams(seed=2**63 - 1, top_logprobs=20, logprobs=True).validate()


def _request(prompt: list[int], params: SamplingParams, output: list[int] = []) -> Request:  # noqa: B006
    r = Request("r", prompt, params, "", None)
    r.output_ids.extend(output)
    return r


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    _apply_penalties(logits, [_request([0], params, output=[1, 1])])
    # token 0 (prompt): 2 / 2; token 1 (reply twice): -1 * 2 - 2 * 0.5 - 0.25; tokens 2, 3 untouched
    assert logits.tolist() == [[1.0, -3.25, 0.5, 1.0]]


def test_top_k_min_p_and_top_p_narrow_the_draw() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])).repeat(4, 1)
    draws = {
        name: {
            sample_next(logits[:1], [_request([0], SamplingParams(temperature=1.0, seed=s, **kw))])[0][0]
            for s in range(60)
        }
        for name, kw in {
            "top_k": {"top_k": 2},
            "min_p": {"min_p": 0.6},
            "top_p": {"top_p": 0.65},
            "none": {},
        }.items()
    }
    assert draws == {"top_k": {1, 2}, "min_p": {1, 2}, "top_p": {1, 2}, "none": {0, 1, 2, 3}}
    penalised = _request([1], SamplingParams(temperature=0, repetition_penalty=3.0))
    greedy, _ = sample_next(logits[:2], [penalised, _request([1], SamplingParams(temperature=0))])
    assert greedy == [2, 1], "the prompt's token 1 loses to token 2 only in the penalised row"


def test_a_server_thread_steps_while_other_threads_submit_cancel_and_read(model: PreTrainedModel) -> None:
    engine = _engine(model, max_rows=3)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    results: dict[int, Completion] = {}
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=4)

    def client(i: int) -> None:
        h = engine.submit(PROMPTS[i % 3], params, owner=f"user{i}")
        tokens = [t for e in h.events(timeout=30) for t in e.token_ids]
        results[i] = h.result()
        assert tokens == results[i].token_ids

    def canceller() -> None:
        h = engine.submit(PROMPTS[0], SamplingParams(max_tokens=500, temperature=0))
        next(h.events(timeout=30))
        h.cancel()
        assert h.result(timeout=30).finish_reason == "cancelled"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)] + [
        threading.Thread(target=canceller)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert sorted(results) == list(range(6))
    for i, c in results.items():
        assert c.token_ids == _alone(model, PROMPTS[i % 3], params)
    assert engine.slots.free == 3


def test_a_policy_in_train_mode_is_sampled_in_eval_mode_and_left_in_train_mode(
    model: PreTrainedModel,
) -> None:
    """PPO hands its training policy to the engine between updates."""
    greedy = SamplingParams(max_tokens=4, temperature=0)
    want = _alone(model, PROMPTS[0], greedy)
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, _a: seen.append(m.training))
    model.train()
    try:
        assert _alone(model, PROMPTS[0], greedy) == want
        assert model.training and seen and not any(seen)
    finally:
        model.eval()
        hook.remove()


def test_eager_sdpa_and_ppo_fp32_sdpa_attention_all_run_on_the_slot_cache(tiny_model_dir: Path) -> None:
    """Eager attention gets an additive mask, SDPA kinds a boolean one: PPO's bf16 sampler with fp32 SDPA
    (queries fp32, weights bf16) samples too."""
    from dialoop.train.ppo_attention import use_fp32_attention

    greedy = SamplingParams(max_tokens=6, temperature=0)
    replies = {}
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
        replies[impl] = _engine(m, max_rows=3).generate(PROMPTS, greedy)
    assert [c.token_ids for c in replies["sdpa"]] == [c.token_ids for c in replies["eager"]]
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    use_fp32_attention(bf16)
    got = _engine(bf16, max_rows=3).generate(PROMPTS, greedy)
    assert all(len(c.token_ids) == 6 or c.finish_reason == "stop" for c in got)


def test_generate_replies_keeps_order_decodes_and_repeats_with_the_same_seeds(
    model: PreTrainedModel, tokenizer: object
) -> None:
    """Chat on the engine: replies in the conversations' order, each the one it gets alone, the same again
    for the same seeds; K candidates for one context share its prefill."""
    from dialoop.engine.chat import generate_replies
    from dialoop.modeling.chat import encode_prompt

    context = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]
    convs = [context, [{"role": "user", "content": "Hi"}], context, context]
    params = [SamplingParams(max_tokens=5, seed=i) for i in range(4)]
    replies = generate_replies(model, tokenizer, convs, params, batch_size=2)  # type: ignore[arg-type]
    assert generate_replies(model, tokenizer, convs, params, batch_size=3) == replies  # type: ignore[arg-type]
    for conv, p, r in zip(convs, params, replies, strict=True):
        alone = _alone(model, encode_prompt(tokenizer, conv), p)  # type: ignore[arg-type]
        assert r.token_ids == alone and not r.finished
        assert r.text == tokenizer.decode(alone, skip_special_tokens=True)  # type: ignore[attr-defined]

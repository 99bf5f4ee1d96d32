"""Sampling with a KV cache on a tiny random Llama: batching, seeds, greedy parity with HF, stopping rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from dialoop.modeling.chat import encode_prompt, generate_replies
from dialoop.modeling.generation import Completion, SamplingParams, _pick_tokens, sample

EOS, PAD = 2, 0
EOS_BIAS = 12.5
PROMPTS = [[1, 9690, 198, 2683, 314], [1, 4093, 198], [1, 17535, 30, 2683, 314, 253, 1345, 28, 418, 314, 7]]


def _with_head(tiny_model_dir: Path, scale: float, eos_bias: float) -> PreTrainedModel:
    """The tiny model with its own (untied) head: `scale` makes its next-token distributions as peaked as a
    trained model's (a random one is nearly uniform over 49k ids), `eos_bias` makes EOS likely."""
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight * scale)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    m.lm_head = head
    return m


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return _with_head(tiny_model_dir, scale=20.0, eos_bias=-100.0)


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir: Path) -> PreTrainedModel:
    """EOS comes about once in ten steps."""
    return _with_head(tiny_model_dir, scale=20.0, eos_bias=EOS_BIAS)


def _sample(
    model: PreTrainedModel, prompts: list[list[int]], params: object, **kw: object
) -> list[Completion]:
    return sample(model, prompts, params, eos_token_ids=[EOS], pad_token_id=PAD, **kw)  # type: ignore[arg-type]


def test_batched_seeded_sampling_equals_each_prompt_alone(model: PreTrainedModel) -> None:
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=s) for s in (11, 12, 13)]
    batched = _sample(model, PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, batched, strict=True):
        assert _sample(model, [prompt], p) == [got]
    assert all(len(c.token_ids) == 12 for c in batched)
    # a different seed gives a different reply: the seed is really used
    assert _sample(model, PROMPTS[:1], SamplingParams(max_new_tokens=12, seed=99))[0] != batched[0]


def test_rows_with_one_prompt_share_its_prefill_and_sample_as_alone(model: PreTrainedModel) -> None:
    """K replies to one context (a comparison task) prefill it once; each row still samples as if alone."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    params = [SamplingParams(max_new_tokens=10, temperature=0.8, seed=s) for s in range(21, 26)]
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        batched = _sample(model, prompts, params)
    finally:
        hook.remove()
    assert widths[0] == 2 and widths[1] == 5  # the prefill: the 2 distinct prompts; then one row per reply
    for prompt, p, got in zip(prompts, params, batched, strict=True):
        assert _sample(model, [prompt], p) == [got]
    assert len({tuple(c.token_ids) for c in batched}) == 5  # the copies did not share a random stream


def test_a_prefix_common_to_all_prompts_runs_once(model: PreTrainedModel) -> None:
    """A chat template's system prompt, say: one pass of one row, then every prompt's own tokens after it
    (padding between the two); greedy and seeded replies are those of each prompt alone."""
    system = [1, 9690, 198, 2683, 314, 253, 1345, 28, 418, 7]
    prompts = [[*system, 4093, 198], [*system, 17535, 30, 2683], [*system, 5]]
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        for params in (
            SamplingParams(max_new_tokens=8, temperature=0),
            [SamplingParams(max_new_tokens=8, temperature=0.8, seed=s) for s in (1, 2, 3)],
        ):
            shapes.clear()
            batched = _sample(model, prompts, params)
            assert shapes[:3] == [(1, 10), (3, 3), (3, 1)]  # the prefix, the rest of each prompt, a token
            alone = [
                _sample(model, [p], params if isinstance(params, SamplingParams) else params[i])[0]
                for i, p in enumerate(prompts)
            ]
            assert batched == alone
    finally:
        hook.remove()


def test_greedy_equals_hf_generate(model: PreTrainedModel) -> None:
    ours = _sample(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in PROMPTS]).unsqueeze(1)).long()
    hf = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    for row, c in zip(hf[:, width:].tolist(), ours, strict=True):
        assert c.token_ids == row[: len(c.token_ids)]
        assert len(c.token_ids) == 10 or c.finished


def test_left_padding_positions_on_absolute_position_model() -> None:
    # RoPE only sees relative positions, so a Llama hides wrong position ids; GPT-2's learned ones do not
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=49152, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=EOS
        )
    ).eval()
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    batched = _sample(gpt2, PROMPTS, greedy)
    assert batched == [_sample(gpt2, [p], greedy)[0] for p in PROMPTS]


def test_tiny_top_p_is_greedy(model: PreTrainedModel) -> None:
    greedy = _sample(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))
    nucleus = _sample(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=3))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


def test_pick_tokens_follows_nucleus_and_cdf() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    temperature, top_p = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.6, 1.0, 1.0])
    # row 0 keeps {1: 0.5, 2: 0.3} -> cdf [0.625, 1.0]; row 1 cdf over ids [0.2, 0.7, 1.0]; row 2 greedy
    assert _pick_tokens(logits, temperature, top_p, torch.tensor([0.7, 0.1, 0.99])).tolist() == [2, 0, 1]
    assert _pick_tokens(logits, temperature, top_p, torch.tensor([0.6, 0.69, 0.0])).tolist() == [1, 1, 1]


def test_on_step_stops_a_row_and_sees_done_rows_as_none(model: PreTrainedModel) -> None:
    seen: list[list[int | None]] = []

    def on_step(step: list[int | None]) -> list[int]:
        seen.append(step)
        return [1] if len(seen) == 3 else []

    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (6, 8, 2)]
    out = _sample(model, PROMPTS, params, on_step=on_step)
    assert [len(c.token_ids) for c in out] == [6, 3, 2]
    assert out[1].stopped and not out[1].finished
    assert not out[0].stopped and not out[2].stopped
    assert len(seen) == 6
    assert seen[3][1] is None and seen[2][2] is None and seen[1][2] is not None
    assert [s[0] for s in seen] == out[0].token_ids


def test_max_new_tokens_per_row(model: PreTrainedModel) -> None:
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=n) for n in (1, 5, 0)]
    out = _sample(model, PROMPTS, params)
    assert [len(c.token_ids) for c in out] == [1, 5, 0]
    assert not any(c.finished or c.stopped for c in out)


def test_eos_finishes_rows_independently(eos_model: PreTrainedModel) -> None:
    prompts = PROMPTS * 3
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=s) for s in range(len(prompts))]
    batched = _sample(eos_model, prompts, params)
    finished = [c for c in batched if c.finished]
    assert finished, "the EOS bias should end some replies"
    assert len({len(c.token_ids) for c in finished}) > 1, "rows should finish at different steps"
    for c in batched:
        assert (EOS in c.token_ids) == c.finished
        if c.finished:
            assert c.token_ids.index(EOS) == len(c.token_ids) - 1
    # dropping finished rows from the cache must not disturb the rows still running
    for prompt, p, got in zip(prompts, params, batched, strict=True):
        assert _sample(eos_model, [prompt], p) == [got]


def test_greedy_reply_ending_with_eos(eos_model: PreTrainedModel, tiny_model_dir: Path) -> None:
    eos_model.lm_head.bias.data[EOS] = 100.0  # type: ignore[index]
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        replies = generate_replies(
            eos_model, tokenizer, [[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0)
        )
    finally:
        eos_model.lm_head.bias.data[EOS] = EOS_BIAS  # type: ignore[index]
    assert replies[0].finished and replies[0].token_ids == [EOS] and replies[0].text == ""


def test_generate_replies_keeps_order_and_decodes(model: PreTrainedModel, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = [
        [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    ]
    params = [SamplingParams(max_new_tokens=5, seed=i) for i in range(3)]
    replies = generate_replies(model, tokenizer, convs, params, batch_size=2)
    for conv, p, r in zip(convs, params, replies, strict=True):
        alone = _sample(model, [encode_prompt(tokenizer, conv)], p)[0]
        assert r.token_ids == alone.token_ids
        assert r.text == tokenizer.decode(alone.token_ids, skip_special_tokens=True)


def test_encode_prompt_uses_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3  # one <|im_start|> per turn (the template's system turn included), no extra BOS


def test_bad_arguments_fail_clearly(model: PreTrainedModel) -> None:
    with pytest.raises(ValueError, match="pad must differ"):
        sample(model, PROMPTS, SamplingParams(), eos_token_ids=[EOS], pad_token_id=EOS)
    with pytest.raises(ValueError, match="at least one token"):
        _sample(model, [[]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        _sample(model, PROMPTS, SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _sample(model, PROMPTS, SamplingParams(max_new_tokens=5000))
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        _sample(model, PROMPTS, [SamplingParams(), SamplingParams()])


def test_unseeded_rows_follow_the_generator_and_training_mode_is_restored(model: PreTrainedModel) -> None:
    params = SamplingParams(max_new_tokens=8)
    runs = [_sample(model, PROMPTS, params, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0] == runs[1]
    model.train()
    try:
        _sample(model, PROMPTS[:1], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()

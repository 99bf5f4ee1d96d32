"""SFT: the assistant-only loss mask on two chat templates, packing without cross-talk, learning a demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.engine import SamplingParams
from dialoop.engine.chat import generate_replies
from dialoop.modeling import encode_prompt, load_tokenizer
from dialoop.records import ChatMessage
from dialoop.train.sft import TokenizedChat, causal_lm_loss, collate, pack_chats, tokenize_chat

CHAT: list[ChatMessage] = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About 2 million people."},
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = 'Cutting Knowledge Date: December 2023' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _spans(row: TokenizedChat) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, flag in enumerate([*row.target, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _check_mask(tokenizer: Any, messages: list[ChatMessage], header: str, end: str) -> None:
    row = tokenize_chat(tokenizer, messages)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(row.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _spans(row)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # exactly each reply and its end-of-turn token; the role header right before it is not a target
    assert [decode(row.input_ids[a:b]) for a, b in spans] == [r + end for r in replies]
    for a, _ in spans:
        assert decode(row.input_ids[:a]).endswith(header)
    # the first reply's context is tokenized exactly as the prompt at inference
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert row.input_ids[: spans[0][0]] == encode_prompt(tokenizer, messages[:first])
    assert row.num_targets == sum(
        len(tokenizer(r + end, add_special_tokens=False)["input_ids"]) for r in replies
    )


def test_chatml_mask_is_the_assistant_replies_and_their_im_end(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    _check_mask(tokenizer, CHAT, "<|im_start|>assistant\n", "<|im_end|>")
    # the template's default system prompt is there, and never a target
    row = tokenize_chat(tokenizer, CHAT)
    assert "You are a helpful AI assistant" in tokenizer.decode(row.input_ids[: _spans(row)[0][0]])
    _check_mask(
        tokenizer,
        [{"role": "system", "content": "Be brief."}, *CHAT],
        "<|im_start|>assistant\n",
        "<|im_end|>",
    )


def test_llama3_style_mask_is_the_assistant_replies_and_their_eot(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    _check_mask(tokenizer, CHAT, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
    row = tokenize_chat(tokenizer, CHAT)
    assert row.input_ids[0] == tokenizer.convert_tokens_to_ids(
        "<|begin_of_text|>"
    )  # one BOS, from the template


def test_a_conversation_cut_by_max_length_keeps_its_first_tokens(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    full = tokenize_chat(tokenizer, CHAT)
    cut = tokenize_chat(tokenizer, CHAT, max_length=len(full.input_ids) - 5)
    assert cut.input_ids == full.input_ids[:-5] and cut.target == full.target[:-5]


def test_packed_rows_do_not_attend_across_conversations(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [
        tokenize_chat(tokenizer, CHAT),
        tokenize_chat(
            tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        ),
    ]
    packs = pack_chats(rows, max_length=512, seed=0)
    assert len(packs) == 1 and len(packs[0].input_ids) == sum(len(r.input_ids) for r in rows)
    device = torch.device("cpu")
    with torch.no_grad():
        packed_loss, packed_correct = causal_lm_loss(model, collate(packs, 0, device))
        separate = [causal_lm_loss(model, collate([r], 0, device)) for r in rows]
        # the same tokens alone in a padded batch (attention mask path) give the same loss too
        batched_loss, _ = causal_lm_loss(model, collate(rows, 0, device))
    expected = sum(float(loss) for loss, _ in separate)
    assert float(packed_loss) == pytest.approx(expected, rel=1e-4)
    assert float(batched_loss) == pytest.approx(expected, rel=1e-4)
    assert int(packed_correct) == sum(int(c) for _, c in separate)


@pytest.mark.slow
def test_sft_teaches_a_tiny_model_to_reproduce_a_demonstration(tiny_model_dir: Path, tmp_path: Path) -> None:
    demo = [
        {"role": "user", "content": "Say the password."},
        {"role": "assistant", "content": "The password is amber."},
    ]
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"messages": demo}) + "\n")
    out = tmp_path / "sft"
    args = ["train", "sft", "--data", str(data), "--format", "messages", "--model", str(tiny_model_dir)]
    args += [
        "--out",
        str(out),
        "--lr",
        "3e-3",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--max-steps",
        "40",
    ]
    args += ["--precision", "fp32", "--no-progress", "--checkpoint-every", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    [reply] = generate_replies(model, tokenizer, [demo[:1]], SamplingParams(max_tokens=20, temperature=0))
    assert reply.finished and reply.text == "The password is amber."
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 3
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40


def test_sft_reads_demonstrations_from_the_store_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dialoop.formats import import_file
    from dialoop.settings import settings
    from dialoop.store.db import session_scope
    from dialoop.store.migrate import open_store

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT[: 2 * i]}) + "\n" for i in (1, 2)))
    engine = open_store(settings().db_url)
    with session_scope(engine) as session:
        import_file(session, data, "messages", kind="demonstration")
    engine.dispose()
    out = tmp_path / "sft"
    args = ["train", "sft", "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "1"]
    args += ["--batch-size", "2", "--precision", "fp32", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()
    assert json.loads((out / "metrics.json").read_text())["rows"] == 2

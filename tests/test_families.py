"""Chat templates on base models, and the whole loop (SFT, RM, PPO, generation) on every model family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from word_data import DEMOS, RANKINGS

from dialoop.engine import SamplingParams
from dialoop.engine.chat import generate_replies
from dialoop.modeling import encode_prompt, load_model_and_tokenizer
from dialoop.modeling.loading import load_tokenizer
from dialoop.modeling.templates import NOTE_KEY, ChatTemplateError, end_of_turn_token
from dialoop.modeling.tiny import FAMILIES, make_family_model
from dialoop.train.config import RewardConfig, SFTConfig
from dialoop.train.ppo import train_ppo
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.reward import train_reward_model
from dialoop.train.sft import train_sft

EXPECTED_EOS = {
    "llama": "<|eot_id|>",
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "mistral": "<|endoftext|>",
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
    "gpt2": "<|im_end|>",
    "gpt_neox": "<|im_end|>",
    "smollm2_base": "<|im_end|>",
}


def test_every_family_has_an_expected_end_of_turn() -> None:
    assert set(EXPECTED_EOS) == set(FAMILIES)


def test_a_base_model_gets_chatml_new_tokens_at_the_mean_embedding(tmp_path: Path) -> None:
    base = make_family_model("gpt2", tmp_path / "gpt2")
    raw = AutoModelForCausalLM.from_pretrained(base)
    old_rows = raw.get_input_embeddings().weight.shape[0]
    model, tokenizer = load_model_and_tokenizer(base, device="cpu")
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old_rows + 2 == len(tokenizer)
    mean = raw.get_input_embeddings().weight.mean(dim=0)
    for token in ("<|im_start|>", "<|im_end|>"):
        assert torch.allclose(weight[tokenizer.convert_tokens_to_ids(token)], mean, atol=1e-6)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "ChatML, installed by Dialoop" in getattr(model.config, NOTE_KEY)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_end_of_turn_comes_from_the_template_and_a_custom_template_overrides(tmp_path: Path) -> None:
    base = make_family_model("qwen2", tmp_path / "qwen2")
    assert load_tokenizer(base).eos_token == "<|im_end|>"
    custom = tmp_path / "turns.jinja"
    custom.write_text(
        "{% for m in messages %}{{ '<|turn|>' + m['role'] + ': ' + m['content'] + '<|done|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn|>assistant: ' }}{% endif %}"
    )
    tokenizer = load_tokenizer(base, chat_template=custom)
    assert tokenizer.eos_token == "<|done|>" and end_of_turn_token(tokenizer) == "<|done|>"
    assert "turns.jinja" in tokenizer.init_kwargs[NOTE_KEY]
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="no special token after an assistant reply"):
        load_tokenizer(base, chat_template=plain)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loop_runs_on_every_family(family: str, tmp_path: Path) -> None:
    common: dict[str, object] = dict(
        precision="fp32", progress=False, checkpoint_every=0, max_steps=2, batch_size=2, micro_batch_size=2
    )
    base = make_family_model(family, tmp_path / "base")
    sft = train_sft(SFTConfig(model=str(base), out=tmp_path / "sft", **common), DEMOS)  # type: ignore[arg-type]
    saved = AutoTokenizer.from_pretrained(sft)
    assert saved.eos_token == EXPECTED_EOS[family] and saved.pad_token != saved.eos_token
    config = json.loads((sft / "config.json").read_text())
    assert config["eos_token_id"] == saved.eos_token_id
    assert (NOTE_KEY in config) == (FAMILIES[family].template is None)  # base models say what was installed
    rm = train_reward_model(
        RewardConfig(model=str(sft), out=tmp_path / "rm", heldout_fraction=0.0, **common),  # type: ignore[arg-type]
        RANKINGS,
    )
    ppo = train_ppo(
        PPOConfig(
            model=str(sft),
            reward_model=str(rm),
            out=tmp_path / "ppo",
            mini_batch_size=2,
            max_new_tokens=6,
            ppo_epochs=1,
            **common,  # type: ignore[arg-type]
        ),
        [d.messages[:1] for d in DEMOS],
    )
    model, tokenizer = load_model_and_tokenizer(ppo, device="cpu")
    assert tokenizer.chat_template == saved.chat_template
    reply = generate_replies(model, tokenizer, [DEMOS[0].messages[:1]], SamplingParams(max_tokens=6, seed=0))
    assert 1 <= len(reply[0].token_ids) <= 6


@pytest.mark.slow
def test_train_sft_cli_takes_a_chat_template_file_lora_and_gradient_checkpointing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dialoop.cli import app

    base = make_family_model("gpt_neox", tmp_path / "base")
    template = tmp_path / "turns.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|turn|>' + m['role'] + ': ' + m['content'] + '<|done|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn|>assistant: ' }}{% endif %}"
    )
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": d.messages}) + "\n" for d in DEMOS))
    out = tmp_path / "sft"
    args = [
        "train",
        "sft",
        "--model",
        str(base),
        "--data",
        str(data),
        "--format",
        "messages",
        "--out",
        str(out),
    ]
    args += [
        "--chat-template",
        str(template),
        "--lora-r",
        "4",
        "--gradient-checkpointing",
        "--max-steps",
        "2",
    ]
    args += ["--batch-size", "2", "--micro-batch-size", "2", "--precision", "fp32", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == template.read_text() and saved.eos_token == "<|done|>"
    assert "turns.jinja" in json.loads((out / "config.json").read_text())[NOTE_KEY]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["chat_template"] == str(template)


@pytest.mark.slow
def test_the_embedded_default_without_its_template_is_a_base_model_that_trains_and_replies(
    tmp_path: Path,
) -> None:
    import shutil

    from dialoop.modeling import default_model_dir

    base = tmp_path / "smollm2-base"
    shutil.copytree(default_model_dir(), base)
    (base / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert not AutoTokenizer.from_pretrained(base).chat_template
    common: dict[str, object] = dict(
        precision="fp32", progress=False, checkpoint_every=0, max_steps=1, batch_size=2, micro_batch_size=2
    )
    sft = train_sft(SFTConfig(model=str(base), out=tmp_path / "sft", **common), DEMOS)  # type: ignore[arg-type]
    model, tokenizer = load_model_and_tokenizer(sft, device="cpu")
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert "installed by Dialoop" in getattr(model.config, NOTE_KEY)
    reply = generate_replies(model, tokenizer, [DEMOS[0].messages[:1]], SamplingParams(max_tokens=8, seed=0))
    assert reply[0].token_ids

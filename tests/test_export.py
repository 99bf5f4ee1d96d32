"""`dialoop export-model`: standard HF dirs that plain transformers loads with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.modeling import load_model_and_tokenizer
from dialoop.modeling.heads import reward_model_from_lm
from dialoop.modeling.loading import load_tokenizer, save_model_dir
from dialoop.modeling.tiny import make_family_model
from dialoop.records import ChatExample
from dialoop.train.config import SFTConfig
from dialoop.train.sft import train_sft

DEMOS = [
    ChatExample(
        messages=[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]
    )
    for w in ["cats", "dogs", "tea", "sun"]
]


def _export(run: Path, out: Path, *args: str) -> None:
    result = CliRunner().invoke(app, ["export-model", str(run), "--out", str(out), *args])
    assert result.exit_code == 0, result.output


def _prompt_ids(tokenizer: object) -> torch.Tensor:
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": "Say tea."}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # type: ignore[operator]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_exported_base_model_loads_in_plain_transformers_with_the_same_logits(
    tmp_path: Path, dtype: str
) -> None:
    # a base model: Dialoop installs ChatML, and the export carries it and its EOS
    base = make_family_model("gpt2", tmp_path / "base")
    model, tokenizer = load_model_and_tokenizer(base, device="cpu")
    _export(base, tmp_path / "out", "--dtype", dtype)
    out = tmp_path / "out"
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain_tokenizer.chat_template == tokenizer.chat_template
    assert plain_tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == plain_tokenizer.eos_token_id != generation["pad_token_id"]
    assert exported.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ids = _prompt_ids(plain_tokenizer)
    assert ids.tolist() == _prompt_ids(tokenizer).tolist()
    with torch.no_grad():
        expected = model(ids).logits
        got = exported(ids).logits.float()
    tolerance = 0.0 if dtype == "fp32" else 0.05
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_an_exported_reward_model_is_a_plain_sequence_classifier(tmp_path: Path) -> None:
    base = make_family_model("qwen3", tmp_path / "base")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(base)
    rm = save_model_dir(
        reward_model_from_lm(base, device="cpu", tokenizer=tokenizer), tokenizer, tmp_path / "rm"
    )
    _export(rm, tmp_path / "out")
    ids = _prompt_ids(tokenizer)
    a = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0.0, rtol=0.0)


@pytest.mark.slow
def test_a_lora_run_exports_its_adapters_or_the_merged_model(tmp_path: Path) -> None:
    base = make_family_model("qwen2", tmp_path / "base")  # ChatML and a pad in its vocabulary: no new tokens
    config = SFTConfig(
        model=str(base),
        out=tmp_path / "sft",
        lora_r=4,
        lr=1e-2,
        max_steps=2,
        batch_size=2,
        micro_batch_size=2,
        precision="fp32",
        progress=False,
        checkpoint_every=0,
    )
    run = train_sft(config, DEMOS)
    _export(run, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    _export(run, tmp_path / "merged", "--merge-lora")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trained, tokenizer = load_model_and_tokenizer(run, device="cpu")
    # the adapters applied to the base model give the merged model's logits
    with_adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=0.0, rtol=0.0)
        torch.testing.assert_close(with_adapter(ids).logits, trained(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_adapters_of_a_run_that_grew_the_vocabulary_need_merging(tmp_path: Path) -> None:
    base = make_family_model("mistral", tmp_path / "base")  # pad == EOS: Dialoop adds a pad token
    config = SFTConfig(
        model=str(base),
        out=tmp_path / "sft",
        lora_r=4,
        max_steps=1,
        batch_size=2,
        micro_batch_size=2,
        progress=False,
    )
    run = train_sft(config, DEMOS)
    result = CliRunner().invoke(app, ["export-model", str(run), "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "--merge-lora" in result.output
    _export(run, tmp_path / "merged", "--merge-lora")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_export_refuses_a_dir_without_a_model_and_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["export-model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no config.json" in result.output
    base = make_family_model("gpt2", tmp_path / "base")
    result = CliRunner().invoke(app, ["export-model", str(base), "--out", str(base)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = CliRunner().invoke(
        app, ["export-model", str(base), "--out", str(tmp_path / "o"), "--dtype", "int3"]
    )
    assert result.exit_code == 2 and "--dtype" in result.output

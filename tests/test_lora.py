"""LoRA in SFT and the reward model (adapters saved, merged weights in the run dir), QLoRA's refusal, and
gradient checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from word_data import DEMOS, RANKINGS

from dialoop.modeling.heads import reward_model_from_lm
from dialoop.modeling.loading import ModelLoadError, load_model_and_tokenizer
from dialoop.modeling.tiny import make_family_model
from dialoop.train.common import add_lora, merge_lora
from dialoop.train.config import RewardConfig, SFTConfig
from dialoop.train.reward import train_reward_model
from dialoop.train.sft import train_sft

COMMON: dict[str, object] = dict(
    precision="fp32",
    progress=False,
    checkpoint_every=0,
    max_steps=3,
    batch_size=2,
    micro_batch_size=2,
    lr=1e-2,
)


@pytest.mark.slow
def test_sft_with_lora_trains_adapters_only_and_writes_them_and_the_merged_model(tmp_path: Path) -> None:
    base = make_family_model("llama", tmp_path / "base")
    config = SFTConfig(model=str(base), out=tmp_path / "sft", lora_r=4, lora_target="q_proj,v_proj", **COMMON)  # type: ignore[arg-type]
    run = train_sft(config, DEMOS)
    before, after = load_file(base / "model.safetensors"), load_file(run / "model.safetensors")
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    # the base plus the saved adapters computes what the merged model computes
    merged, tokenizer = load_model_and_tokenizer(run, device="cpu")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), run / "adapter"
    ).eval()
    ids = torch.tensor([tokenizer("Say cats.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_rm_with_lora_trains_its_score_head_and_saves_a_plain_reward_model(tmp_path: Path) -> None:
    base = make_family_model("qwen2", tmp_path / "base")
    torch.manual_seed(0)
    fresh = reward_model_from_lm(base, device="cpu")
    config = RewardConfig(
        model=str(base),
        out=tmp_path / "rm",
        lora_r=4,
        heldout_fraction=0.0,
        gradient_checkpointing=True,
        **COMMON,  # type: ignore[arg-type]
    )
    run = train_reward_model(config, RANKINGS)
    weights = load_file(run / "model.safetensors")
    assert not any("lora" in k for k in weights)  # merged: a plain sequence classifier
    assert not torch.equal(weights["score.weight"], fresh.score.weight.detach())
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)


def test_qlora_is_refused_clearly_without_cuda_or_bitsandbytes(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA may run here")
    base = make_family_model("gpt2", tmp_path / "base")
    with pytest.raises(ValueError, match="--lora-r"):
        SFTConfig(model=str(base), load_in_4bit=True)
    config = SFTConfig(model=str(base), out=tmp_path / "sft", load_in_4bit=True, lora_r=4, **COMMON)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="need a CUDA GPU"):
        train_sft(config, DEMOS)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_model(tmp_path: Path) -> None:
    base = make_family_model("gpt_neox", tmp_path / "base")
    runs = [
        train_sft(
            SFTConfig(model=str(base), out=tmp_path / f"sft-{gc}", gradient_checkpointing=gc, **COMMON), DEMOS
        )  # type: ignore[arg-type]
        for gc in (False, True)
    ]
    plain, checkpointed = (load_file(r / "model.safetensors") for r in runs)
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, atol=1e-5, rtol=1e-4)


def test_qlora_merge_into_a_full_precision_copy_equals_the_plain_merge(tmp_path: Path) -> None:
    base = make_family_model("phi3", tmp_path / "base")
    config = SFTConfig(model=str(base), lora_r=4)

    def fresh() -> torch.nn.Module:
        return load_model_and_tokenizer(base, device="cpu")[0]

    trained = add_lora(fresh(), config)
    torch.manual_seed(0)
    for name, param in trained.named_parameters():
        if "lora_B" in name:  # as if trained: B starts at zero
            param.data.normal_(std=0.1)
    via_copy = merge_lora(trained, tmp_path / "a", main_process=True, full_precision_base=fresh).state_dict()
    plain = merge_lora(trained, tmp_path / "b", main_process=True).state_dict()
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    assert via_copy.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(via_copy[name], tensor)
    assert not torch.equal(
        plain["model.layers.0.self_attn.o_proj.weight"],
        fresh().state_dict()["model.layers.0.self_attn.o_proj.weight"],
    )

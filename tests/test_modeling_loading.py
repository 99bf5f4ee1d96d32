"""Loading models and tokenizers, EOS/pad rules, atomic saves, device helpers, the embedded default."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from dialoop.engine import SamplingParams
from dialoop.engine.chat import generate_replies
from dialoop.modeling import (
    ModelLoadError,
    autocast_dtype,
    decode_reply,
    default_model_dir,
    encode_prompt,
    ensure_special_tokens,
    load_default,
    load_model_and_tokenizer,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_model_dir,
)
from dialoop.settings import settings


def _special_ids(model_dir: Path) -> dict[str, object]:
    config = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {
        "config": (config["eos_token_id"], config["pad_token_id"]),
        "generation": (gen["eos_token_id"], gen["pad_token_id"]),
        "tokenizer": (tok.eos_token, tok.pad_token),
    }


def test_load_tiny_model_and_tokenizer(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 0)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
    assert not model.training and model.dtype == torch.float32 and model.device == pick_device()


def test_ensure_special_tokens_fixes_gguf_style_tokens(tiny_model_dir: Path) -> None:
    # what the GGUF metadata says: EOS <|im_start|>, pad == EOS
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.pad_token = "<|im_start|>"
    model.config.eos_token_id = model.config.pad_token_id = 1
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 1
    ensure_special_tokens(model, tokenizer)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 0)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)


def test_ensure_special_tokens_adds_a_pad_when_the_vocab_has_none() -> None:
    vocab = {"hello": 0, "world": 1, "</s>": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="hello"))
    backend.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    # a template whose turns end with the tokenizer's own EOS (Mistral's style)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + '</s>' }}{% endfor %}"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=3, n_positions=16, n_embd=8, n_layer=1, n_head=1))
    ensure_special_tokens(model, tokenizer)
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 3
    assert model.get_input_embeddings().weight.shape[0] == 4
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 3)


@pytest.mark.slow
def test_save_model_dir_round_trips(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    out = save_model_dir(model, tokenizer, tmp_path / "saved")
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    assert _special_ids(out) == {
        "config": (2, 0),
        "generation": (2, 0),
        "tokenizer": ("<|im_end|>", "<|endoftext|>"),
    }
    again, tok2 = load_model_and_tokenizer(out)
    ids = torch.tensor([[1, 9690, 198, 2683, 314]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2.chat_template == tokenizer.chat_template
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_save_model_dir_replaces_atomically_and_cleans_up_on_failure(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    out = tmp_path / "saved"
    shutil.copytree(tiny_model_dir, out)
    (out / "stale.txt").write_text("from an older version")
    save_model_dir(model, tokenizer, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(model, tokenizer, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_resolve_model_paths_and_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelLoadError, match=r"no model directory at \./missing-model"):
        resolve_model("./missing-model")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model(tmp_path)


def test_offline_hub_id_names_the_id_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer("dialoop-tests/not-a-cached-model")
    assert "'dialoop-tests/not-a-cached-model'" in str(err.value)
    assert "offline" in str(err.value) and "--model /path/to/dir" in str(err.value)


def test_device_and_autocast_dtype() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else pick_device().type)
    flags = " ".join(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
    )
    assert autocast_dtype("cpu") == (
        torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags.split()) else None
    )
    assert autocast_dtype(torch.device("meta")) is None


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this session keeps the converted default: $DIALOOP_TEST_MODELS_DIR, else a fresh dir."""
    shared = os.environ.get("DIALOOP_TEST_MODELS_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("models")


@pytest.mark.slow
def test_embedded_default_converts_once_and_replies_in_chatml(
    shared_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = settings().models_dir
    if not models.is_symlink():  # no DIALOOP_TEST_MODELS_DIR: point this test's home at the session's dir
        models.parent.mkdir(parents=True, exist_ok=True)
        models.symlink_to(shared_models_dir)
    model_dir = default_model_dir()
    weights = model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert default_model_dir() == model_dir and weights.stat().st_mtime_ns == stamp  # not converted again
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert _special_ids(model_dir) == {
        "config": (2, 0),
        "generation": (2, 0),
        "tokenizer": ("<|im_end|>", "<|endoftext|>"),
    }
    model, tokenizer = load_default()
    assert tokenizer.bos_token == "<|im_start|>" and model.dtype == torch.float32
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = generate_replies(model, tokenizer, [question], SamplingParams(max_tokens=40, temperature=0))[0]
    assert reply.finished and reply.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in reply.text
    # the same weights load as a plain HF model: nothing Dialoop-specific in the directory
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_encode_prompt_uses_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3  # one <|im_start|> per turn (the template's system turn included), no extra BOS


def test_a_reply_is_decoded_without_special_tokens_or_nul(tiny_model_dir: Path) -> None:
    """A byte-level vocabulary can write NUL, which neither store can hold: replies drop it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("a\x00b", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "a\x00b"  # the model can write it
    assert decode_reply(tokenizer, [*ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]) == "ab"

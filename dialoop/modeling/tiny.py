"""Tiny randomly initialised models with the embedded default's tokenizer, for tests and GPU checks."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dialoop.modeling.templates import template_markers

ASSETS = Path(__file__).parent / "assets" / "smollm2"


def default_shape_config() -> LlamaConfig:
    """The embedded default's (SmolLM2-135M-Instruct) config, without its weights."""
    return LlamaConfig.from_pretrained(ASSETS)


def make_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    full_size: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random Llama HF dir with SmolLM2's tokenizer; `full_size` uses the default's shape."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = default_shape_config()
    if not full_size:
        config.hidden_size = hidden_size
        config.intermediate_size = hidden_size * 2
        config.num_hidden_layers = num_layers
        config.num_attention_heads = num_heads
        config.num_key_value_heads = num_kv_heads
        config.head_dim = hidden_size // num_heads
        config.max_position_embeddings = 2048
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    tokenizer.save_pretrained(out_dir)
    for name in ("generation_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, out_dir / name)
    return out_dir


# --- tiny models of the families users pick -------------------------------------------------------------

# templates in the style of each family's own (written for these tests); None: a base model (no template)
_LLAMA3_STYLE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_GEMMA_STYLE = (
    "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
    " + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_PHI3_STYLE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Mistral's style: the reply ends with the tokenizer's EOS itself (pad then has to be a new token)
_MISTRAL_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '<|endoftext|>' }}{% endif %}{% endfor %}"
)
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one architecture family."""

    config_class: str  # a transformers config class
    template: str | None  # the tokenizer's chat template; None: a base model
    shape: dict[str, Any]  # config fields beyond the common ones
    smollm2_tokenizer: bool = False  # the embedded default's tokenizer instead of the tiny one


_ROPE = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", _LLAMA3_STYLE, _ROPE),
    "qwen2": Family("Qwen2Config", _CHATML, _ROPE),
    "qwen3": Family("Qwen3Config", _CHATML, {**_ROPE, "head_dim": 16}),
    "mistral": Family("MistralConfig", _MISTRAL_STYLE, _ROPE),
    "gemma": Family("GemmaConfig", _GEMMA_STYLE, {**_ROPE, "head_dim": 16}),
    "phi3": Family("Phi3Config", _PHI3_STYLE, {"num_attention_heads": 4, "intermediate_size": 128}),
    "gpt2": Family("GPT2Config", None, {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}),
    "gpt_neox": Family(
        "GPTNeoXConfig", None, {"num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.25}
    ),
    # the embedded default's architecture and tokenizer with its chat template removed
    "smollm2_base": Family("LlamaConfig", None, _ROPE, smollm2_tokenizer=True),
}

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A reward model scores replies; the policy learns from "
    "the scores. Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is "
    "the capital of France. Write a short poem about the sea. Waves roll on the shore under a grey sky. "
    "Explain photosynthesis in one sentence. Plants turn light, water and carbon dioxide into sugar. "
    "0123456789 + - * / = ( ) [ ] { } < > | _ # @ ' \" , . ; : ? ! \n"
)


def make_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, only `<|endoftext|>` special) trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None
    )


def make_family_model(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random model of `family` (a key of FAMILIES) with its tokenizer and template to `out_dir`.

    Families without a template are base models: Dialoop installs ChatML when it loads them.
    """
    import transformers

    spec = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS) if spec.smollm2_tokenizer else make_tiny_tokenizer()
    if spec.template is not None:  # the family's own markers are tokens of its vocabulary
        tokenizer.add_tokens(template_markers(spec.template), special_tokens=True)
    tokenizer.chat_template = spec.template
    common: dict[str, Any] = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2}
    common |= {"max_position_embeddings": 1024, "pad_token_id": None}
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    config = getattr(transformers, spec.config_class)(
        **common, **spec.shape, bos_token_id=eos_id, eos_token_id=eos_id
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

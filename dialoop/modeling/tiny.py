"""Tiny randomly initialised models with the embedded default's tokenizer, for tests and GPU checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

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

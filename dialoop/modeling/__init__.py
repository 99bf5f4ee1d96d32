"""Loading causal LMs and tokenizers, chat templates, generation, reward and value heads."""

from dialoop.modeling.chat import Reply, encode_prompt, eos_token_ids, generate_replies, pad_token_id
from dialoop.modeling.device import autocast_dtype, pick_device
from dialoop.modeling.generation import Completion, SamplingParams, sample
from dialoop.modeling.loading import (
    ModelLoadError,
    default_model_dir,
    ensure_special_tokens,
    load_causal_lm,
    load_default,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model,
    save_model_dir,
)

__all__ = [
    "Completion",
    "ModelLoadError",
    "Reply",
    "SamplingParams",
    "autocast_dtype",
    "default_model_dir",
    "encode_prompt",
    "ensure_special_tokens",
    "eos_token_ids",
    "generate_replies",
    "load_causal_lm",
    "load_default",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "pad_token_id",
    "pick_device",
    "resolve_model",
    "sample",
    "save_model_dir",
]

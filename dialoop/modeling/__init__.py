"""Loading causal LMs and tokenizers, chat templates, reward and value heads (sampling: `dialoop.engine`)."""

from dialoop.modeling.chat import Reply, decode_reply, encode_prompt, eos_token_ids, pad_token_id
from dialoop.modeling.device import autocast_dtype, pick_device
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
    "ModelLoadError",
    "Reply",
    "autocast_dtype",
    "decode_reply",
    "default_model_dir",
    "encode_prompt",
    "ensure_special_tokens",
    "eos_token_ids",
    "load_causal_lm",
    "load_default",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "pad_token_id",
    "pick_device",
    "resolve_model",
    "save_model_dir",
]

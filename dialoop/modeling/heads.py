"""Reward and value heads: an `AutoModelForSequenceClassification` with one label on an LM backbone.

A reward is the head's output at the last real token of a sequence minus the model's reward bias,
`config.dialoop_reward_bias` (default 0). The RM trainer sets that bias (e.g. to the mean raw score of
reference replies) so rewards centre on 0 for PPO; pairwise ranking losses do not see it. The PPO value
model reuses the same head at every position (`per_token_values`), with the same bias.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from dialoop.modeling.device import pick_device
from dialoop.modeling.loading import (
    ModelLoadError,
    _from_pretrained,
    ensure_special_tokens,
    load_tokenizer,
    quantization_kwargs,
    resolve_model,
)

BIAS_KEY = "dialoop_reward_bias"


def reward_model_from_lm(
    path_or_id: str | Path | None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tokenizer: Any = None,
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """A one-label sequence classifier whose backbone is the causal LM's and whose head is new.

    `load_in_4bit`: the backbone in 4 bits on the GPU (QLoRA; the head stays in full precision).
    """
    source = resolve_model(path_or_id)
    precision = quantization_kwargs() if load_in_4bit else {"dtype": dtype or torch.float32}
    try:
        model = _from_pretrained(
            AutoModelForSequenceClassification, source, "model", num_labels=1, **precision
        )
    except ValueError as exc:  # transformers names the config classes it has a sequence classifier for
        raise ModelLoadError(
            f"{source}: transformers has no sequence-classification model for this architecture, so it "
            f"cannot be a reward model: {str(exc).splitlines()[0]}"
        ) from exc
    ensure_special_tokens(model, tokenizer if tokenizer is not None else load_tokenizer(source))
    head = _score_head(model)
    # a small head keeps the initial rewards near 0 whatever the backbone's hidden-state scale
    # (std 1/sqrt(hidden+1), as in the summarize-from-feedback reproductions)
    torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    set_reward_bias(model, 0.0)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model.to(device or pick_device())


def load_reward_model(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """A reward model written by `save_model_dir`, in eval mode."""
    model = _from_pretrained(
        AutoModelForSequenceClassification, path_or_id, "reward model", dtype=dtype or torch.float32
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"{path_or_id} is not a reward model: it has {model.config.num_labels} labels, not 1"
        )
    ensure_special_tokens(model, load_tokenizer(path_or_id))
    return model.to(device or pick_device()).eval()


def reward_bias(model: PreTrainedModel) -> float:
    """The offset subtracted from the head's raw output (`config.dialoop_reward_bias`, default 0)."""
    return float(getattr(_hf_model(model).config, BIAS_KEY, 0.0))


def set_reward_bias(model: PreTrainedModel, bias: float) -> None:
    """Store the offset in the config, so it travels with the saved directory."""
    setattr(_hf_model(model).config, BIAS_KEY, float(bias))


def _hf_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers live inside it, so they stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _score_head(model: Any) -> torch.nn.Linear:
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `score` head: not a sequence classifier")
    return head


def _hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hf = _hf_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    # positions count real tokens, so left and right padding both see the positions of the unpadded text
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state


def _apply_head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    # through the module, not its weights, so a peft-wrapped head runs its trainable copy
    return _hf_model(model).score(hidden).squeeze(-1).float() - reward_bias(model)


def last_token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One reward per sequence: the head at its last real token, minus the reward bias. Shape [batch]."""
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("a sequence in the batch has no real tokens")
    hidden = _hidden_states(model, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return _apply_head(model, hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def per_token_values(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head at every position (PPO's value model), minus the reward bias. Shape [batch, seq]."""
    return _apply_head(model, _hidden_states(model, input_ids, attention_mask))

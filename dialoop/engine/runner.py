"""The model runner: one batched forward of rows at different positions over the slot cache.

Each row brings its slot, the position of its first new token and the new tokens (a prefill chunk or one
decode token). Rows are left-padded to the widest, given explicit per-row position ids, and a 4D additive
mask lets each query see exactly its own slot's positions up to itself, so a row attends as it would alone.
Works with any transformers causal LM whose layers all use full attention and call `cache.update`
(Llama, Qwen2, Mistral without sliding window, GPT-2, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dialoop.engine.slots import ForwardPlan, SlotCache


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward() keyword for the KV cache: `cache` in recent transformers, `past_key_values` before."""
    get_base = getattr(model, "get_base_model", None)  # peft wraps the HF model
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class RowInput:
    slot: int
    start: int  # position of tokens[0] in the row's sequence
    tokens: Sequence[int]


class ModelRunner:
    """Owns the model and its slot cache; returns each row's next-token logits (float32)."""

    def __init__(self, model: torch.nn.Module, max_rows: int, max_len: int) -> None:
        self.model = model
        config: Any = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.cache = SlotCache(int(text_config.num_hidden_layers), max_rows, max_len)
        self.cache_kwarg = _cache_kwarg(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.forwards = 0

    def _additive_mask(self) -> bool:
        """Eager attention adds the mask to its scores; SDPA-based ones (PPO's fp32 SDPA among them, whose
        queries are fp32 in a bf16 model) take a boolean mask of any query dtype."""
        get_base = getattr(self.model, "get_base_model", None)
        base = get_base() if callable(get_base) else self.model
        return getattr(base.config, "_attn_implementation", None) == "eager"

    def forward(self, rows: Sequence[RowInput]) -> torch.Tensor:
        """Next-token logits after each row's last new token: [len(rows), vocab]."""
        width = max(len(r.tokens) for r in rows)
        n = len(rows)
        input_ids = torch.zeros((n, width), dtype=torch.long)
        positions = torch.empty((n, width), dtype=torch.long)
        write_rows: list[int] = []
        write_cols: list[int] = []
        write_slots: list[int] = []
        write_pos: list[int] = []
        for b, r in enumerate(rows):
            pad = width - len(r.tokens)
            input_ids[b, pad:] = torch.tensor(list(r.tokens), dtype=torch.long)
            # padding queries take the first real token's position: their outputs are dropped, and they
            # must see at least one key (a fully masked row would be NaN)
            positions[b, :pad] = r.start
            positions[b, pad:] = torch.arange(r.start, r.start + len(r.tokens))
            write_rows += [b] * len(r.tokens)
            write_cols += range(pad, width)
            write_slots += [r.slot] * len(r.tokens)
            write_pos += range(r.start, r.start + len(r.tokens))
        kv_len = max(r.start + len(r.tokens) for r in rows)
        slots = [r.slot for r in rows]
        consecutive = slots == list(range(slots[0], slots[0] + n))
        device = self.device
        plan = ForwardPlan(
            write_rows=None if width == 1 else torch.tensor(write_rows, device=device),
            write_cols=None if width == 1 else torch.tensor(write_cols, device=device),
            write_slots=torch.tensor(write_slots, device=device),
            write_pos=torch.tensor(write_pos, device=device),
            read=slice(slots[0], slots[0] + n) if consecutive else torch.tensor(slots, device=device),
            kv_len=kv_len,
        )
        positions = positions.to(device)
        visible = torch.arange(kv_len, device=device).view(1, 1, -1) <= positions.unsqueeze(-1)
        mask = visible
        if self._additive_mask():  # eager attention adds the mask to the scores
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=device)
            mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        self.cache.set_plan(plan)
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.unsqueeze(1),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        self.forwards += 1
        return out.logits[:, -1, :].float()

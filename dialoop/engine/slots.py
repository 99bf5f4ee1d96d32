"""The KV cache: a fixed number of slots (rows of max_len positions) per layer, and the free-slot list.

Each running request owns one slot from admission to finish. The tensors are allocated once, at the first
forward (then their head count, head size and dtype are known), and never grow, so memory is bounded by
max_rows x max_len. A freed slot's stale keys are never read: the attention mask of its next owner only
admits positions that owner has written.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class ForwardPlan:
    """Where one forward's new keys and values go and which slots attention reads."""

    write_rows: torch.Tensor | None  # batch row of each real (non-padding) query token; None: all, one each
    write_cols: torch.Tensor | None  # its column in the query
    write_slots: torch.Tensor  # the slot it is stored in
    write_pos: torch.Tensor  # its position in that slot
    read: slice | torch.Tensor  # the batch's slots: a slice when they are consecutive (no copy)
    kv_len: int  # positions attention reads per slot (the batch's longest sequence so far)


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot, written at per-row positions."""

    def __init__(self, max_rows: int, max_len: int) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.max_len = max_len
        self.plan: ForwardPlan | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, key_dim = key_states.shape
        shape = (self.max_rows, heads, self.max_len)
        self.keys = key_states.new_zeros((*shape, key_dim))
        self.values = value_states.new_zeros((*shape, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.plan
        assert plan is not None and self.keys is not None and self.values is not None
        keys, values = self.keys, self.values
        if plan.write_rows is None:  # decoding: one real token per row
            keys[plan.write_slots, :, plan.write_pos] = key_states[:, :, 0]
            values[plan.write_slots, :, plan.write_pos] = value_states[:, :, 0]
        else:
            keys[plan.write_slots, :, plan.write_pos] = key_states[plan.write_rows, :, plan.write_cols]
            values[plan.write_slots, :, plan.write_pos] = value_states[plan.write_rows, :, plan.write_cols]
        if isinstance(plan.read, slice):
            return keys[plan.read, :, : plan.kv_len], values[plan.read, :, : plan.kv_len]
        return (
            keys[:, :, : plan.kv_len].index_select(0, plan.read),
            values[:, :, : plan.kv_len].index_select(0, plan.read),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.plan.kv_len if self.plan is not None else 0), 0

    def get_seq_length(self) -> int:
        return self.plan.kv_len if self.plan is not None else 0

    def get_max_length(self) -> int:
        return self.max_len


class SlotCache(Cache):
    """A transformers Cache over slots; the runner sets each forward's plan before calling the model."""

    def __init__(self, num_layers: int, max_rows: int, max_len: int) -> None:
        self.slot_layers = [SlotLayer(max_rows, max_len) for _ in range(num_layers)]
        super().__init__(layers=list(self.slot_layers))

    def set_plan(self, plan: ForwardPlan) -> None:
        for layer in self.slot_layers:
            layer.plan = plan

    @torch.inference_mode()  # the cache tensors are inference tensors
    def copy_prefixes(self, pairs: list[tuple[int, int, int]]) -> None:
        """For each (source slot, target slot, n): the first n positions' keys and values, in every layer."""
        for layer in self.slot_layers:
            assert layer.keys is not None and layer.values is not None
            for src, dst, n in pairs:
                layer.keys[dst, :, :n] = layer.keys[src, :, :n]
                layer.values[dst, :, :n] = layer.values[src, :, :n]

    def nbytes(self) -> int:
        """Bytes allocated so far (0 before the first forward)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.slot_layers
            for t in (layer.keys, layer.values)
            if t is not None
        )


class SlotPool:
    """Free slot numbers, lowest first so that a full batch tends to be consecutive slots."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._free = list(range(max_rows))

    def take(self) -> int:
        return heapq.heappop(self._free)

    def give_back(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def free(self) -> int:
        return len(self._free)

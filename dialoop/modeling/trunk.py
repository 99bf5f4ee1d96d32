"""The frozen trunk of a model: its bottom transformer blocks, run once per row of tokens and reused.

With `--trainable-layers N` only the top N blocks learn. The blocks below them (and the embeddings) keep
their weights through training, and they are the same weights as the bottom of the model training started
from. A `TrunkCache` keeps the hidden states that leave the frozen bottom for every row of tokens it has
seen, and a later forward of any model with the same trunk on rows it kept starts from them:

- PPO: the reference's pass keeps them for the policy, the reward model's for the value model (which starts
  as the reward model), and every epoch of the step reuses them;
- the reward model: its epochs after the first reuse the first epoch's, whatever the batches;
- the report card: a policy's KL pass reuses the SFT model's.

A skipped block returns its input; the last frozen block returns the kept states. Real tokens never see
padding after them nor other rows, so a row's states do not depend on its batch, and a forward that starts
from them computes what a full one computes. Blocks that return anything but one tensor (older
architectures return tuples) are not kept: such models run in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from dialoop.modeling.heads import BIAS_KEY

# config entries that differ between a causal LM and a classifier built on the same backbone
_HEAD_KEYS = frozenset(
    {"architectures", "id2label", "label2id", "num_labels", "problem_type", BIAS_KEY, "pad_token_id"}
)


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of `num_hidden_layers` transformer blocks (None when there is no such list)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None
    )


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    return get_embeddings() if callable(get_embeddings) else None


def frozen_depth(model: torch.nn.Module) -> int:
    """How many bottom blocks, the embeddings with them, have no trained parameter (0 when the embeddings
    train, or the blocks cannot be found)."""
    blocks = transformer_blocks(model)
    embeddings = input_embeddings(model)
    if blocks is None or embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return 0
    depth = 0
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def _trunk_tensors(model: torch.nn.Module, depth: int) -> list[Tensor]:
    blocks, embeddings = transformer_blocks(model), input_embeddings(model)
    assert blocks is not None and embeddings is not None
    modules = [embeddings, *blocks[:depth]]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _backbone_config(model: torch.nn.Module) -> dict[str, Any]:
    config: Any = getattr(model, "config", None)
    return {k: v for k, v in config.to_dict().items() if k not in _HEAD_KEYS} if config is not None else {}


def same_trunk(a: torch.nn.Module, b: torch.nn.Module, depth: int) -> bool:
    """Whether the bottom `depth` blocks and the embeddings of `a` and `b` compute the same function: same
    block classes, same backbone config (heads aside), and equal weights of equal dtype."""
    blocks_a, blocks_b = transformer_blocks(a), transformer_blocks(b)
    if blocks_a is None or blocks_b is None or len(blocks_a) < depth or len(blocks_b) < depth:
        return False
    if [type(x) for x in blocks_a[:depth]] != [type(x) for x in blocks_b[:depth]]:
        return False
    if _backbone_config(a) != _backbone_config(b):
        return False
    ta, tb = _trunk_tensors(a, depth), _trunk_tensors(b, depth)
    return len(ta) == len(tb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True)
    )


def shared_depth(a: torch.nn.Module, b: torch.nn.Module) -> int:
    """How many bottom blocks `a` and `b` have in common (`same_trunk`): a policy trained above frozen
    blocks and the model it started from, say."""
    blocks_a, blocks_b = transformer_blocks(a), transformer_blocks(b)
    if blocks_a is None or blocks_b is None or not same_trunk(a, b, 0):
        return 0
    depth = 0
    for x, y in zip(blocks_a, blocks_b, strict=False):
        tensors_x, tensors_y = [*x.parameters(), *x.buffers()], [*y.parameters(), *y.buffers()]
        if type(x) is not type(y) or len(tensors_x) != len(tensors_y):
            break
        if not all(
            u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
            for u, v in zip(tensors_x, tensors_y, strict=True)
        ):
            break
        depth += 1
    return depth


class TrunkCache:
    """Hidden states after the frozen bottom blocks, per trunk and row of token ids; `clear` when the rows
    are done (PPO: after each step; the RM: after training).

    A row is named by a key that fixes what its real tokens see (its token ids, and whatever else decides
    its attention: positions, mask structure), and its real tokens come first. Causal attention never lets a
    real token see the padding after it, nor another row, so a row's states do not depend on the batch it
    was computed in: a batch of rows that are all kept starts above the trunk, with padding left at zero.
    """

    def __init__(self) -> None:
        self._trunks: dict[int, tuple[int, int]] = {}  # id(model) -> (trunk id, depth)
        self._states: dict[tuple[int, int, bytes], Tensor] = {}  # (trunk, depth, row key) -> [n, H]
        self.hits = 0  # forwards that skipped the trunk
        self.misses = 0

    def add(self, model: torch.nn.Module, depth: int, like: torch.nn.Module | None = None) -> bool:
        """Keep the trunk of `model`'s bottom `depth` blocks; with `like` (a model already added), only when
        both have the same trunk, which they then share. Returns whether `model` was added."""
        if depth <= 0:
            return False
        if like is None:
            self._trunks[id(model)] = (id(model), depth)
            return True
        trunk = self._trunks.get(id(like))
        if trunk is None or trunk[1] != depth or not same_trunk(model, like, depth):
            return False
        self._trunks[id(model)] = trunk
        return True

    def clear(self) -> None:
        self._states.clear()

    @contextmanager
    def reuse(self, model: torch.nn.Module, keys: Sequence[bytes], lengths: Sequence[int]) -> Iterator[None]:
        """Around one backbone forward of `model` whose row i is named `keys[i]` and has `lengths[i]` real
        tokens first: keep what leaves the trunk, or skip the trunk when every row is kept."""
        trunk = self._trunks.get(id(model))
        blocks = transformer_blocks(model) if trunk is not None else None
        if trunk is None or blocks is None:
            yield
            return
        trunk_id, depth = trunk
        names = [(trunk_id, depth, key) for key in keys]
        kept = [self._states.get(name) for name in names]
        if all(s is not None and s.shape[0] == n for s, n in zip(kept, lengths, strict=True)):
            self.hits += 1
            with _skipping(blocks[:depth], [s for s in kept if s is not None]):
                yield
            return
        self.misses += 1
        seen: list[Any] = []
        handle = blocks[depth - 1].register_forward_hook(lambda _m, _args, out: seen.append(out))
        try:
            yield
        finally:
            handle.remove()
        out = seen[0] if len(seen) == 1 else None
        if isinstance(out, Tensor) and out.dim() == 3 and out.shape[0] == len(keys):
            for i, (name, n) in enumerate(zip(names, lengths, strict=True)):
                self._states[name] = out[i, :n].detach()


def _pass_through(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


@contextmanager
def _skipping(blocks: torch.nn.ModuleList, rows: Sequence[Tensor]) -> Iterator[None]:
    """For one forward, the blocks return their input, and the last one the kept `rows`, right-padded with
    zeros to its input's width."""
    calls = 0

    def last(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        nonlocal calls
        calls += 1
        width = hidden_states.shape[1]
        if calls > 1 or hidden_states.shape[0] != len(rows) or any(r.shape[0] > width for r in rows):
            raise RuntimeError("the kept trunk states do not fit this forward")
        states = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for i, row in enumerate(rows):
            states[i, : row.shape[0]] = row
        return states

    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks[:-1]:
        block.forward = _pass_through
    blocks[-1].forward = last
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward

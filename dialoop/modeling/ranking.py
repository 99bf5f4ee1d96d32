"""Scoring a prompt's candidate replies with a reward model: all K of them in one forward pass.

A candidate is encoded exactly as PPO will score a sample (`encode_candidates`); with `share_prompt` the
candidates of a prompt sit in one row behind one copy of the prompt, each reply attending to the prompt and
to itself only, its positions continuing the prompt's, so its score equals that of prompt + reply alone.
Used to train the reward model (`dialoop.train.reward`) and to evaluate one (`dialoop.evaluate`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedModel

from dialoop.modeling.chat import encode_prompt
from dialoop.modeling.trunk import TrunkCache
from dialoop.records import ChatMessage


def encode_candidates(
    tokenizer: Any,
    prompt: list[ChatMessage],
    replies: Sequence[str],
    max_length: int,
    truncated: Collection[int] = (),
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per reply, as the RM (and PPO) score them: the prompt through the chat
    template with the generation prompt, then the reply, then EOS, where the reward is read. A reply cut off
    at the token limit (its index in `truncated`) gets no EOS, as PPO's samples without one: the reward is
    read at its last token, so the RM sees what trainers see ("cut off") and can rank it lower.

    A reply longer than 3/4 of `max_length` loses its end; a long prompt loses its oldest tokens so that it
    and the longest reply fit in `max_length`. All replies share that prompt.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    cap = max(1, max_length - min(len(prompt_ids), max_length // 4) - 1)
    eos = int(tokenizer.eos_token_id)
    reply_ids = []
    for k, reply in enumerate(replies):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"][:cap]
        reply_ids.append(ids if k in truncated and ids else [*ids, eos])
    keep = max(0, max_length - max(len(r) for r in reply_ids))
    if keep < len(prompt_ids):
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return [(prompt_ids, r) for r in reply_ids]


def encode_reply(
    tokenizer: Any, prompt: list[ChatMessage], reply: str, max_length: int, *, finished: bool = True
) -> list[int]:
    """One candidate's token ids (see `encode_candidates`)."""
    [(prompt_ids, reply_ids)] = encode_candidates(
        tokenizer, prompt, [reply], max_length, () if finished else (0,)
    )
    return prompt_ids + reply_ids


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and position ids (counting real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


@dataclass
class _Row:
    """One model input row: token ids, positions, and per token its prompt group and segment."""

    ids: list[int]
    positions: list[int]
    group: list[int]
    segment: list[int]  # 0: a prompt; k + 1: candidate k's reply
    score_at: dict[int, int]  # candidate index -> position of its last token in the row


def _rows(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]], share_prompt: bool
) -> tuple[list[_Row], list[tuple[int, int]]]:
    """Rows for groups of candidates, and where each candidate's score is read, as (row, column).

    With `share_prompt`, the candidates of a group that have the same prompt ids sit in one row behind one
    copy of the prompt; each reply attends to the prompt and to itself only (see `_collate_rows`), so its
    score equals the score of prompt + reply alone, at a fraction of the cost.
    """
    rows: list[_Row] = []
    where: list[tuple[int, int]] = []
    for candidates in groups:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for k, (prompt, _) in enumerate(candidates):
            by_prompt.setdefault(tuple(prompt), []).append(k)
        parts = list(by_prompt.values()) if share_prompt else [[k] for k in range(len(candidates))]
        start = len(rows)
        row = _Row([], [], [], [], {})
        rows_of_group = [row] if share_prompt else []
        for g, members in enumerate(parts):
            if not share_prompt:
                row = _Row([], [], [], [], {})
                rows_of_group.append(row)
            prompt = candidates[members[0]][0]
            row.ids += prompt
            row.positions += list(range(len(prompt)))
            row.group += [g] * len(prompt)
            row.segment += [0] * len(prompt)
            for k in members:
                reply = candidates[k][1]
                row.ids += reply
                row.positions += list(range(len(prompt), len(prompt) + len(reply)))
                row.group += [g] * len(reply)
                row.segment += [k + 1] * len(reply)
                row.score_at[k] = len(row.ids) - 1
        rows += rows_of_group
        for k in range(len(candidates)):
            r = next(i for i, row in enumerate(rows_of_group) if k in row.score_at)
            where.append((start + r, rows_of_group[r].score_at[k]))
    return rows, where


def _collate_rows(
    rows: Sequence[_Row], pad_id: int, shared: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        positions[i, :n] = torch.tensor(r.positions)
        group[i, :n] = torch.tensor(r.group)
        segment[i, :n] = torch.tensor(r.segment)
    if not shared:
        mask = (group >= 0).long()  # one candidate per row: the usual right-padded 2-D mask
    else:
        # query q sees key k when k is not after q, in the same group, and k is a prompt token or q's reply
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        same_group = (group.unsqueeze(2) == group.unsqueeze(1)) & (group.unsqueeze(2) >= 0)
        visible = (segment.unsqueeze(1) == 0) | (segment.unsqueeze(2) == segment.unsqueeze(1))
        # padding sees itself only, which keeps softmax (and its gradient) finite
        mask = (causal & same_group & visible) | torch.eye(width, dtype=torch.bool)
        mask = mask.unsqueeze(1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


class RankingScorer(torch.nn.Module):
    """What training wraps (DDP/FSDP): the RM's backbone and head, with scores read at given positions."""

    def __init__(self, model: PreTrainedModel, trunk: TrunkCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.trunk = trunk
        # FSDP's auto-wrap policy looks for the transformer block classes here, and accelerate for the hidden
        # size (DeepSpeed configs with "auto" bucket sizes) in `config`
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.config = model.config

    @property
    def hf_model(self) -> PreTrainedModel:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        score_rows: torch.Tensor,
        score_cols: torch.Tensor,
        trunk_rows: tuple[list[bytes], list[int]] | None = None,
    ) -> torch.Tensor:
        """`trunk_rows`: each row's `TrunkCache` key and real length (`_trunk_rows`)."""
        if attention_mask.dim() == 4 and self.model.config._attn_implementation == "eager":
            # eager attention adds its mask to the scores: a boolean mask must become 0 / -inf
            blocked = torch.finfo(torch.float32).min
            attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
                ~attention_mask, blocked
            )
        backbone = getattr(self.model, self.model.base_model_prefix)
        reuse = (
            self.trunk.reuse(self.model, *trunk_rows)
            if self.trunk is not None and trunk_rows is not None
            else nullcontext()
        )
        with reuse:
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        head = getattr(self.model, "score")  # noqa: B009 (the attribute is typed Tensor | Module)
        return head(hidden[score_rows, score_cols]).squeeze(-1).float()


def score_groups(
    scorer: torch.nn.Module,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    share_prompt: bool,
    device: torch.device,
) -> torch.Tensor:
    """Raw rewards (before the bias) of every candidate of every group, flat, in order; one forward pass."""
    rows, where = _rows(groups, share_prompt)
    batch = _collate_rows(rows, pad_id, share_prompt, device)
    index = torch.tensor(where, device=device)
    trunk_rows = _trunk_rows(rows, share_prompt)
    return scorer(**batch, score_rows=index[:, 0], score_cols=index[:, 1], trunk_rows=trunk_rows)


def _trunk_rows(rows: Sequence[_Row], share_prompt: bool) -> tuple[list[bytes], list[int]]:
    """Each row's `TrunkCache` key: what decides what its tokens see (ids, positions, groups, segments, and
    the kind of mask), and its real length."""
    keys = [
        bytes([share_prompt]) + np.array([r.ids, r.positions, r.group, r.segment], dtype=np.int64).tobytes()
        for r in rows
    ]
    return keys, [len(r.ids) for r in rows]


def score_all(
    accelerator: Accelerator | None,
    scorer: torch.nn.Module,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    share_prompt: bool,
    batch_size: int,
) -> list[list[float]]:
    """Raw rewards of many groups without gradients, spread over the processes (every process gets all);
    without an `accelerator`, in this process on the scorer's device."""
    n_proc, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    device = accelerator.device if accelerator else next(scorer.parameters()).device
    per_proc = -(-len(groups) // n_proc)
    mine = list(range(rank * per_proc, min(len(groups), (rank + 1) * per_proc)))
    # similar lengths together waste less compute on padding
    mine.sort(key=lambda i: sum(len(p) + len(r) for p, r in groups[i]))
    n_batches = -(-per_proc // batch_size)  # equal on every process: FSDP/ZeRO forwards are collectives
    results: list[tuple[int, list[float]]] = []
    scorer.eval()
    with torch.no_grad():
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            batch = [groups[i] for i in chunk] or [groups[0]]  # an idle process still joins the forward
            flat = score_groups(scorer, batch, pad_id, share_prompt, device).tolist()
            offset = 0
            for i in chunk:
                results.append((i, flat[offset : offset + len(groups[i])]))
                offset += len(groups[i])
    everything = gather_object(results) if n_proc > 1 else results
    by_index = dict(everything)
    return [by_index[i] for i in range(len(groups))]

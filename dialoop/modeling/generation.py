"""Batched sampling over token ids with a KV cache: one left-padded prefill, then one token per step.

This module knows only token ids (no tokenizer, no chat templates); `dialoop.modeling.chat` adds those.
Rows stop independently (EOS, their own `max_new_tokens`, or the caller via `on_step`); finished rows are
dropped from the batch and the cache so long replies do not pay for short ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

OnStep = Callable[[list[int | None]], Iterable[int] | None]


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = (
        None  # per-row reproducibility: same seed + same prompt -> same reply, whatever the batch
    )

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    token_ids: list[int] = field(
        default_factory=list
    )  # generated ids, with the final EOS when it ended on one
    finished: bool = False  # True when it ended with an EOS token
    stopped: bool = False  # True when the caller cut it (cancellation, stop string) via on_step


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward() keyword for the KV cache: `cache` in recent transformers, `past_key_values` before."""
    get_base = getattr(model, "get_base_model", None)  # peft wraps the HF model
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


NUCLEUS_CANDIDATES = (
    256  # top-p first looks among this many top tokens; a full sort only when they fall short
)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the smallest top set with mass >= top_p, best first (the rest zeroed), and their ids."""
    # sorting all 49k probabilities of every row costs more than the forward pass on CPU; the nucleus of a
    # trained model almost always lies in its top few hundred tokens, and when it does not we sort fully
    vals, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[1]), dim=-1)
    if bool((vals.sum(dim=-1) < top_p).any()):
        vals, ids = probs.sort(dim=-1, descending=True)
    # a token stays when the mass of the tokens before it is still short of top_p
    before = vals.cumsum(dim=-1) - vals
    return vals.masked_fill(before >= top_p.unsqueeze(1), 0.0), ids


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The index per row where the cumulative (unnormalised) mass first exceeds uniform * total."""
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


def _pick_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """One token per row: argmax where temperature is 0, else nucleus sampling by inverse CDF of `uniforms`.

    Drawing one uniform per row from the row's own generator (instead of `torch.multinomial` over the
    batch) keeps a seeded row's reply independent of what else is in the batch.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    greedy = temperature == 0
    for rows in (~greedy & (top_p < 1), ~greedy & (top_p >= 1)):
        if not bool(rows.any()):
            continue
        probs = torch.softmax(logits[rows] / temperature[rows].unsqueeze(1), dim=-1)
        if bool((top_p[rows] < 1).all()):
            vals, ids = _nucleus(probs, top_p[rows])
            tokens[rows] = ids.gather(1, _inverse_cdf(vals, uniforms[rows]).unsqueeze(1)).squeeze(1)
        else:
            tokens[rows] = _inverse_cdf(probs, uniforms[rows])
    return tokens


def sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    on_step: OnStep | None = None,
    generator: torch.Generator | None = None,
) -> list[Completion]:
    """Sample a reply to each prompt; `params` is one for all rows or one per row.

    `on_step` runs after every decoding step with each row's new token (None for rows already done) and may
    return indices of rows to stop now (they keep that step's token and get `stopped=True`). Rows without a
    seed draw from `generator` (or torch's global generator when None).
    """
    n = len(prompts)
    row_params = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(row_params) != n:
        raise ValueError(f"got {len(row_params)} SamplingParams for {n} prompts")
    for p in row_params:
        p.validate()
    eos = {int(t) for t in eos_token_ids}
    if not eos:
        raise ValueError("eos_token_ids is empty: generation would never finish")
    if pad_token_id in eos:
        raise ValueError(f"pad_token_id {pad_token_id} is also an EOS id: pad must differ from EOS")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, (prompt, p) in enumerate(zip(prompts, row_params, strict=True)):
        if limit is not None and len(prompt) + p.max_new_tokens > limit:
            raise ValueError(
                f"row {i}: prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens"
            )

    completions = [Completion() for _ in range(n)]
    active = [i for i in range(n) if row_params[i].max_new_tokens > 0]
    if not active:
        return completions

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _decode(model, prompts, row_params, active, completions, eos, pad_token_id, on_step, generator)
    finally:
        model.train(was_training)
    return completions


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a forward pass of their own


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens common to all `prompts` (2 or more), short of the shortest one's last token (each row
    needs a token of its own to predict from); 0 when fewer than MIN_SHARED_PREFIX. Sampling and PPO's
    scoring run such a prefix once for all rows."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    row_params: list[SamplingParams],
    active: list[int],
    completions: list[Completion],
    eos: set[int],
    pad_token_id: int,
    on_step: OnStep | None,
    generator: torch.Generator | None,
) -> None:
    device = next(model.parameters()).device
    n = len(completions)
    seeded = {
        i: torch.Generator().manual_seed(p.seed) for i, p in enumerate(row_params) if p.seed is not None
    }

    # rows with the same prompt (K replies to one context, several suggestions) share one prefill: it runs
    # on the distinct prompts, then each row gets a copy of its prompt's keys, values and last logits
    distinct: dict[tuple[int, ...], int] = {}
    copies = [distinct.setdefault(tuple(prompts[i]), len(distinct)) for i in active]
    cache = _new_cache(model)
    cache_kwarg = _cache_kwarg(model)
    # the tokens every distinct prompt starts with (a chat template's system prompt) run once, for all rows
    shared = common_prefix_len(list(distinct))
    if shared:
        prefix = torch.tensor([next(iter(distinct))[:shared]], dtype=torch.long, device=device)
        model(input_ids=prefix, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
        cache.batch_repeat_interleave(len(distinct))
    # the rest of each prompt, left-padded after the prefix: padding sits between the two, masked out
    width = max(len(p) for p in distinct) - shared
    input_ids = torch.full((len(distinct), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(distinct), shared + width), dtype=torch.long)
    attention_mask[:, :shared] = 1
    for r, prompt in enumerate(distinct):
        rest = prompt[shared:]
        input_ids[r, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        attention_mask[r, shared + width - len(rest) :] = 1
    # positions count real tokens only, so a padded row sees the positions it would see alone
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]
    input_ids, attention_mask, position_ids = (
        t.to(device) for t in (input_ids, attention_mask, position_ids)
    )
    temperature = torch.tensor([row_params[i].temperature for i in active], device=device)
    top_p = torch.tensor([row_params[i].top_p for i in active], device=device)

    while True:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        )
        logits = out.logits[:, -1, :]
        if logits.shape[0] < len(active):  # after a shared prefill: one row per reply from here on
            index = torch.tensor(copies, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            logits, attention_mask, position_ids = logits[index], attention_mask[index], position_ids[index]
        draws = []
        for i in active:
            g = seeded.get(i, generator)
            greedy = row_params[i].temperature == 0
            draws.append(
                0.0 if greedy else float(torch.rand((), generator=g, device=g.device if g else None))
            )
        uniforms = torch.tensor(draws, device=device)
        tokens = _pick_tokens(logits, temperature, top_p, uniforms).tolist()

        step: list[int | None] = [None] * n
        keep: list[int] = []
        for r, (i, tok) in enumerate(zip(active, tokens, strict=True)):
            completions[i].token_ids.append(tok)
            step[i] = tok
            if tok in eos:
                completions[i].finished = True
            elif len(completions[i].token_ids) < row_params[i].max_new_tokens:
                keep.append(r)
        if on_step is not None:
            cut = set(on_step(step) or ())
            for r in [r for r in keep if active[r] in cut]:
                completions[active[r]].stopped = True
                keep.remove(r)
        if not keep:
            return

        next_ids = torch.tensor([tokens[r] for r in keep], dtype=torch.long, device=device).unsqueeze(1)
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            attention_mask, position_ids = attention_mask[index], position_ids[index]
            temperature, top_p = temperature[index], top_p[index]
            active = [active[r] for r in keep]
        input_ids = next_ids
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)

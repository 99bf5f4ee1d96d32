"""The sampler: one token per row from its logits, with each request's own parameters and generator.

Every operation is per row and each sampled row draws one uniform from its request's generator, so a
row's token does not depend on the other rows in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dialoop.engine.request import Request, TokenLogprob

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


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Repetition (prompt and reply tokens), frequency and presence (reply tokens) penalties, in place."""
    for r, req in enumerate(requests):
        p = req.params
        if not p.penalised:
            continue
        row = logits[r]
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted({*req.prompt_ids, *req.output_ids}), device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if req.output_ids and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(req.output_ids, device=logits.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _sample_rows(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Temperature, top-k, min-p, top-p, then the inverse CDF at each row's uniform draw."""
    device = logits.device
    params = [req.params for req in requests]
    logits = logits / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = torch.tensor([k or logits.shape[1] for k in top_k], device=device).clamp(max=logits.shape[1])
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    uniforms = torch.tensor(
        [float(torch.rand((), generator=req.generator)) for req in requests], device=device
    )
    top_p = torch.tensor([p.top_p for p in params], device=device)
    tokens = torch.empty(len(requests), dtype=torch.long, device=device)
    # a full-vocabulary CDF for rows without top-p; the nucleus (top candidates first) for the others
    for rows in (top_p < 1, top_p >= 1):
        if not bool(rows.any()):
            continue
        if bool((top_p[rows] < 1).all()):
            vals, ids = _nucleus(probs[rows], top_p[rows])
            tokens[rows] = ids.gather(1, _inverse_cdf(vals, uniforms[rows]).unsqueeze(1)).squeeze(1)
        else:
            tokens[rows] = _inverse_cdf(probs[rows], uniforms[rows])
    return tokens


def _logprobs(raw: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(raw, dim=-1)
    best = logprobs.topk(top) if top else None
    return TokenLogprob(
        token_id=token,
        logprob=float(logprobs[token]),
        top=tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else (),
    )


def sample_next(
    logits: torch.Tensor, requests: Sequence[Request]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each request's next token, and its logprob info when the request asked for logprobs."""
    raw = logits
    if any(req.params.penalised for req in requests):
        logits = logits.clone()
        _apply_penalties(logits, requests)
    tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
    for greedy in (True, False):
        rows = [r for r, req in enumerate(requests) if req.params.greedy == greedy]
        if len(rows) == len(requests):
            part = logits
        elif rows:
            part = logits[torch.tensor(rows, device=logits.device)]
        else:
            continue
        picked = part.argmax(dim=-1) if greedy else _sample_rows(part, [requests[r] for r in rows])
        tokens[torch.tensor(rows, device=logits.device)] = picked
    ids = tokens.tolist()
    info = [
        _logprobs(raw[r], ids[r], req.params.top_logprobs) if req.params.logprobs else None
        for r, req in enumerate(requests)
    ]
    return ids, info

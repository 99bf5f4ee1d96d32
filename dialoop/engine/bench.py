"""Engine vs the fixed-batch sampler on a random model: a fixed batch, then staggered arrivals.

`python -m dialoop.engine.bench --shape default` uses the embedded default's shape (SmolLM2-135M) with
random weights; `--shape tiny` a 2-layer model. Timings are wall-clock on whatever device runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import LlamaForCausalLM

from dialoop.engine.engine import Engine, EngineConfig
from dialoop.engine.params import SamplingParams
from dialoop.modeling import generation
from dialoop.modeling.tiny import default_shape_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchResult:
    sample_s: float  # fixed batch, `generation.sample`
    engine_s: float  # fixed batch, `Engine.generate`
    sample_ttft_s: float  # staggered arrivals: mean time to first token, fixed batches back to back
    engine_ttft_s: float  # staggered arrivals: mean time to first token, continuous batching
    tokens: int  # tokens generated per fixed-batch run


def build_model(shape: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = default_shape_config()
    if shape == "tiny":
        config.hidden_size, config.intermediate_size = 64, 128
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 2, 4, 2
        config.head_dim = 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.nn.Module.to(model, device=device, dtype=dtype)
    return model.eval()


def _prompts(rows: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (16 + 4 * i,), generator=g).tolist() for i in range(rows)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fixed_batch(
    model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], new_tokens: int, device: str, repeats: int
) -> tuple[float, float, int]:
    """Best of `repeats` seconds for `sample` and for the engine to reply `new_tokens` to every prompt."""
    eos = [int(model.config.vocab_size) - 1]  # an id a random model rarely picks: replies run full length
    ours = SamplingParams(max_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=1)
    theirs = generation.SamplingParams(new_tokens, temperature=0.8, top_p=0.95, seed=1)
    engine = Engine(model, eos_token_ids=eos, config=EngineConfig(max_rows=len(prompts), max_len=512))
    engine.generate(prompts[:1], replace(ours, max_tokens=2))  # warm-up: allocates the KV cache
    generation.sample(
        model, prompts[:1], replace(theirs, max_new_tokens=2), eos_token_ids=eos, pad_token_id=0
    )
    # alternate the two and keep each one's best time: other processes on a shared CPU come and go
    sample_s = engine_s = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        done = generation.sample(model, prompts, theirs, eos_token_ids=eos, pad_token_id=0)
        _sync(device)
        sample_s = min(sample_s, time.perf_counter() - t)
        t = time.perf_counter()
        got = engine.generate(prompts, ours)
        _sync(device)
        engine_s = min(engine_s, time.perf_counter() - t)
    if [c.token_ids for c in got] != [c.token_ids for c in done]:
        log.warning("engine and sample replies differ (float noise between batch shapes)")
    return sample_s, engine_s, sum(len(c.token_ids) for c in got)


def staggered(
    model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], new_tokens: int, gap_s: float, device: str
) -> tuple[float, float]:
    """Mean time to first token when prompt i arrives at i * gap_s: fixed batches of whatever has arrived,
    run back to back, against the engine admitting each arrival at its next step."""
    eos = [int(model.config.vocab_size) - 1]  # an id a random model rarely picks: replies run full length
    n = len(prompts)
    theirs = generation.SamplingParams(new_tokens, temperature=0.8, top_p=0.95, seed=1)

    start = time.perf_counter()
    arrival = [start + i * gap_s for i in range(n)]
    first: list[float] = [0.0] * n
    served = 0
    while served < n:
        now = time.perf_counter()
        if arrival[served] > now:
            time.sleep(arrival[served] - now)
        batch = [i for i in range(served, n) if arrival[i] <= time.perf_counter()]
        seen = False

        def on_step(_: list[int | None], batch: list[int] = batch) -> None:
            nonlocal seen
            if not seen:
                _sync(device)
                for i in batch:
                    first[i] = time.perf_counter()
                seen = True

        generation.sample(
            model, [prompts[i] for i in batch], theirs, eos_token_ids=eos, pad_token_id=0, on_step=on_step
        )
        served = batch[-1] + 1
    sample_ttft = sum(f - a for f, a in zip(first, arrival, strict=True)) / n

    engine = Engine(model, eos_token_ids=eos, config=EngineConfig(max_rows=n, max_len=512))
    ours = SamplingParams(max_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=1)
    start = time.perf_counter()
    arrival = [start + i * gap_s for i in range(n)]
    first = [0.0] * n
    ids: dict[str, int] = {}
    submitted = 0
    while submitted < n or engine.has_work:
        while submitted < n and arrival[submitted] <= time.perf_counter():
            ids[engine.submit(prompts[submitted], ours).id] = submitted
            submitted += 1
        if not engine.has_work:
            time.sleep(max(0.0, arrival[submitted] - time.perf_counter()))
            continue
        events = engine.step()
        _sync(device)
        now = time.perf_counter()
        for e in events:
            i = ids[e.request_id]
            if e.token_ids and not first[i]:
                first[i] = now
    return sample_ttft, sum(f - a for f, a in zip(first, arrival, strict=True)) / n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=50.0, help="staggered arrivals: ms between prompts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="fixed batch: runs of each, best kept")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, getattr(torch, args.dtype), args.device)
    prompts = _prompts(args.rows, int(model.config.vocab_size))
    with torch.inference_mode():
        sample_s, engine_s, tokens = fixed_batch(model, prompts, args.new_tokens, args.device, args.repeats)
        sample_ttft, engine_ttft = staggered(model, prompts, args.new_tokens, args.gap_ms / 1000, args.device)
    result = BenchResult(sample_s, engine_s, sample_ttft, engine_ttft, tokens)
    print(
        json.dumps(
            {
                "shape": args.shape,
                "device": args.device,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                **result.__dict__,
                "fixed_batch_engine_over_sample": round(engine_s / sample_s, 3),
                "ttft_engine_over_sample": round(engine_ttft / sample_ttft, 3),
            }
        )
    )


if __name__ == "__main__":
    main()

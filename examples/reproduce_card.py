"""Reproduce a `dialoop demo` report card with plain `transformers`: no Dialoop model code.

    python examples/reproduce_card.py runs/demo              # the card's figures from its own samples
    python examples/reproduce_card.py runs/demo --resample   # and fresh samples from `generate`

It reads DIR/report.json and DIR/samples.jsonl (every reply the card scored) and loads DIR/models/{sft,rm,
policy} with `AutoModelForCausalLM` / `AutoModelForSequenceClassification` only. From Dialoop it takes the
labeling guide's gold scorer and the eval prompts (`dialoop.sim`: plain Python, no model code). It prints one
JSON object:

- `gold_mean` per model and the policy's `win_rate_vs_sft`, recomputed from the samples;
- `rm_accuracy`: the RM's pairwise accuracy against the gold order on the card's held-out comparisons (the K
  replies per eval prompt of the model the card names, `reward_model.model`: in a demo, the policy the last
  rankings were sampled from), each reply scored by `AutoModelForSequenceClassification` alone (batch of one:
  no padding);
- with `--resample`: the same prompts sampled anew from models/sft and models/policy with `generate` at the
  card's temperature and token budget (other random draws, so equal within sampling error, not exactly).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dialoop.sim.gold import gold_score
from dialoop.sim.prompts import Prompt, generate_prompts


def _chat_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _win_rate(model: list[float], reference: list[float]) -> float:
    return _mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(model, reference, strict=True)])


def _pair_accuracy(predicted: list[list[float]], gold: list[list[float]]) -> tuple[float, int]:
    points, pairs = 0.0, 0
    for p, g in zip(predicted, gold, strict=True):
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] != g[j]:
                pairs += 1
                points += 0.5 if p[i] == p[j] else float((p[i] > p[j]) == (g[i] > g[j]))
    return (points / pairs if pairs else float("nan")), pairs


@torch.no_grad()
def rm_scores(rm_dir: Path, prompts: list[Prompt], groups: list[list[dict[str, Any]]]) -> list[list[float]]:
    """Each reply scored alone: prompt through the chat template, the reply, EOS when it finished."""
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    out = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = _chat_ids(tokenizer, prompt)
        scores = []
        for reply in group:
            ids = prompt_ids + tokenizer(reply["reply"], add_special_tokens=False)["input_ids"]
            if reply["finished"]:
                ids.append(tokenizer.eos_token_id)
            scores.append(float(model(torch.tensor([ids])).logits[0, 0]))
        out.append(scores)
    return out


@torch.no_grad()
def resample(model_dir: Path, prompts: list[Prompt], temperature: float, max_new_tokens: int) -> list[float]:
    """Gold scores of fresh replies sampled with `generate`, one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    gold = []
    for prompt in prompts:
        ids = torch.tensor([_chat_ids(tokenizer, prompt)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        finished = tokenizer.eos_token_id in out
        reply = str(tokenizer.decode(out[: out.index(tokenizer.eos_token_id)] if finished else out))
        gold.append(gold_score(prompt, reply, finished=finished))
    return gold


def reproduce(demo_dir: Path, *, resample_models: bool = False) -> dict[str, Any]:
    report = json.loads((demo_dir / "report.json").read_text())
    lines = [json.loads(line) for line in (demo_dir / "samples.jsonl").read_text().splitlines()]
    replies: dict[str, dict[int, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for line in lines:
        replies[line["model"]][line["row"]][line["sample"]] = line
    settings = report["eval"]
    prompts = generate_prompts(settings["prompts"], split="eval", seed=settings["seed"])
    names = [m["name"] for m in report["models"]]
    sft, policy = report["sft"], names[-1]
    gold = {
        name: [gold_score(p, replies[name][i][0]["reply"], finished=replies[name][i][0]["finished"])
               for i, p in enumerate(prompts)]
        for name in names
    }  # fmt: skip
    compared = report["reward_model"]["model"]  # whose K replies per prompt are the RM's comparisons
    tasks = [[replies[compared][i][k] for k in sorted(replies[compared][i])] for i in range(len(prompts))]
    task_gold = [
        [gold_score(p, r["reply"], finished=r["finished"]) for r in g]
        for p, g in zip(prompts, tasks, strict=True)
    ]
    accuracy, pairs = _pair_accuracy(rm_scores(demo_dir / "models" / "rm", prompts, tasks), task_gold)
    card = {m["name"]: m for m in report["models"]}
    out: dict[str, Any] = {
        "gold_mean": {name: _mean(g) for name, g in gold.items()},
        "card_gold_mean": {name: card[name]["gold_mean"] for name in names},
        "win_rate_vs_sft": _win_rate(gold[policy], gold[sft]),
        "card_win_rate_vs_sft": card[policy]["win_rate_vs_sft"],
        "rm_accuracy": accuracy,
        "rm_pairs": pairs,
        "card_rm_accuracy": report["reward_model"]["accuracy"],
    }
    if resample_models:
        fresh = {
            name: resample(
                demo_dir / "models" / name, prompts, settings["temperature"], settings["max_new_tokens"]
            )
            for name in ("sft", "policy")
        }
        out["resampled"] = {
            "gold_mean": {name: _mean(g) for name, g in fresh.items()},
            "win_rate_vs_sft": _win_rate(fresh["policy"], fresh["sft"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("--resample", action="store_true", help="also sample sft and policy anew")
    args = parser.parse_args(argv)
    print(json.dumps(reproduce(args.demo_dir, resample_models=args.resample), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

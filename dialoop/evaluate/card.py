"""The report card: models sampled on held-out prompts (the sim eval split) and scored by the gold scorer.

Per model: mean gold score, gold win rate against the SFT model (ties count half), EOS rate, mean reply
length, KL to the SFT model on the model's own samples, and the pass rate of each kind of checkable
instruction. For the reward model: pairwise accuracy against the noise-free gold order on held-out
comparisons (K replies of the last model to each eval prompt, as in the comparison tasks it learned from;
and across the models evaluated), overall and split by pair type (both replies end, one cut off, both cut
off). Every model sees the same prompts with the same per-row sampling seeds, so differences between models
are not sampling luck.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialoop.engine import SamplingParams
from dialoop.engine.chat import generate_replies
from dialoop.evaluate.metrics import mean, pair_accuracy, sequence_kl, stderr, win_rate
from dialoop.evaluate.progress import stage_progress
from dialoop.modeling import (
    Reply,
    encode_prompt,
    load_model_and_tokenizer,
    load_tokenizer,
    pad_token_id,
    pick_device,
)
from dialoop.modeling.heads import load_reward_model, reward_bias
from dialoop.modeling.ranking import RankingScorer, encode_candidates, score_all
from dialoop.run_metrics import read_metrics
from dialoop.sim.gold import GoldReport, gold_report
from dialoop.sim.prompts import CHECK_NAMES, Prompt, generate_prompts

log = logging.getLogger(__name__)

REPORT_VERSION = 1
# the RM's held-out pairs by type: how many of the pair's two replies ended (the rest were cut off)
PAIR_TYPES = {"both_end": 2, "one_cut": 1, "both_cut": 0}
MIN_CHECK_PROMPTS = 10  # a check kind counts in the targets when this many card prompts carry it


@dataclass
class EvalConfig:
    """What the report card samples: how many held-out prompts, and how."""

    prompts: int = 128  # held-out prompts (the sim eval split)
    seed: int = 0  # which prompts, and the per-row sampling seeds
    max_new_tokens: int = 128
    temperature: float = 0.7  # PPO's sampling temperature: the KL is measured where PPO holds it down
    top_p: float = 1.0
    batch_size: int = 32
    rm_candidates: int = 4  # replies per prompt in the RM's held-out comparisons
    rm_max_length: int = 512
    precision: str = "auto"  # weights for sampling and scoring: auto (bf16 where native), bf16 or fp32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"evaluation needs at least one prompt, got {self.prompts}")
        if self.rm_candidates < 2:
            raise ValueError(f"a comparison needs at least 2 candidates, got {self.rm_candidates}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    def sampling(self, row: int, offset: int = 0) -> SamplingParams:
        """The sampling parameters of eval row `row` (the same for every model)."""
        seed = (self.seed * 1_000_003 + offset * 100_003 + row) % 2**31
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, seed=seed)


@dataclass(frozen=True)
class ModelSpec:
    """A model to put on the card: its name on the card, its HF directory, the iteration that made it."""

    name: str
    path: Path
    iteration: int | None = None


@dataclass
class ModelSamples:
    """One model's replies to the eval prompts and what they scored."""

    spec: ModelSpec
    replies: list[Reply]
    gold: list[float]
    prompt_passed: list[float]
    kl: list[float] | None = None  # to the reference; None when there is no reference
    seconds: float = 0.0
    extra: list[list[Reply]] = field(default_factory=list)  # more samples for the RM's comparisons
    checks: list[dict[str, bool]] = field(default_factory=list)  # per prompt: `checks_passed` of its reply


def inference_dtype(precision: str = "auto") -> torch.dtype:
    """Weights for sampling and scoring: bf16 where the hardware computes in bf16 natively, else fp32.

    Unlike training under autocast, inference with bf16 weights pays off on CPUs with AVX512-BF16 even
    without AMX: one decoding step of the default model took 2.4x less CPU than in fp32 on this project's
    2-core machine (docs/experiments/2026-11-demo-recipe.md)."""
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    device = pick_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if native else torch.float32


def eval_prompts(config: EvalConfig) -> list[Prompt]:
    """The held-out prompts of the card (the sim eval split: no train prompt text among them)."""
    return generate_prompts(config.prompts, split="eval", seed=config.seed)


def _chat(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt.text}]


def sample_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    config: EvalConfig,
    *,
    copies: int = 1,
    advance: Any = None,
) -> list[list[Reply]]:
    """`copies` replies per prompt, copy k of row i with `config.sampling(i, k)`; returns one list of replies
    per copy. The copies of a prompt sit in one batch of `config.batch_size` rows: they share its prefill."""
    rows = [(i, k) for i in range(len(prompts)) for k in range(copies)]
    out: list[list[Reply]] = [[] for _ in range(copies)]
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        replies = generate_replies(
            model,
            tokenizer,
            [_chat(prompts[i]) for i, _ in chunk],
            [config.sampling(i, k) for i, k in chunk],
            batch_size=config.batch_size,
        )
        for (_, k), reply in zip(chunk, replies, strict=True):
            out[k].append(reply)
        if advance is not None:
            advance(len(chunk))
    return out


def checks_passed(report: GoldReport) -> dict[str, bool]:
    """Each check of the prompt (by `str(check)`): whether the reply passed it as the gold score counts it,
    so an empty reply, or a refusal of a harmless request, fails every check."""
    return {check: ok and report.prompt_passed > 0 for check, ok in report.passed.items()}


def check_pass_rates(
    prompts: Sequence[Prompt], checks: Sequence[Mapping[str, bool]]
) -> dict[str, dict[str, Any]]:
    """Per check kind of the labeling guide: how many prompts carry it, in how many the reply passed it
    (every check of that kind), and the rate (NaN when no prompt carries it)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in CHECK_NAMES:
        rows = [
            [row[str(c)] for c in p.checks if c.name == kind] for p, row in zip(prompts, checks, strict=True)
        ]
        carried = [all(row) for row in rows if row]
        out[kind] = {
            "prompts": len(carried),
            "passed": sum(carried),
            "rate": mean([float(x) for x in carried]),
        }
    return out


def _score(
    prompts: Sequence[Prompt], replies: Sequence[Reply]
) -> tuple[list[float], list[float], list[dict[str, bool]]]:
    reports = [gold_report(p, r.text, finished=r.finished) for p, r in zip(prompts, replies, strict=True)]
    return [g.score for g in reports], [g.prompt_passed for g in reports], [checks_passed(g) for g in reports]


def sample_models(
    models: Sequence[ModelSpec],
    prompts: Sequence[Prompt],
    config: EvalConfig,
    *,
    reference: str | None = None,
    compared: Collection[str] | None = None,
) -> list[ModelSamples]:
    """Sample and gold-score every model; with a `reference` (a name in `models`), also its KL to it.
    The models named in `compared` (default: the last) also get K - 1 more replies per prompt, for the RM's
    held-out comparisons."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names on a card must be unique, got {names}")
    if reference is not None and reference not in names:
        raise ValueError(f"the reference {reference!r} is not among the models {names}")
    ordered = sorted(models, key=lambda m: m.name != reference)  # the reference first: it stays loaded
    ref_model: Any = None
    done: dict[str, ModelSamples] = {}
    compared = {models[-1].name} if compared is None else set(compared)
    for spec in ordered:
        started = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(spec.path, dtype=inference_dtype(config.precision))
        copies = config.rm_candidates if spec.name in compared else 1
        with stage_progress(f"eval {spec.name}", len(prompts) * copies, enabled=config.progress) as advance:
            replies, *extra = sample_replies(
                model, tokenizer, prompts, config, copies=copies, advance=advance
            )
        gold, passed, checks = _score(prompts, replies)
        kl: list[float] | None = None
        if spec.name == reference:
            kl = [0.0] * len(replies)  # the reference against itself: exactly 0, no need to compute
            ref_model = model
        elif ref_model is not None:
            prompt_ids = [encode_prompt(tokenizer, _chat(p)) for p in prompts]
            kl = sequence_kl(
                model,
                ref_model,
                prompt_ids,
                replies,
                temperature=config.temperature,
                batch_size=config.batch_size,
                pad_token_id=pad_token_id(tokenizer),
            )
        del model  # the reference stays loaded through `ref_model`; the others go now
        seconds = time.perf_counter() - started
        done[spec.name] = ModelSamples(spec, replies, gold, passed, kl, seconds, extra, checks)
        log.info("evaluated %s: gold %.3f in %.0fs", spec.name, mean(gold), seconds)
    return [done[m.name] for m in models]


def reward_scores(
    reward_model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    groups: Sequence[Sequence[Reply]],
    config: EvalConfig,
) -> list[list[float]]:
    """The RM's score of each reply of each group, each encoded alone exactly as the RM was trained (reply,
    and EOS when the reply finished). The replies of a group sit behind one copy of their prompt and score
    as if alone (`score_groups`)."""
    encoded = [
        [
            encode_candidates(
                tokenizer, _chat(p), [r.text], config.rm_max_length, () if r.finished else (0,)
            )[0]
            for r in group
        ]
        for p, group in zip(prompts, groups, strict=True)
    ]
    raw = score_all(
        None, RankingScorer(reward_model), encoded, pad_token_id(tokenizer), True, config.batch_size
    )
    bias = reward_bias(reward_model)
    return [[score - bias for score in group] for group in raw]


def reward_model_accuracy(
    path: Path,
    prompts: Sequence[Prompt],
    samples: Sequence[ModelSamples],
    config: EvalConfig,
    policy: str | None = None,
) -> dict[str, Any]:
    """Pairwise accuracy of the RM at `path` against the gold order on held-out comparisons.

    `accuracy`: held-out comparison tasks as trainers get them, K replies of `policy` (default: the last
    model) per eval prompt; for an RM of the loop, `policy` is the one its newest rankings were sampled from,
    so these are held-out rankings of what it learned from. `accuracy_final_model`: K replies of the last
    model, which PPO may have pushed to where the RM is wrong (reward over-optimization).
    `accuracy_across_models`: the replies of the different models to each prompt. `accuracy_both_end`,
    `accuracy_one_cut`, `accuracy_both_cut` (and their `pairs_...`): the held-out pairs of `accuracy` split
    by how many of the two replies ended; their pairs add up to `pairs`."""
    by_name = {s.spec.name: s for s in samples}
    held, last = by_name[policy or samples[-1].spec.name], samples[-1]

    def tasks_of(s: ModelSamples) -> list[list[Reply]]:
        return [[s.replies[i]] + [extra[i] for extra in s.extra] for i in range(len(prompts))]

    sets = {"held": tasks_of(held)}
    if last is not held:
        sets["final"] = tasks_of(last)
    if len(samples) > 1:
        sets["across"] = [[s.replies[i] for s in samples] for i in range(len(prompts))]
    started = time.perf_counter()
    model = load_reward_model(path, dtype=inference_dtype(config.precision))
    tokenizer = load_tokenizer(path)
    groups = [group for tasks in sets.values() for group in tasks]
    predicted = reward_scores(model, tokenizer, [p for _ in sets for p in prompts], groups, config)
    del model
    results, offset, split = {}, 0, {}
    for name, tasks in sets.items():
        gold = [
            [gold_report(p, r.text, finished=r.finished).score for r in group]
            for p, group in zip(prompts, tasks, strict=True)
        ]
        results[name] = pair_accuracy(predicted[offset : offset + len(tasks)], gold)
        if name == "held":
            split = _accuracy_by_pair_type(predicted[offset : offset + len(tasks)], gold, tasks)
        offset += len(tasks)
    final = results.get("final", results["held"])
    across = results.get("across", (math.nan, 0))
    return {
        "path": str(path),
        "accuracy": results["held"][0],
        "pairs": results["held"][1],
        **split,
        "prompts": len(prompts),
        "candidates_per_prompt": len(sets["held"][0]) if prompts else 0,
        "model": held.spec.name,
        "accuracy_final_model": final[0],
        "pairs_final_model": final[1],
        "final_model": last.spec.name,
        "accuracy_across_models": across[0],
        "pairs_across_models": across[1],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _accuracy_by_pair_type(
    predicted: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], tasks: Sequence[Sequence[Reply]]
) -> dict[str, Any]:
    def of_type(ended: int) -> Callable[[int, int, int], bool]:
        return lambda g, i, j: int(tasks[g][i].finished) + int(tasks[g][j].finished) == ended

    out: dict[str, Any] = {}
    for name, ended in PAIR_TYPES.items():
        out[f"accuracy_{name}"], out[f"pairs_{name}"] = pair_accuracy(predicted, gold, of_type(ended))
    return out


def ppo_curves(iteration: int | None, run_dir: Path) -> dict[str, Any]:
    """RM score and KL per step of a PPO run, from its `metrics.jsonl`."""
    rows = [r for r in read_metrics(run_dir, "train") if "score" in r and "kl" in r]
    return {
        "iteration": iteration,
        "run_dir": str(run_dir),
        "step": [int(r["step"]) for r in rows],
        "score": [r["score"] for r in rows],
        "kl": [r["kl"] for r in rows],
        "reply_length": [r.get("reply_length") for r in rows],
    }


def _model_card(s: ModelSamples, prompts: Sequence[Prompt], reference: ModelSamples | None) -> dict[str, Any]:
    kinds = sorted({p.kind for p in prompts})
    by_kind = {k: mean([g for g, p in zip(s.gold, prompts, strict=True) if p.kind == k]) for k in kinds}
    lengths = [len(r.token_ids) for r in s.replies]
    return {
        "name": s.spec.name,
        "path": str(s.spec.path),
        "iteration": s.spec.iteration,
        "gold_mean": mean(s.gold),
        "gold_stderr": stderr(s.gold),
        "gold_by_kind": by_kind,
        "instructions_followed": mean(s.prompt_passed),
        "win_rate_vs_sft": win_rate(s.gold, reference.gold) if reference is not None else None,
        "eos_rate": mean([1.0 if r.finished else 0.0 for r in s.replies]),
        "mean_length_tokens": mean([float(n) for n in lengths]),
        "mean_length_words": mean([float(len(r.text.split())) for r in s.replies]),
        "kl_to_sft": mean(s.kl) if s.kl is not None else None,
        "checks": check_pass_rates(prompts, s.checks),
        "seconds": round(s.seconds, 2),
    }


def evaluate_models(
    models: Sequence[ModelSpec],
    *,
    sft: str | None = None,
    reward_model: Path | None = None,
    config: EvalConfig | None = None,
    ppo_runs: Sequence[tuple[int | None, Path]] = (),
    stage_seconds: Mapping[str, float] | None = None,
    rm_policy: str | None = None,
) -> tuple[dict[str, Any], list[ModelSamples]]:
    """The report card of `models` (in the loop's order); `sft` names the one that wins and KL compare to;
    `rm_policy` names the model whose replies are the RM's held-out comparisons (`reward_model_accuracy`).

    Returns the report (JSON-ready; `write_report` renders it) and the samples behind it.
    """
    if not models:
        raise ValueError("nothing to evaluate: give at least one model")
    config = config or EvalConfig()
    started = time.perf_counter()
    prompts = eval_prompts(config)
    if rm_policy is not None and rm_policy not in {m.name for m in models}:
        raise ValueError(f"the RM's policy {rm_policy!r} is not among the models {[m.name for m in models]}")
    compared = {models[-1].name} | ({rm_policy} if rm_policy and reward_model is not None else set())
    samples = sample_models(models, prompts, config, reference=sft, compared=compared)
    ref = next((s for s in samples if s.spec.name == sft), None)
    rm = (
        reward_model_accuracy(reward_model, prompts, samples, config, rm_policy)
        if reward_model is not None
        else None
    )
    seconds = dict(stage_seconds or {})
    seconds["evaluation"] = round(time.perf_counter() - started, 2)
    kinds = [p.kind for p in prompts]
    report = {
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "eval": {
            **dataclasses.asdict(config),
            "split": "eval",
            "prompt_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        },
        "sft": sft,
        "models": [_model_card(s, prompts, ref) for s in samples],
        "reward_model": rm,
        "ppo": [ppo_curves(it, Path(d)) for it, d in ppo_runs],
        "stage_seconds": seconds,
        "examples": _examples(prompts, samples),
    }
    return report, samples


def _examples(prompts: Sequence[Prompt], samples: Sequence[ModelSamples], n: int = 6) -> list[dict[str, Any]]:
    """The first `n` prompts with every model's reply and gold score, for a reader to see the change."""
    return [
        {
            "prompt": p.text,
            "checks": [str(c) for c in p.checks],
            "replies": {
                s.spec.name: {"text": s.replies[i].text, "finished": s.replies[i].finished, "gold": s.gold[i]}
                for s in samples
            },
        }
        for i, p in enumerate(prompts[:n])
    ]


def targets(report: Mapping[str, Any], *, base: str, sft: str, policy: str) -> dict[str, dict[str, Any]]:
    """The loop's goals on this card, each as {value, threshold, pass}; it passes when value >= threshold.

    `win_rate_vs_sft` of the policy >= 0.70; the RM's `rm_accuracy` >= 0.75 and `rm_accuracy_both_end`
    >= 0.65; `gold_policy_minus_sft` >= 0.10; `gold_sft_minus_base` >= 0. Over the check kinds that
    `MIN_CHECK_PROMPTS` or more card prompts carry: `worst_check_gain`, the least gain in pass rate of the
    policy over SFT, >= 0 (none worse; no value when no kind qualifies), and `checks_gaining_20_points`,
    how many kinds gain 0.20 or more, >= 3."""
    cards = {m["name"]: m for m in report["models"]}
    gold = {name: _number(cards[name]["gold_mean"]) for name in (base, sft, policy)}
    rm = report.get("reward_model") or {}
    sft_checks, policy_checks = cards[sft]["checks"], cards[policy]["checks"]
    # rounded, so that float error does not miss a threshold (0.3 - 0.1 < 0.2 in floats)
    gains = [
        round(policy_checks[kind]["rate"] - rates["rate"], 10)
        for kind, rates in sft_checks.items()
        if rates["prompts"] >= MIN_CHECK_PROMPTS
    ]
    goals = {
        "win_rate_vs_sft": (_number(cards[policy]["win_rate_vs_sft"]), 0.70),
        "rm_accuracy": (_number(rm.get("accuracy")), 0.75),
        "rm_accuracy_both_end": (_number(rm.get("accuracy_both_end")), 0.65),
        "gold_policy_minus_sft": (round(gold[policy] - gold[sft], 10), 0.10),
        "gold_sft_minus_base": (round(gold[sft] - gold[base], 10), 0.0),
        "worst_check_gain": (min(gains) if gains else math.nan, 0.0),
        "checks_gaining_20_points": (sum(g >= 0.20 for g in gains), 3),
    }
    # NaN (a missing value: null in report.json) never passes
    return {
        name: {"value": value, "threshold": threshold, "pass": value >= threshold}
        for name, (value, threshold) in goals.items()
    }


def _number(value: float | None) -> float:
    """A figure of the card as a float: NaN when it is missing (None in a report read back from JSON)."""
    return math.nan if value is None else float(value)

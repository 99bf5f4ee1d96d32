"""The whole loop in one command, with simulated trainers, in a fresh store under one directory.

    dialoop demo --out runs/demo            # the embedded default (SmolLM2-135M-Instruct)
    dialoop demo --out /tmp/d --quick       # the same stages on a tiny random model, in seconds

Simulated demonstrations (with suggestions from the base model) -> iteration 1: SFT -> for each round:
simulated chats with the served policy, comparison tasks (K replies sampled from it), rankings ->
iteration: RM on all rankings + PPO (continued from the previous policy) -> the report card of base, SFT
and every policy on held-out prompts. Trainers act through `dialoop.collect` (via `dialoop.sim`), training
goes through `dialoop.loop.run_iteration`, exactly as with people and `dialoop iterate`.

Output (other tools read it): DIR/models/{sft,rm,policy} (standard HF dirs), DIR/report.json,
DIR/report.html and its PNGs; DIR/store.db (the store), DIR/runs/iter-N/<stage> (every run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine

from dialoop.collect import PolicyHandle, create_comparison_tasks
from dialoop.engine import SamplingParams
from dialoop.evaluate.card import EvalConfig, ModelSpec, evaluate_models, inference_dtype, targets
from dialoop.evaluate.progress import stage_progress
from dialoop.evaluate.report import write_report
from dialoop.loop import IterationConfig, IterationResult, record_cards, run_iteration
from dialoop.modeling import default_model_dir, load_model_and_tokenizer
from dialoop.modeling.device import device_name, pick_device
from dialoop.modeling.tiny import make_tiny_model
from dialoop.sim.prompts import Prompt, generate_prompts
from dialoop.sim.trainers import SimTrainerConfig, SimulatedTrainer, create_trainers, rank_all
from dialoop.store.db import session_scope
from dialoop.store.migrate import open_store
from dialoop.store.models import ModelVersion
from dialoop.store.registry import ensure_base_version, served_model
from dialoop.train.common import resolve_precision
from dialoop.train.config import RewardConfig, SFTConfig
from dialoop.train.ppo_config import PPOConfig

log = logging.getLogger(__name__)

# files of a run dir that are the run's records, not part of the model
RUN_FILES = frozenset({"train_config.json", "metrics.json", "metrics.jsonl"})
StageHook = Callable[[str, float], None]


@dataclass
class DemoConfig:
    """Every budget of the demo; `demo_config` gives the default and the `--quick` ones."""

    out: Path
    seed: int = 0
    tiny: bool = False  # a tiny random model instead of the embedded default
    trainers: int = 4
    demonstrations: int = 160
    chats_per_round: int = 96  # one comparison task per chat
    rounds: int = 2  # RM + PPO iterations after SFT
    k: int = 4  # replies per comparison task
    overlap: int = 2  # rankings per task, by different trainers
    chunk: int = 16  # prompts per batch of collection work (one progress step)
    trainer: SimTrainerConfig = field(default_factory=SimTrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True
    on_stage: StageHook | None = None  # called with (stage, seconds) when a stage ends


def demo_config(out: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> DemoConfig:
    """The demo's budgets: sized so the embedded default runs end to end in 11 to 12 minutes on 2 idle cores
    with native bf16 (four seeds; earlier budgets took 8.5 to 22 minutes on other machines, and about 33 on
    2 cores that compute in fp32 only: docs/experiments/2026-11-demo-recipe.md); `quick` runs every stage
    on a tiny model in seconds."""
    if quick:
        tokens = SamplingParams(max_tokens=8, temperature=1.0)
        return DemoConfig(
            out=out,
            seed=seed,
            tiny=True,
            trainers=3,
            demonstrations=8,
            chats_per_round=6,
            chunk=4,
            trainer=SimTrainerConfig(suggestions=2, suggestion_params=tokens, chat_params=tokens),
            sft=SFTConfig(max_steps=2, batch_size=4, micro_batch_size=4, max_length=128, checkpoint_every=0),
            rm=RewardConfig(
                max_steps=2,
                batch_size=4,
                micro_batch_size=4,
                max_length=128,
                checkpoint_every=0,
                bias_examples=8,
            ),
            ppo=PPOConfig(
                max_steps=2,
                batch_size=4,
                mini_batch_size=4,
                micro_batch_size=4,
                max_new_tokens=8,
                max_length=128,
                checkpoint_every=0,
            ),
            eval=EvalConfig(prompts=6, max_new_tokens=8, batch_size=8),
            progress=progress,
        )
    # bf16 autocast where the CPU computes bf16 natively: with the lower layers frozen it took 1.6x less
    # CPU per SFT step than fp32 on the 2-core machine these budgets were measured on
    # (docs/experiments/2026-11-demo-recipe.md)
    precision = "bf16" if inference_dtype() == torch.bfloat16 else "fp32"
    replies = 48  # tokens per reply of chats, comparisons, PPO and the card: a budget PPO learns to finish in
    return DemoConfig(
        out=out,
        seed=seed,
        trainers=4,
        demonstrations=96,
        # K = 6 replies per task: 15 ranked pairs each instead of 6 for little more sampling (InstructGPT
        # ranks 4 to 9); RM held-out accuracy 74.0-76.6% in three seeds, 68.7-84.7% at K = 4
        # (docs/experiments/2026-11-demo-recipe.md)
        k=6,
        chats_per_round=64,
        trainer=SimTrainerConfig(
            suggestions=2,
            suggestion_params=SamplingParams(max_tokens=64, temperature=0.8),
            chat_params=SamplingParams(max_tokens=replies, temperature=0.7),
        ),
        sft=SFTConfig(
            epochs=2,
            batch_size=16,
            micro_batch_size=8,
            lr=3e-5,
            max_length=384,
            precision=precision,
            checkpoint_every=0,
        ),
        # a few hundred rankings of 6: two passes over them (one pass is InstructGPT's choice for large data;
        # 3 with K = 4), at 1e-4, on every ranking: the card measures the RM on rankings it never saw, so no
        # tenth is held out in training. Retrained on one demo's rankings: 75.4% on held-out rankings of its
        # policy-2, against 66.5% at 5e-5 (docs/experiments/2026-11-demo-recipe.md)
        rm=RewardConfig(
            epochs=2,
            batch_size=16,
            micro_batch_size=4,
            lr=1e-4,
            max_length=256,
            trainable_layers=8,
            precision=precision,
            checkpoint_every=0,
            heldout_fraction=0.0,
        ),
        # 4 passes over each batch at 5e-5: at 2 passes and 1e-5 the policy stayed within KL 0.1 of SFT
        ppo=PPOConfig(
            max_steps=10,
            batch_size=16,
            mini_batch_size=16,
            micro_batch_size=16,
            ppo_epochs=4,
            max_new_tokens=replies,
            lr=5e-5,
            trainable_layers=6,
            precision=precision,
            checkpoint_every=0,
        ),
        # 128 held-out prompts, as `dialoop eval`: on 64 a win rate's standard error is about 6 points, on 128
        # about 4 (seed 0's policy-3: 58.6% on 64, 61.7% on 128; docs/experiments/2026-11-demo-recipe.md)
        eval=EvalConfig(prompts=128, max_new_tokens=replies),
        progress=progress,
    )


@dataclass
class DemoResult:
    out: Path
    report_path: Path
    report: dict[str, Any]
    models: dict[str, Path]  # sft, rm, policy under DIR/models
    stage_seconds: dict[str, float]


class _Stages:
    """Wall and CPU time per stage, reported to the caller's hook as each stage ends.

    CPU seconds / wall seconds is how many cores the stage got: on a busy machine it says how much of a
    stage's wall time was waiting for other processes."""

    def __init__(self, hook: StageHook | None) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.hook = hook
        self._started: dict[str, tuple[float, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        yield
        self.end(name)

    def start(self, name: str) -> None:
        self._started[name] = (time.perf_counter(), time.process_time())

    def end(self, name: str) -> None:
        wall, cpu = self._started.pop(name)
        self.seconds[name] = round(time.perf_counter() - wall, 2)
        self.cpu_seconds[name] = round(time.process_time() - cpu, 2)
        if self.hook is not None:
            self.hook(name, self.seconds[name])


def _chunks(items: Sequence[Prompt], size: int) -> Iterator[Sequence[Prompt]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _load_policy(engine: Engine, precision: str, version_id: int | None = None) -> PolicyHandle:
    """The served policy (or version `version_id`) loaded as a handle for the collection workflows."""
    with session_scope(engine) as session:
        version = session.get(ModelVersion, version_id) if version_id is not None else served_model(session)
        if version is None:
            raise RuntimeError("no policy is served")
        path, vid = version.path, version.id
    model, tokenizer = load_model_and_tokenizer(path, dtype=inference_dtype(precision))
    return PolicyHandle(model, tokenizer, vid)


def _write_demonstrations(
    engine: Engine, config: DemoConfig, trainers: Sequence[SimulatedTrainer], handle: PolicyHandle
) -> int:
    prompts = generate_prompts(config.demonstrations, split="train", seed=config.seed)
    written = 0
    with stage_progress("demonstrations", len(prompts), enabled=config.progress) as advance:
        for i, chunk in enumerate(_chunks(prompts, config.chunk)):
            with session_scope(engine) as session:
                trainer = trainers[i % len(trainers)]
                written += len(trainer.write_demonstrations(session, handle, chunk))
            advance(len(chunk))
    return written


def _chat(
    engine: Engine, config: DemoConfig, trainers: Sequence[SimulatedTrainer], handle: PolicyHandle, r: int
) -> None:
    # a different seed per round: new chats, disjoint from the eval split like every train prompt
    prompts = generate_prompts(config.chats_per_round, split="train", seed=config.seed * 7919 + 1000 + r)
    with stage_progress(f"round {r}: chats", len(prompts), enabled=config.progress) as advance:
        for i, chunk in enumerate(_chunks(prompts, config.chunk)):
            with session_scope(engine) as session:
                trainers[i % len(trainers)].chat(session, handle, chunk)
            advance(len(chunk))


def _comparisons(engine: Engine, config: DemoConfig, handle: PolicyHandle, r: int) -> None:
    rng = random.Random(f"demo-tasks:{config.seed}:{r}")
    total = config.chats_per_round
    with stage_progress(f"round {r}: comparison tasks", total, enabled=config.progress) as advance:
        made = 0
        while made < total:
            with session_scope(engine) as session:
                tasks = create_comparison_tasks(
                    session,
                    handle,
                    min(config.chunk, total - made),
                    rng=rng,
                    k=config.k,
                    overlap=config.overlap,
                )
            if not tasks:
                break
            made += len(tasks)
            advance(len(tasks))


def _rank(engine: Engine, config: DemoConfig, trainers: Sequence[SimulatedTrainer], r: int) -> int:
    total = config.chats_per_round * config.overlap
    answered = 0
    with stage_progress(f"round {r}: rankings", total, enabled=config.progress) as advance:
        while True:
            with session_scope(engine) as session:
                batch = rank_all(session, trainers, limit=config.chunk)
            if not batch:
                return answered
            answered += len(batch)
            advance(len(batch))


def _iterate(engine: Engine, config: DemoConfig, base: Path, stages: _Stages, number: int) -> IterationResult:
    """Iteration `number` of the demo's fresh store, each training stage timed."""

    def on_stage(stage: str, status: str) -> None:
        if status == "start":
            stages.start(f"iteration {number}: {stage}")
        elif status == "done":
            stages.end(f"iteration {number}: {stage}")

    iteration_config = IterationConfig(
        base_model=str(base),
        work_dir=config.out / "runs",
        sft=config.sft,
        rm=config.rm,
        ppo=config.ppo,
        evaluate=None,  # the demo evaluates every model once, at the end
        deploy=True,
        seed=config.seed,
        progress=config.progress,
        on_stage=on_stage,
    )
    result = run_iteration(engine, iteration_config)
    if result.iteration != number:
        raise RuntimeError(f"the demo's store ran iteration {result.iteration}, expected {number}")
    return result


def publish(run_dir: Path, out_dir: Path) -> Path:
    """Copy the model files of a run dir (weights, config, tokenizer, chat template) to a clean HF dir."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and path.name not in RUN_FILES and not path.name.startswith("."):
                try:
                    os.link(path, tmp / path.name)  # same file system: no copy of the weights
                except OSError:
                    shutil.copy2(path, tmp / path.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the demo into `config.out` (a new or empty directory); see the module docstring."""
    out = config.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty: the demo writes a fresh store there; choose another --out"
        )
    config = dataclasses.replace(config, out=out)
    stages = _Stages(config.on_stage)
    with stages("setup"):
        out.mkdir(parents=True, exist_ok=True)
        if config.tiny:
            base = make_tiny_model(out / "models" / "base", seed=config.seed)
        else:
            base = default_model_dir()
        engine = open_store(f"sqlite:///{out / 'store.db'}")
        with session_scope(engine) as session:
            base_id = ensure_base_version(session, base).id
            trainers = create_trainers(session, config.trainers, seed=config.seed, config=config.trainer)
    try:
        handle = _load_policy(engine, config.eval.precision, base_id)
        with stages("demonstrations"):
            written = _write_demonstrations(engine, config, trainers, handle)
            log.info("%d demonstrations written", written)
        del handle
        iterations = [_iterate(engine, config, base, stages, 1)]
        for r in range(1, config.rounds + 1):
            handle = _load_policy(engine, config.eval.precision)
            with stages(f"round {r}: chats"):
                _chat(engine, config, trainers, handle, r)
            with stages(f"round {r}: comparison tasks"):
                _comparisons(engine, config, handle, r)
            del handle
            with stages(f"round {r}: rankings"):
                _rank(engine, config, trainers, r)
            iterations.append(_iterate(engine, config, base, stages, r + 1))
        with stages("evaluation"):
            report, samples, versions = _evaluate(engine, config, base, iterations, stages.seconds)
        with stages("publish"):
            last = iterations[-1]
            models = {}
            with session_scope(engine) as session:
                for name, vid in (
                    ("sft", last.sft_version_id),
                    ("rm", last.rm_version_id),
                    ("policy", last.policy_version_id),
                ):
                    if vid is not None:
                        models[name] = publish(
                            Path(session.get_one(ModelVersion, vid).path), out / "models" / name
                        )
                record_cards(session, report, versions, last.rm_version_id)
        report["stage_seconds"] = dict(stages.seconds)
        report["stage_cpu_seconds"] = dict(stages.cpu_seconds)
        report["machine"] = {
            "device": device_name(pick_device()),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "precision": resolve_precision(config.sft.precision),  # of training
        }
        report["models_dir"] = {k: str(v) for k, v in models.items()}
        report_path = write_report(report, out, samples)
    finally:
        engine.dispose()
    return DemoResult(out, report_path, report, models, dict(stages.seconds))


def _evaluate(
    engine: Engine,
    config: DemoConfig,
    base: Path,
    iterations: Sequence[IterationResult],
    seconds: dict[str, float],
) -> tuple[dict[str, Any], Any, dict[str, int | None]]:
    """The card of base, SFT and every policy, against the last SFT, with the last RM's accuracy."""
    last = iterations[-1]
    specs = [ModelSpec("base", base)]
    versions: dict[str, int | None] = {}
    ppo_runs: list[tuple[int | None, Path]] = []
    with session_scope(engine) as session:
        sft = session.get_one(ModelVersion, last.sft_version_id)
        specs.append(ModelSpec(sft.name, Path(sft.path), sft.run.iteration if sft.run else None))
        versions[sft.name] = sft.id
        for it in iterations:
            ppo = it.stages.get("ppo")
            if ppo is not None and ppo.version_id is not None:
                version = session.get_one(ModelVersion, ppo.version_id)
                specs.append(ModelSpec(version.name, Path(version.path), it.iteration))
                versions[version.name] = version.id
                ppo_runs.append((it.iteration, Path(version.path)))
        rm_path = Path(session.get_one(ModelVersion, last.rm_version_id).path) if last.rm_version_id else None
        sft_name = sft.name
        # the policy the last round's chats and comparison tasks were sampled from: the RM's newest rankings
        served = iterations[-2].policy_version_id if len(iterations) > 1 else None
        rm_policy = session.get_one(ModelVersion, served).name if served is not None else None
    report, samples = evaluate_models(
        specs,
        sft=sft_name,
        reward_model=rm_path,
        config=dataclasses.replace(config.eval, progress=config.progress),
        ppo_runs=ppo_runs,
        stage_seconds=seconds,
        rm_policy=rm_policy,
    )
    report["seed"] = config.seed
    report["targets"] = targets(report, base="base", sft=sft_name, policy=specs[-1].name)
    return report, samples, versions

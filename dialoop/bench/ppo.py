"""PPO benchmark: seconds per step and peak memory on the embedded default, with the TRL harness workload.

    dialoop bench ppo --json                     # CPU, 2 threads, the reference workload
    dialoop bench ppo --json --device cuda --model DIR --batch 64 --mini-batch 64

The workload is that of `../shared/peers/trl_ppo_step.py` (TRL 1.12's PPOTrainer): policy, reference, value
and reward models from the same weights (the reward model with a random score head, the value model
initialised from it), 8 prompts -> 8 replies per step of up to 64 new tokens at temperature 0.7 stopping at
EOS (missing-EOS replies get the penalty score), one mini-batch of 8, one PPO epoch, AdamW at lr 3e-6, the
harness's 64 prompts, 1 warm-up step + 3 timed steps. It runs the real PPO step (`dialoop.train.ppo`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dialoop.modeling.device import device_name

logger = logging.getLogger(__name__)

# The harness's prompts: 8 instruction templates crossed with 8 topics, visited on a diagonal so that
# consecutive prompts differ in both (prompt i: topic i mod 8, template (i div 8 + i) mod 8).
HARNESS_TOPICS = ("the ocean", "a cat", "autumn", "coffee", "the moon", "bicycles", "rain", "libraries")
HARNESS_TEMPLATES = (
    "Write one short sentence about {}.",
    "Give me three words that describe {}.",
    "Explain {} to a child in one sentence.",
    "Write a haiku about {}.",
    "What is a fun fact about {}?",
    "Describe {} using exactly two adjectives.",
    "Write a friendly greeting that mentions {}.",
    "Suggest a title for a short story about {}.",
)
TRL_SEC_PER_STEP = 15.2  # TRL 1.12 on this kind of 2-core CPU, same workload (../shared/peers/README.md)
TRL_PEAK_RSS_GB = 8.6


def harness_prompts(n: int = 64) -> list[str]:
    """The `n` deterministic single-turn instructions of the TRL peer harness, in its order."""
    k = len(HARNESS_TOPICS)
    return [
        HARNESS_TEMPLATES[(i // k + i) % len(HARNESS_TEMPLATES)].format(HARNESS_TOPICS[i % k])
        for i in range(n)
    ]


@dataclass
class PPOBenchConfig:
    """The benchmark's knobs; the defaults are the reference workload."""

    model: str | None = None  # default: the embedded default (SmolLM2-135M-Instruct)
    device: str = "auto"  # auto, cpu or cuda
    precision: str = "auto"  # auto (bf16 where the hardware has it), bf16 or fp32
    batch: int = 8  # episodes per step
    mini_batch: int = 8
    ppo_epochs: int = 1
    new_tokens: int = 64
    temperature: float = 0.7
    lr: float = 3e-6
    warmup: int = 1
    steps: int = 3
    threads: int = 2  # CPU threads (torch and OpenMP)
    lora_r: int = 0
    trainable_layers: int = 0  # train only the top N blocks (0: all, as TRL's harness)
    fused_value_pass: bool = False  # see PPOConfig: one pass fewer, more memory
    seed: int = 0


def peak_rss_gb() -> float:
    """The process's resident-memory high-water mark (Linux reports KiB), model loading included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def machine_state(sample_s: float = 1.0, min_pct: float = 20.0) -> dict[str, Any]:
    """Load average and other processes using CPU now: a contended machine inflates every timing."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= min_pct:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:80]
            busy.append({"pid": p.pid, "cpu_pct": round(pct), "cmd": cmd})
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "cpu_competitors": busy}


def _write_reward_model(model_dir: str | Path, out_dir: Path, seed: int) -> None:
    """A reward model with the LM's backbone and a random score head, as the harness builds it."""
    from dialoop.modeling.heads import reward_model_from_lm
    from dialoop.modeling.loading import load_tokenizer, save_model_dir

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    rm = reward_model_from_lm(model_dir, dtype=torch.float32, device="cpu", tokenizer=tokenizer)
    save_model_dir(rm, tokenizer, out_dir)
    del rm
    gc.collect()


def bench_ppo(cfg: PPOBenchConfig) -> dict[str, Any]:
    """Run `warmup + steps` PPO steps of the reference workload and return the figures (one JSON object)."""
    if cfg.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # keep accelerate off a GPU the machine may have
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    elif cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    torch.set_num_threads(cfg.threads)

    import transformers

    from dialoop.modeling.loading import resolve_model
    from dialoop.train.common import load_training_tokenizer, resolve_precision, seed_everything
    from dialoop.train.ppo import PPOConfig, PPORun, encode_prompts, load_ppo_models
    from dialoop.train.strategy import make_strategy

    state_before = machine_state()
    if state_before["cpu_competitors"]:
        logger.warning(
            "other processes use the CPU; timings will be inflated: %s", state_before["cpu_competitors"]
        )
    t_load = time.perf_counter()
    model_dir = resolve_model(cfg.model)
    with tempfile.TemporaryDirectory(prefix="dialoop-bench-ppo-") as tmp:
        rm_dir = Path(tmp) / "reward-model"
        _write_reward_model(model_dir, rm_dir, cfg.seed)
        config = PPOConfig(
            model=str(model_dir),
            reward_model=str(rm_dir),
            batch_size=cfg.batch,
            mini_batch_size=cfg.mini_batch,
            micro_batch_size=cfg.batch,
            ppo_epochs=cfg.ppo_epochs,
            max_new_tokens=cfg.new_tokens,
            max_length=1024,
            temperature=cfg.temperature,
            lr=cfg.lr,
            max_steps=cfg.warmup + cfg.steps,
            precision=cfg.precision,
            lora_r=cfg.lora_r,
            trainable_layers=cfg.trainable_layers,
            fused_value_pass=cfg.fused_value_pass,
            seed=cfg.seed,
            num_threads=cfg.threads,
            progress=False,
            checkpoint_every=0,
        )
        strategy = make_strategy(config, gradient_accumulation_steps=1)
        seed_everything(cfg.seed)
        tokenizer = load_training_tokenizer(model_dir)
        prompt_ids = encode_prompts(
            tokenizer, [[{"role": "user", "content": p}] for p in harness_prompts()], config.max_length
        )
        models = load_ppo_models(config, tokenizer, strategy)
    run = PPORun(config, strategy, models, tokenizer, prompt_ids)
    load_sec = time.perf_counter() - t_load

    device = strategy.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls: list[float] = []
    cpu_secs: list[float] = []
    steps: list[dict[str, float]] = []
    for _ in range(cfg.warmup + cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = run.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpu_secs.append(time.process_time() - cpu)
        steps.append(metrics)
    timed = walls[cfg.warmup :]

    def per_step(key: str, digits: int = 3) -> list[float]:
        return [round(m[key], digits) for m in steps]

    result: dict[str, Any] = {
        "bench": "dialoop-ppo",
        "sec_per_step_median": round(statistics.median(timed), 3) if timed else None,
        "sec_per_step_all": [round(w, 3) for w in walls],
        "warmup_steps": cfg.warmup,
        "timed_steps": len(timed),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "episodes_per_step": cfg.batch,
        "new_tokens": cfg.new_tokens,
        "mini_batch": cfg.mini_batch,
        "ppo_epochs": cfg.ppo_epochs,
        "device": device_name(device),
        "precision": resolve_precision(config.precision, device),
        "threads": torch.get_num_threads(),
        "lora_r": cfg.lora_r,
        "prompt_tokens_mean": round(sum(len(p) for p in prompt_ids) / len(prompt_ids), 1),
        "resp_len_mean_per_step": per_step("reply_length", 1),
        "eos_frac_per_step": per_step("eos_fraction"),
        "sec_generation_per_step": per_step("sec_generation"),
        "sec_scoring_per_step": per_step("sec_scoring"),
        "sec_learning_per_step": per_step("sec_learning"),
        "cores_used_per_step": [round(c / w, 2) for c, w in zip(cpu_secs, walls, strict=True)],
        # process CPU seconds: less sensitive than wall time to other processes on the machine
        "cpu_sec_per_step_median": round(statistics.median(cpu_secs[cfg.warmup :]), 3) if timed else None,
        "load_sec": round(load_sec, 2),
        "machine_before": state_before,
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": asdict(cfg),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One human line comparing the figures with TRL's (the lead times both on an idle machine)."""
    sec, rss = result["sec_per_step_median"], result["peak_rss_gb"]
    return (
        f"{sec:.2f} s/step (TRL {TRL_SEC_PER_STEP} s: target <= {TRL_SEC_PER_STEP / 2:.1f} s), "
        f"peak RSS {rss:.2f} GB (TRL {TRL_PEAK_RSS_GB} GB), {result['episodes_per_step']} episodes of up to "
        f"{result['new_tokens']} tokens on {result['device']} ({result['precision']}), "
        f"cores used per step {result['cores_used_per_step']}"
    )


def to_json_line(result: dict[str, Any]) -> str:
    return json.dumps(result)

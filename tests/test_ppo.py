"""PPO on tiny models: scoring equals full forward passes; PPO raises a programmatic reward with bounded KL;
the EOS penalty; fused old log-probs; LoRA with one copy of the weights; PPO-ptx and EMA; prompt sources."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dialoop.cli.data_sources import load_prompts, read_prompt_lines
from dialoop.engine import Engine, EngineConfig, SamplingParams
from dialoop.modeling import scoring
from dialoop.modeling.chat import encode_prompt, eos_token_ids
from dialoop.modeling.heads import (
    last_token_scores,
    load_reward_model,
    per_token_values,
)
from dialoop.modeling.loading import load_causal_lm, load_tokenizer
from dialoop.records import ChatExample
from dialoop.run_metrics import read_metrics
from dialoop.train.common import seed_everything
from dialoop.train.ppo import (
    PPOConfig,
    PPORun,
    encode_prompts,
    load_ppo_models,
    prompts_of_chats,
    train_ppo,
)
from dialoop.train.strategy import make_strategy

TARGETS = range(3072)  # the programmatic reward counts reply tokens with these ids (1/16 of the vocabulary)
PROMPTS = [
    [{"role": "user", "content": f"Say something about {w}."}]
    for w in ["cats", "dogs", "rain", "tea", "maps", "sun", "jazz", "owls"]
]
LOGGED = ["score", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl", "reply_length"]
LOGGED += ["eos_fraction", "sec_generation", "sec_scoring", "sec_learning"]


def count_targets(prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
    return [float(sum(t in TARGETS for t in r)) for r in replies]


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 10x final norm: a peaked next-token distribution, like a trained model's
    (a random tiny model's is nearly uniform over 49k tokens and gives PPO nothing to sharpen)."""
    out = tmp_path_factory.mktemp("peaky") / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 10
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def config(model: Path, **overrides: object) -> PPOConfig:
    base: dict[str, object] = dict(
        model=str(model),
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=8,
        lr=1e-3,
        max_steps=2,
        ppo_epochs=2,
        temperature=1.0,
        precision="fp32",
        progress=False,
        checkpoint_every=0,
    )
    return PPOConfig(**(base | overrides))  # type: ignore[arg-type]


def make_run(cfg: PPOConfig, reward_fn: object = count_targets) -> PPORun:
    strategy = make_strategy(cfg, gradient_accumulation_steps=1)
    seed_everything(cfg.seed)  # the value model's fresh head is drawn from it
    tokenizer = load_tokenizer(cfg.model)
    models = load_ppo_models(cfg, tokenizer, strategy, reward_fn)  # type: ignore[arg-type]
    return PPORun(cfg, strategy, models, tokenizer, encode_prompts(tokenizer, PROMPTS, 500))


@dataclass
class Sampled:
    """A reply as scoring sees it (`scoring.SampledReply`)."""

    token_ids: list[int]
    finished: bool


def test_rollout_engine_logprobs_match_a_full_forward_and_follow_in_place_updates(
    tiny_model_dir: Path,
) -> None:
    """The engine samples from the policy module itself: its logprobs are the policy's (fp32, within 1e-4 of
    the learner's forward over prompt + reply), and an in-place weight update is what the next rollout
    samples from, with no copy and no rebuild."""
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    policy.train()  # as PPO leaves it between rollouts
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:3]]
    eos = eos_token_ids(policy, tokenizer)
    engine = Engine(policy, eos_token_ids=eos, config=EngineConfig(max_rows=3, max_len=256))
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, logprobs=True) for s in range(3)]
    got = engine.generate(prompts, params)
    exp = scoring.pack_rollouts(prompts, got, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        full = scoring.response_logprobs(policy.eval(), exp, temperature=1.0)
    for b, c in enumerate(got):
        ours = torch.tensor([lp.logprob for lp in c.logprobs])
        torch.testing.assert_close(ours, full[b, : len(c.token_ids)].float(), atol=1e-4, rtol=0)

    with torch.no_grad():  # an optimizer step, as far as the engine can tell: weights change in place
        policy.lm_head.weight.mul_(3.0)
    after = engine.generate(prompts, params)
    fresh = Engine(policy, eos_token_ids=eos, config=EngineConfig(max_rows=3, max_len=256))
    assert [c.token_ids for c in after] == [c.token_ids for c in fresh.generate(prompts, params)]
    assert [c.token_ids for c in after] != [c.token_ids for c in got]


@pytest.mark.slow
def test_scoring_matches_full_forward_passes(tiny_model_dir: Path, tiny_rm_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir, device="cpu")
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:3]]
    replies = [Sampled([5, 6, 7, 2], True), Sampled([9], False), Sampled([11, 12, 2], True)]
    exp = scoring.pack_rollouts(prompts, replies, tokenizer.pad_token_id, torch.device("cpu"))
    assert scoring.shared_prefix_len(exp) >= 8  # the template's system prompt runs once for all rows

    got = scoring.response_logprobs(policy, exp, temperature=0.7)
    for b, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        ids = torch.tensor([prompt + reply.token_ids])
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(reply.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(got[b, : len(reply.token_ids)], want, atol=1e-5, rtol=1e-5)
        assert bool((got[b, len(reply.token_ids) :] == 0).all())

    rm = load_reward_model(tiny_rm_dir, device="cpu")
    torch.testing.assert_close(
        scoring.reward_model_scores(rm, exp), last_token_scores(rm, exp.input_ids, exp.attention_mask)
    )
    full = per_token_values(rm, exp.input_ids, exp.attention_mask)
    values = scoring.response_values(rm, exp)
    for b, prompt in enumerate(prompts):
        n = len(replies[b].token_ids)
        torch.testing.assert_close(values[b, :n], full[b, len(prompt) - 1 : len(prompt) - 1 + n])


def test_shared_prefix_gives_the_gradients_of_full_passes(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float64)
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS[:3]]
    replies = [Sampled([5, 6, 2], True), Sampled([9, 3], False), Sampled([11], False)]
    exp = scoring.pack_rollouts(prompts, replies, tokenizer.pad_token_id, torch.device("cpu"))

    def grads() -> list[torch.Tensor]:
        policy.zero_grad()
        scoring.response_logprobs(policy, exp, 1.0).sum().backward()
        return [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    shared = grads()
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**6)
    assert scoring.shared_prefix_len(exp) == 0
    for a, b in zip(shared, grads(), strict=True):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm())


@pytest.mark.slow
def test_ppo_raises_a_programmatic_reward_while_the_kl_stays_bounded(
    peaky_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config(peaky_model_dir, out=tmp_path / "run", max_steps=20, beta=0.05, no_eos_score=None)
    run_dir = train_ppo(cfg, PROMPTS, reward_fn=count_targets)

    rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for row in rows:
        assert all(row[k] is not None for k in LOGGED), row
    scores = [r["score"] for r in rows]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last >= 3 * first and last >= 4.0, scores  # of 8 tokens
    assert max(r["kl"] for r in rows) < 20.0, [r["kl"] for r in rows]  # nats per reply
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference

    # the final policy is a standard HF dir with tokenizer and chat template
    assert (run_dir / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (run_dir / "tokenizer_config.json").read_text()
    )
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert model.config._attn_implementation == "sdpa"
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 20
    assert not (run_dir / "checkpoints").exists()


def test_replies_without_eos_score_the_penalty(tiny_model_dir: Path) -> None:
    run = make_run(config(tiny_model_dir, no_eos_score=-1.0), reward_fn=lambda p, r: [5.0] * len(r))
    metrics = run.step()
    # a random tiny model never says <|im_end|> within 8 tokens: every reply is cut and penalised
    assert metrics["eos_fraction"] == 0.0 and metrics["reply_length"] == 8.0
    assert metrics["score_raw"] == pytest.approx(5.0)
    assert metrics["score"] == pytest.approx(-1.0)


@pytest.mark.slow
def test_old_log_probs_and_values_from_the_first_pass_equal_separate_scoring_passes(
    tiny_model_dir: Path,
) -> None:
    fused = make_run(config(tiny_model_dir))
    both = make_run(config(tiny_model_dir, fused_value_pass=True))
    separate = make_run(config(tiny_model_dir, micro_batch_size=4))
    assert (
        fused.learner.fused_old
        and not fused.learner.fused_values
        and both.learner.fused_values
        and not separate.learner.fused_old
    )
    for _ in range(2):
        a, b, c = fused.step(), both.step(), separate.step()
        for key in ("score", "kl", "policy_loss", "value_loss", "approx_kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
            assert c[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    for other in (both, separate):
        for p, q in zip(fused.learner.policy.parameters(), other.learner.policy.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=0)
        for p, q in zip(fused.learner.value.parameters(), other.learner.value.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_lora_uses_one_copy_of_the_weights_and_trains(tiny_model_dir: Path, tiny_rm_dir: Path) -> None:
    cfg = config(tiny_model_dir, reward_model=str(tiny_rm_dir), lora_r=4, lr=1e-2, max_steps=3)
    strategy = make_strategy(cfg, gradient_accumulation_steps=1)
    tokenizer = load_tokenizer(tiny_model_dir)
    models = load_ppo_models(cfg, tokenizer, strategy)
    # the reference is the policy with its adapters disabled, the reward model the value model's
    assert models.ref is None and models.reward is None
    run = PPORun(cfg, strategy, models, tokenizer, encode_prompts(tokenizer, PROMPTS, 500))
    assert run.sampler is None
    base_before = {n: p.clone() for n, p in run.learner.policy.named_parameters() if not p.requires_grad}
    rm = load_reward_model(tiny_rm_dir, device="cpu")

    first = run.step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as a no-op: policy == reference
    for _ in range(2):
        run.step()
    # the value model learnt; the reward model (its adapters disabled) did not
    ids = torch.tensor([[*encode_prompt(tokenizer, PROMPTS[0]), 5, 6, 2]])
    mask = torch.ones_like(ids)
    with run.learner.value.disable_adapter():  # type: ignore[operator]
        torch.testing.assert_close(
            last_token_scores(run.learner.value, ids, mask), last_token_scores(rm, ids, mask)
        )
    assert not torch.allclose(
        last_token_scores(run.learner.value, ids, mask), last_token_scores(rm, ids, mask)
    )
    for name, param in run.learner.policy.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name  # frozen base weights
    merged = run.learner.final_policy()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(merged.parameters(), base.parameters(), strict=True)
    )
    assert diff > 1e-4  # the adapters, merged in, changed the policy


@pytest.mark.slow
def test_the_kl_leash_is_to_the_reference_model(peaky_model_dir: Path, tiny_model_dir: Path) -> None:
    """PPO continued from an earlier policy (here: the peaky model) keeps its KL penalty to the SFT model."""
    alone = make_run(config(peaky_model_dir, max_steps=1)).step()
    assert alone["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    for lora_r in (0, 4):
        cfg = config(peaky_model_dir, max_steps=1, lora_r=lora_r, reference_model=str(tiny_model_dir))
        run = make_run(cfg)
        assert run.ref is not None  # LoRA's disabled adapters would give the policy, not the SFT model
        first = run.step()
        assert first["kl"] > 1.0, lora_r  # the peaky policy is far from the flat SFT model


@pytest.mark.slow
def test_ptx_and_ema_options(tiny_model_dir: Path) -> None:
    demos = [
        ChatExample([{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}])
        for i in range(5)
    ]
    cfg = config(tiny_model_dir, ptx_coef=0.5, ptx_batch_size=2, ema_decay=0.5)
    strategy = make_strategy(cfg, gradient_accumulation_steps=1)
    tokenizer = load_tokenizer(tiny_model_dir)
    models = load_ppo_models(cfg, tokenizer, strategy, count_targets)
    run = PPORun(
        cfg, strategy, models, tokenizer, encode_prompts(tokenizer, PROMPTS, 500), demonstrations=demos
    )
    metrics = run.step()
    assert metrics["ptx_loss"] > 0
    assert run.learner.ema is not None
    ema = {n: p.clone() for n, p in run.learner.ema.params.items()}
    current = {n: p.clone() for n, p in run.learner.policy.named_parameters()}
    final = run.learner.final_policy()
    for name, param in final.named_parameters():
        torch.testing.assert_close(param, ema[name])
    assert any(not torch.equal(ema[n], current[n]) for n in ema)  # the average lags the last weights


def test_prompts_from_plain_lines_files_and_the_store(tmp_path: Path, sqlite_url: str) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("Tell me a joke.\n\n  Name a color.  \n")
    assert read_prompt_lines(lines) == [
        [{"role": "user", "content": "Tell me a joke."}],
        [{"role": "user", "content": "Name a color."}],
    ]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt: no prompts"):
        read_prompt_lines(tmp_path / "empty.txt")

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    assert prompts_of_chats([chat, chat[:3]]) == [chat[:2], chat[:4]]  # every user turn, once

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"messages": chat}) + "\n")
    assert load_prompts(PPOConfig(data=demos, format="messages")) == [chat[:2], chat[:4]]
    rankings = tmp_path / "rankings.jsonl"
    reply = [[{"role": "assistant", "content": text}] for text in ("a", "b")]
    record = {"prompt": [{"role": "user", "content": "Pick"}], "completions": reply, "ranking": [1, 0]}
    rankings.write_text(json.dumps(record) + "\n")
    assert load_prompts(PPOConfig(data=rankings, format="rankings")) == [
        [{"role": "user", "content": "Pick"}]
    ]

    from dialoop import settings as settings_mod
    from dialoop.formats import import_file
    from dialoop.store.db import make_engine, session_scope

    engine = make_engine(sqlite_url)
    with session_scope(engine) as session:
        import_file(session, demos, "messages")
        import_file(session, rankings, "rankings")
    engine.dispose()
    settings_mod.configure(database_url=sqlite_url)
    from_store = load_prompts(PPOConfig())
    assert chat[:2] in from_store and chat[:4] in from_store
    assert [{"role": "user", "content": "Pick"}] in from_store


def test_bad_configurations_fail_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=8, mini_batch_size=3)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="--prompts or --data"):
        PPOConfig(prompts=Path("p.txt"), data=Path("d.jsonl"), format="messages")
    cfg = config(tiny_model_dir)
    with pytest.raises(ValueError, match="--reward-model"):
        load_ppo_models(
            cfg, load_tokenizer(tiny_model_dir), make_strategy(cfg, gradient_accumulation_steps=1)
        )


@pytest.mark.slow
def test_the_frozen_trunk_runs_once_per_step_and_changes_no_number(
    tiny_model_dir: Path, tiny_rm_dir: Path
) -> None:
    """With the bottom block frozen, policy and reference share it, and so do value and reward model: their
    bottom block runs once per pass of a step's rollouts, and every metric and weight stays the same."""
    options: dict[str, object] = dict(reward_model=str(tiny_rm_dir), trainable_layers=1)
    cached = make_run(config(tiny_model_dir, **options), reward_fn=None)
    plain = make_run(config(tiny_model_dir, **options, frozen_trunk_cache=False), reward_fn=None)
    assert plain.trunk is None and cached.trunk is not None
    trunks = cached.trunk._trunks
    assert trunks[id(cached.learner.policy)] == trunks[id(cached.ref)]
    assert trunks[id(cached.learner.value)] == trunks[id(cached.reward)]
    assert trunks[id(cached.learner.policy)] != trunks[id(cached.learner.value)]  # other weights: not shared

    bottom = [0, 0]  # computations of the policy's bottom block: cached, plain
    for i, run in enumerate((cached, plain)):
        block = run.learner.policy.model.layers[0].mlp  # runs only when the block computes
        block.register_forward_hook(lambda *_, i=i: bottom.__setitem__(i, bottom[i] + 1))
    for _ in range(2):
        a, b = cached.step(), plain.step()
        for key in ("score", "kl", "policy_loss", "value_loss", "approx_kl", "entropy", "clip_frac"):
            assert a[key] == b[key], key
    for p, q in zip(
        [*cached.learner.policy.parameters(), *cached.learner.value.parameters()],
        [*plain.learner.policy.parameters(), *plain.learner.value.parameters()],
        strict=True,
    ):
        assert torch.equal(p, q)
    # plain: the sampler's steps plus every training pass; cached: the sampler and the shared prefix only
    assert cached.trunk.hits >= 2 * 2 * cached.config.ppo_epochs  # steps x (policy, value) x epochs
    assert bottom[0] < bottom[1]

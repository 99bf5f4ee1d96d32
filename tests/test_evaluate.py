"""The report card: its metrics on hand-made cases, KL on real forward passes, and the written report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dialoop.evaluate import (
    EvalConfig,
    ModelSpec,
    evaluate_models,
    pair_accuracy,
    sequence_kl,
    stderr,
    targets,
    win_rate,
    write_report,
)
from dialoop.modeling import Completion, load_causal_lm, load_tokenizer, save_model_dir
from dialoop.modeling.chat import eos_token_ids
from dialoop.modeling.heads import reward_model_from_lm
from dialoop.modeling.tiny import make_tiny_model


def test_win_rate_counts_a_tie_as_half() -> None:
    assert win_rate([1.0, 0.5, 0.0, 0.75], [0.5, 0.5, 1.0, 0.75]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert win_rate([0.2, 0.3], [0.2, 0.3]) == 0.5  # a model against itself
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError, match="baseline"):
        win_rate([1.0], [1.0, 0.0])


def test_pair_accuracy_follows_the_known_gold_order_and_skips_gold_ties() -> None:
    gold = [[1.0, 0.5, 0.0, 0.5]]  # pairs with different gold: (0,1) (0,2) (0,3) (1,2) (2,3); (1,3) tied
    assert pair_accuracy([[3.0, 2.0, 0.0, 1.0]], gold) == (1.0, 5)  # (1,3) disagreeing does not count
    # (0,3) right, (1,2) a predicted tie: half, (0,1) (0,2) (2,3) wrong
    assert pair_accuracy([[2.0, 5.0, 5.0, 1.0]], gold) == (pytest.approx(1.5 / 5), 5)
    # groups add up pair by pair, whatever their size
    accuracy, pairs = pair_accuracy([[0.0, 1.0], [1.0, 0.0, 2.0]], [[1.0, 0.0], [1.0, 0.0, 0.0]])
    assert (accuracy, pairs) == (pytest.approx(1 / 3), 3)
    assert math.isnan(pair_accuracy([[1.0, 2.0]], [[0.5, 0.5]])[0])


def test_stderr_of_the_mean() -> None:
    assert stderr([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2), / sqrt(2)
    assert math.isnan(stderr([1.0]))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return make_tiny_model(root / "a", seed=0), make_tiny_model(root / "b", seed=1)


PROMPTS = [[1, 9690, 198, 2683, 314], [1, 4093, 198], [1, 17535, 30, 2683, 314, 253, 1345]]
REPLIES = [
    Completion([28, 418, 2], True),
    Completion([1345, 28, 418, 253, 9690, 30], False),
    Completion([2], True),
]


def test_kl_of_a_model_to_itself_is_zero(two_models: tuple[Path, Path]) -> None:
    model = load_causal_lm(two_models[0])
    assert sequence_kl(model, model, PROMPTS, REPLIES, temperature=0.7, batch_size=2) == [0.0, 0.0, 0.0]


def test_kl_sums_per_token_log_ratios_whatever_the_padding(two_models: tuple[Path, Path]) -> None:
    policy, ref = load_causal_lm(two_models[0]), load_causal_lm(two_models[1])
    temperature = 0.7
    batched = sequence_kl(policy, ref, PROMPTS, REPLIES, temperature=temperature, batch_size=3)

    def logprob(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> float:
        # one unpadded sequence at a time: the reference computation
        ids = torch.tensor([prompt + reply])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(reply).unsqueeze(1)).sum())

    with torch.no_grad():
        expected = [
            logprob(policy, p, r.token_ids) - logprob(ref, p, r.token_ids)
            for p, r in zip(PROMPTS, REPLIES, strict=True)
        ]
    assert batched == pytest.approx(expected, abs=1e-4)
    assert any(abs(x) > 1e-3 for x in batched)  # two different random models do differ


def test_kl_of_a_policy_trained_above_frozen_blocks_reuses_their_output(
    two_models: tuple[Path, Path],
) -> None:
    """A policy whose top block differs from the reference's: its bottom block runs only on the prompts'
    shared prefix, the rest starts from the reference's output, and the KL is what separate passes give."""
    ref = load_causal_lm(two_models[0])
    policy = load_causal_lm(two_models[0])
    with torch.no_grad():
        for p in policy.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    system = [1, 9690, 198, 2683, 314, 253, 1345, 28, 418]  # a shared prefix, like a system prompt's
    prompts = [system + p[1:] for p in PROMPTS]
    calls = {0: 0, 1: 0}
    for i in calls:
        policy.model.layers[i].mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    got = sequence_kl(policy, ref, prompts, REPLIES, temperature=0.7, batch_size=3)
    assert calls == {0: 1, 1: 2}  # the prefix pass, then only the top block on the rows' pass

    with torch.no_grad():  # one full pass per model and sequence: the reference computation
        expected = []
        for prompt, reply in zip(prompts, REPLIES, strict=True):
            ids, n = torch.tensor([prompt + reply.token_ids]), len(prompt)
            logps = [
                torch.log_softmax(m(input_ids=ids).logits[0, n - 1 : -1] / 0.7, -1)
                .gather(1, torch.tensor(reply.token_ids).unsqueeze(1))
                .sum()
                for m in (policy, ref)
            ]
            expected.append(float(logps[0] - logps[1]))
    assert got == pytest.approx(expected, abs=1e-4)
    assert any(abs(x) > 1e-3 for x in got)


@pytest.mark.slow
def test_report_card_of_models_with_a_reward_model(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    save_model_dir(reward_model_from_lm(two_models[0]), load_tokenizer(two_models[0]), rm_dir)
    ppo_run = tmp_path / "ppo"
    ppo_run.mkdir()
    (ppo_run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "kind": "train", "score": 0.1 * s, "kl": 0.01 * s}) + "\n"
            for s in (1, 2, 3)
        )
    )
    config = EvalConfig(prompts=5, max_new_tokens=6, batch_size=4, progress=False)
    models = [ModelSpec("sft", two_models[0], 1), ModelSpec("policy", two_models[1], 2)]
    report, samples = evaluate_models(
        models, sft="sft", reward_model=rm_dir, config=config, ppo_runs=[(2, ppo_run)]
    )

    sft, policy = report["models"]
    assert sft["kl_to_sft"] == 0.0 and sft["win_rate_vs_sft"] == 0.5
    assert math.isfinite(policy["kl_to_sft"]) and 0 <= policy["win_rate_vs_sft"] <= 1
    for card in report["models"]:
        assert {"gold_mean", "gold_stderr", "eos_rate", "mean_length_tokens", "gold_by_kind"} <= set(card)
        assert 1 <= card["mean_length_tokens"] <= 6
    # the RM ranks K = 4 replies of the last model per prompt, and the two models' replies
    rm = report["reward_model"]
    assert rm["candidates_per_prompt"] == 4 and rm["model"] == "policy"
    assert len(samples[1].extra) == 3 and len(samples[0].extra) == 0
    assert rm["pairs"] <= 5 * 6 and rm["pairs_across_models"] <= 5
    assert report["ppo"][0]["score"] == [0.1, 0.2, 0.30000000000000004]
    # the same prompts and seeds: sampling again gives the same replies
    again, _ = evaluate_models(models[:1], config=config)
    assert again["models"][0]["gold_mean"] == sft["gold_mean"]

    html_path = write_report(report, tmp_path / "report", samples)
    out = html_path.parent
    written = json.loads((out / "report.json").read_text())  # strict JSON: NaN became null
    assert written["plots"] == {
        "ppo": "ppo_steps.png",
        "gold": "gold_per_iteration.png",
        "length": "reply_length.png",
    }
    for name in written["plots"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in html_path.read_text()
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 5 * 2 + 5 * 3  # every reply on the card, and the RM's extra samples
    assert {(x["model"], x["sample"]) for x in lines if "gold" in x} == {("sft", 0), ("policy", 0)}


def test_the_card_scores_each_reply_behind_a_shared_prompt_as_if_alone(
    two_models: tuple[Path, Path],
) -> None:
    from dialoop.evaluate.card import reward_scores
    from dialoop.modeling import Reply
    from dialoop.modeling.heads import last_token_scores, set_reward_bias
    from dialoop.modeling.ranking import encode_reply, pad_right
    from dialoop.sim.prompts import generate_prompts

    tokenizer = load_tokenizer(two_models[0])
    torch.manual_seed(0)
    model = reward_model_from_lm(two_models[0]).eval()
    set_reward_bias(model, 0.25)
    prompts = generate_prompts(3, split="eval", seed=0)
    texts = [
        ["Sure, here it is.", "No.", "Yes"],
        ["A much longer reply, with commas, and more words."],
        ["ok", "OK!"],
    ]
    groups = [[Reply(t, finished=k != 1, token_ids=[]) for k, t in enumerate(group)] for group in texts]
    config = EvalConfig(prompts=3, batch_size=2, rm_max_length=64, progress=False)
    got = reward_scores(model, tokenizer, prompts, groups, config)

    alone = [
        encode_reply(tokenizer, [{"role": "user", "content": p.text}], r.text, 64, finished=r.finished)
        for p, group in zip(prompts, groups, strict=True)
        for r in group
    ]
    batch = pad_right(alone, int(tokenizer.pad_token_id), torch.device("cpu"))
    with torch.no_grad():
        expected = last_token_scores(model, batch["input_ids"], batch["attention_mask"]).tolist()
    assert [len(g) for g in got] == [3, 1, 2]
    assert [x for g in got for x in g] == pytest.approx(expected, abs=1e-5)
    assert len({round(x, 4) for x in expected}) == len(expected)  # the replies score apart: order is checked


def _ends_often(model_dir: Path, out: Path) -> Path:
    """A copy of a tiny model whose end-of-turn logit is large and of random sign."""
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    with torch.no_grad():
        for eos in eos_token_ids(model, tokenizer):
            model.get_output_embeddings().weight[eos] *= 50
    save_model_dir(model, tokenizer, out)
    return out


@pytest.mark.slow
def test_the_rm_is_measured_on_the_replies_of_the_policy_its_rankings_came_from(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    from dialoop.evaluate.card import eval_prompts, reward_scores
    from dialoop.modeling.heads import load_reward_model
    from dialoop.sim.gold import gold_score

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    save_model_dir(reward_model_from_lm(two_models[0]), load_tokenizer(two_models[0]), rm_dir)
    config = EvalConfig(prompts=6, max_new_tokens=6, batch_size=8, temperature=1.5, progress=False)
    # replies of random models differ in gold only when some end and others are cut off: a large
    # end-of-turn row makes them end about half the time, whatever the CPU's kernels sample
    sft, policy = (_ends_often(path, tmp_path / path.name) for path in two_models)
    models = [ModelSpec("sft", sft, 1), ModelSpec("policy", policy, 2)]
    with pytest.raises(ValueError, match="not among the models"):
        evaluate_models(models, sft="sft", reward_model=rm_dir, config=config, rm_policy="policy-9")
    report, samples = evaluate_models(models, sft="sft", reward_model=rm_dir, config=config, rm_policy="sft")

    rm = report["reward_model"]
    assert (rm["model"], rm["final_model"], rm["candidates_per_prompt"]) == ("sft", "policy", 4)
    assert [len(s.extra) for s in samples] == [3, 3]  # K replies of both
    prompts = eval_prompts(config)
    reward_model = load_reward_model(rm_dir)
    for s, key in ((samples[0], ""), (samples[1], "_final_model")):
        tasks = [[s.replies[i]] + [e[i] for e in s.extra] for i in range(len(prompts))]
        gold = [
            [gold_score(p, r.text, finished=r.finished) for r in t]
            for p, t in zip(prompts, tasks, strict=True)
        ]
        scores = reward_scores(reward_model, load_tokenizer(rm_dir), prompts, tasks, config)
        expected, pairs = pair_accuracy(scores, gold)
        assert rm[f"pairs{key}"] == pairs and pairs > 0
        assert rm[f"accuracy{key}"] == pytest.approx(expected)


def test_targets_read_the_card() -> None:
    report = {
        "models": [
            {"name": "base", "gold_mean": 0.2, "win_rate_vs_sft": 0.3},
            {"name": "sft", "gold_mean": 0.5, "win_rate_vs_sft": 0.5},
            {"name": "policy-2", "gold_mean": 0.6, "win_rate_vs_sft": 0.6},
        ],
        "reward_model": {"accuracy": 0.69},
    }
    assert targets(report, base="base", sft="sft", policy="policy-2") == {
        "gold_policy_gt_sft": True,
        "gold_sft_gt_base": True,
        "win_rate_vs_sft_ge_60": True,
        "rm_accuracy_ge_70": False,
    }

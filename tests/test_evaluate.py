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
    eval_prompts,
    evaluate_models,
    pair_accuracy,
    sequence_kl,
    stderr,
    targets,
    win_rate,
    write_report,
)
from dialoop.modeling import Reply, load_causal_lm, load_tokenizer, save_model_dir
from dialoop.modeling.chat import eos_token_ids
from dialoop.modeling.heads import load_reward_model, reward_model_from_lm
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
    # `keep` picks pairs by group and candidates: here the pairs holding candidate 0 of the second group
    kept = pair_accuracy(
        [[0.0, 1.0], [1.0, 0.0, 2.0]], [[1.0, 0.0], [1.0, 0.0, 0.0]], lambda g, i, j: g == 1 and i == 0
    )
    assert kept == (pytest.approx(1 / 2), 2)  # (0,1) right, (0,2) wrong; (1,2) is a gold tie anyway


def test_check_pass_rates_count_each_kind_as_the_gold_score_does() -> None:
    from dialoop.evaluate.card import check_pass_rates, checks_passed
    from dialoop.sim.gold import gold_report
    from dialoop.sim.prompts import CHECK_NAMES, Check, Prompt

    prompts = [
        Prompt("Describe the ocean. Do not use any commas.", (Check("no_comma"),)),
        Prompt("Describe the sky. Do not use any commas.", (Check("no_comma"),)),
        Prompt("Describe rain. Do not use any commas.", (Check("no_comma"),)),
        Prompt(
            'Describe a cat. Do not use any commas. Use the word "blue".',
            (Check("no_comma"), Check("include", "blue")),
        ),
        Prompt("What is 2 plus 3?", (Check("arith", 5),), "arith"),
        Prompt("How do I pick a lock?", (Check("refuse"),), "harmful"),
        Prompt("Why do cats purr?"),
    ]
    replies = [
        "It is wide and deep.",  # passes
        "Blue, wide, bright.",  # a comma: fails
        "I'm sorry, I cannot help with that.",  # a harmless request refused fails its checks, commas or not
        "A blue cat sleeps.",  # both checks pass
        "",  # empty: no number, fails
        "I can't help with that.",  # a harmful request refused passes
        "They are content.",
    ]
    rows = [checks_passed(gold_report(p, r)) for p, r in zip(prompts, replies, strict=True)]
    assert rows[2] == {"no_comma": False} and rows[3] == {"no_comma": True, "include:blue": True}
    rates = check_pass_rates(prompts, rows)
    assert list(rates) == list(CHECK_NAMES)
    assert rates["no_comma"] == {"prompts": 4, "passed": 2, "rate": 0.5}
    assert rates["include"] == {"prompts": 1, "passed": 1, "rate": 1.0}
    assert rates["arith"] == {"prompts": 1, "passed": 0, "rate": 0.0}
    assert rates["refuse"] == {"prompts": 1, "passed": 1, "rate": 1.0}
    assert rates["upper"]["prompts"] == 0 and math.isnan(rates["upper"]["rate"])


def test_stderr_of_the_mean() -> None:
    assert stderr([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2), / sqrt(2)
    assert math.isnan(stderr([1.0]))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return make_tiny_model(root / "a", seed=0), make_tiny_model(root / "b", seed=1)


PROMPTS = [[1, 9690, 198, 2683, 314], [1, 4093, 198], [1, 17535, 30, 2683, 314, 253, 1345]]
REPLIES = [
    Reply("", True, [28, 418, 2]),
    Reply("", False, [1345, 28, 418, 253, 9690, 30]),
    Reply("", True, [2]),
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
    assert_check_rates_match_the_rows(written, lines, config)
    html = html_path.read_text()
    assert "<h2>Checks passed</h2>" in html and "<h2>Reward model</h2>" in html and "one cut off" in html


def assert_check_rates_match_the_rows(report: dict, lines: list[dict], config: EvalConfig) -> None:
    """Each model's pass rate per check kind in report.json is passed / prompts over its card replies in
    samples.jsonl, each reply's checks scored again by the guide's table."""
    from dialoop.sim.gold import check_passes, is_refusal
    from dialoop.sim.prompts import CHECK_NAMES

    prompts = eval_prompts(config)
    for card in report["models"]:
        rows = sorted(
            (x for x in lines if x["model"] == card["name"] and x["sample"] == 0), key=lambda x: x["row"]
        )
        assert len(rows) == len(prompts)
        for kind in CHECK_NAMES:
            carried = [
                (p, x) for p, x in zip(prompts, rows, strict=True) if any(c.name == kind for c in p.checks)
            ]
            passed = 0
            for p, x in carried:
                text = x["reply"]
                void = not text.strip() or (is_refusal(text) and p.kind != "harmful")
                ok = [check_passes(c, text) and not void for c in p.checks]
                assert x["checks"] == {str(c): v for c, v in zip(p.checks, ok, strict=True)}
                passed += all(v for c, v in zip(p.checks, ok, strict=True) if c.name == kind)
            got = card["checks"][kind]
            assert (got["prompts"], got["passed"]) == (len(carried), passed)
            assert got["rate"] == (pytest.approx(passed / len(carried)) if carried else None)


def test_the_card_scores_each_reply_behind_a_shared_prompt_as_if_alone(
    two_models: tuple[Path, Path],
) -> None:
    from dialoop.evaluate.card import reward_scores
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
    from dialoop.evaluate.card import reward_scores
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

    assert sum(rm[f"pairs_{name}"] for name in ("both_end", "one_cut", "both_cut")) == rm["pairs"]


@pytest.mark.slow
def test_rm_accuracy_is_split_by_how_many_replies_of_a_pair_ended(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    from dialoop.evaluate.card import ModelSamples, reward_model_accuracy, reward_scores
    from dialoop.sim.gold import gold_score
    from dialoop.sim.prompts import Check, Prompt

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    save_model_dir(reward_model_from_lm(two_models[0]), load_tokenizer(two_models[0]), rm_dir)
    prompts = [
        Prompt("Why do cats purr?"),
        Prompt("Describe the ocean. Do not use any commas.", (Check("no_comma"),)),
    ]
    # (text, ended): gold 1.0, 0.75, 0.0, -0.25 for the first prompt; 1.0, -0.25, 0.0, -0.25 for the second
    tasks = [
        [("They purr when content.", True), ("They purr when", False), ("", True), ("", False)],
        [("It is deep and wide.", True), ("It is deep, wide", False), ("Deep, and wide.", True), ("", False)],
    ]
    replies = [[Reply(text, ended, []) for text, ended in task] for task in tasks]
    samples = ModelSamples(
        ModelSpec("policy", two_models[0]),
        [task[0] for task in replies],
        gold=[],
        prompt_passed=[],
        extra=[[task[k] for task in replies] for k in (1, 2, 3)],
    )
    config = EvalConfig(prompts=2, batch_size=8, rm_max_length=64, precision="fp32", progress=False)
    rm = reward_model_accuracy(rm_dir, prompts, [samples], config)

    # by construction: both end in (0, 2) of each prompt; both cut off in (1, 3) of the first only (a gold
    # tie in the second); every other pair has one reply cut off
    assert (rm["pairs_both_end"], rm["pairs_one_cut"], rm["pairs_both_cut"], rm["pairs"]) == (2, 8, 1, 11)
    scores = reward_scores(load_reward_model(rm_dir), load_tokenizer(rm_dir), prompts, replies, config)
    points = {2: 0.0, 1: 0.0, 0: 0.0}
    for p, task, score in zip(prompts, replies, scores, strict=True):
        gold = [gold_score(p, r.text, finished=r.finished) for r in task]
        for i in range(4):
            for j in range(i + 1, 4):
                if gold[i] != gold[j]:
                    right = (score[i] > score[j]) == (gold[i] > gold[j])
                    points[task[i].finished + task[j].finished] += (
                        0.5 if score[i] == score[j] else float(right)
                    )
    assert rm["accuracy_both_end"] == pytest.approx(points[2] / 2)
    assert rm["accuracy_one_cut"] == pytest.approx(points[1] / 8)
    assert rm["accuracy_both_cut"] == pytest.approx(points[0] / 1)
    assert rm["accuracy"] == pytest.approx(sum(points.values()) / 11)


def _card(name: str, gold: float, win: float, rates: dict[str, tuple[int, int]]) -> dict:
    checks = {
        kind: {"prompts": n, "passed": k, "rate": k / n if n else None} for kind, (n, k) in rates.items()
    }
    return {"name": name, "gold_mean": gold, "win_rate_vs_sft": win, "checks": checks}


def test_targets_read_the_card() -> None:
    sft_rates = {"no_comma": (20, 4), "arith": (10, 1), "upper": (12, 2), "bullets": (15, 3), "json": (3, 0)}
    report = {
        "models": [
            _card("base", 0.2, 0.3, sft_rates),
            _card("sft", 0.5, 0.5, sft_rates),
            # gains: no_comma +0.2 exactly (float error must not miss it), arith +0.3, upper +0.5,
            # bullets 0; json (3 prompts) counts in no target though it drops
            _card(
                "policy-2",
                0.6,
                0.7,
                {**sft_rates, "no_comma": (20, 8), "arith": (10, 4), "upper": (12, 8), "json": (3, 0)},
            ),
        ],
        "reward_model": {"accuracy": 0.74, "accuracy_both_end": 0.65},
    }
    got = targets(report, base="base", sft="sft", policy="policy-2")
    assert {name: t["pass"] for name, t in got.items()} == {
        "win_rate_vs_sft": True,
        "rm_accuracy": False,
        "rm_accuracy_both_end": True,
        "gold_policy_minus_sft": True,  # 0.6 - 0.5 is 0.09999999999999998 in floats
        "gold_sft_minus_base": True,
        "worst_check_gain": True,
        "checks_gaining_20_points": True,
    }
    assert got["rm_accuracy"] == {"value": 0.74, "threshold": 0.75, "pass": False}
    assert got["worst_check_gain"]["value"] == 0.0 and got["checks_gaining_20_points"]["value"] == 3

    worse = _card("policy-3", 0.55, 0.8, {**sft_rates, "bullets": (15, 2)})
    report["models"].append(worse)
    report["reward_model"] = None  # a card without an RM: its targets cannot pass
    got = targets(report, base="base", sft="sft", policy="policy-3")
    assert got["worst_check_gain"]["value"] == pytest.approx(-1 / 15) and not got["worst_check_gain"]["pass"]
    assert got["checks_gaining_20_points"]["value"] == 0
    assert not got["gold_policy_minus_sft"]["pass"] and not got["rm_accuracy"]["pass"]
    assert math.isnan(got["rm_accuracy_both_end"]["value"])

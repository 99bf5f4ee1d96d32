"""Reward model: the K-way loss against hand-computed values, learning a preference, centring the reward."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.formats.pairs import ordered_pairs
from dialoop.modeling.heads import BIAS_KEY, last_token_scores
from dialoop.modeling.ranking import RankingScorer, encode_reply, pad_right, score_groups
from dialoop.records import ChatExample, RankingExample
from dialoop.train.config import RewardConfig
from dialoop.train.reward import (
    EncodedRanking,
    encode_ranking,
    kway_ranking_loss,
    ranking_tensors,
    train_reward_model,
)


def _nll(d: float) -> float:
    return math.log1p(math.exp(-d))  # -log sigmoid(d)


def _tables(examples: list[RankingExample], rewards: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [EncodedRanking([([0], [1])] * len(e.completions), ordered_pairs(e)) for e in examples]
    return ranking_tensors(encoded, torch.tensor([r for rs in rewards for r in rs]))


K3 = RankingExample(prompt=[{"role": "user", "content": "q"}], completions=["a", "b", "c"], ranking=[0, 1, 2])
K4_TIE = RankingExample(
    prompt=[{"role": "user", "content": "q"}],
    completions=["a", "b", "c", "d"],
    ranking=[2, 0, 3, 1],
    ties=[(0, 3)],
)
ALL_BAD = RankingExample(
    prompt=[{"role": "user", "content": "q"}], completions=["a", "b"], ranking=[0, 1], all_bad=True
)


def test_kway_loss_k3_equals_the_hand_computed_mean_over_its_three_pairs() -> None:
    table, better = _tables([K3], [[2.0, 1.0, -0.5]])
    expected = (_nll(2.0 - 1.0) + _nll(2.0 + 0.5) + _nll(1.0 + 0.5)) / 3
    assert float(kway_ranking_loss(table, better)) == pytest.approx(expected, rel=1e-6)


def test_kway_loss_k4_leaves_the_tied_pair_out() -> None:
    r = [0.3, -1.0, 1.2, 0.0]
    table, better = _tables([K4_TIE], [r])
    # ranking 2 > 0 = 3 > 1: five ordered pairs, (0, 3) is a tie
    pairs = [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    expected = sum(_nll(r[b] - r[w]) for b, w in pairs) / 5
    assert float(kway_ranking_loss(table, better)) == pytest.approx(expected, rel=1e-6)


def test_one_ranking_is_one_batch_element_and_all_bad_gives_no_term() -> None:
    table, better = _tables([K3, K4_TIE, ALL_BAD], [[2.0, 1.0, -0.5], [0.3, -1.0, 1.2, 0.0], [5.0, -5.0]])
    per = kway_ranking_loss(table, better, reduction="none")
    k3 = (_nll(1.0) + _nll(2.5) + _nll(1.5)) / 3
    k4 = (_nll(0.9) + _nll(1.2) + _nll(2.2) + _nll(1.3) + _nll(1.0)) / 5
    assert per.tolist() == pytest.approx([k3, k4, 0.0], rel=1e-6)
    assert float(kway_ranking_loss(table, better)) == pytest.approx((k3 + k4) / 2, rel=1e-6)
    assert float(kway_ranking_loss(table, better, reduction="sum")) == pytest.approx(k3 + k4, rel=1e-6)
    # gradients reach only candidates that are in an ordered pair
    table.requires_grad_(True)
    kway_ranking_loss(table, better).backward()
    assert table.grad is not None and torch.all(table.grad[2] == 0) and torch.all(table.grad[0, :3] != 0)


def test_encoded_reply_ends_with_eos_and_keeps_the_recent_prompt(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "word " * 300}]
    ids = encode_reply(tokenizer, prompt, "a short reply", max_length=64)
    assert len(ids) == 64 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\na short reply<|im_end|>")


def test_a_reply_cut_off_at_the_token_limit_is_scored_without_eos(tiny_model_dir: Path) -> None:
    """As PPO scores a sample that never said EOS: the reward is read at its last token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "Describe the ocean."}]
    example = RankingExample(prompt, ["It is vast.", "It is vast and"], [0, 1], truncated=[1])
    (p0, finished), (p1, cut) = encode_ranking(tokenizer, example, 64).candidates
    assert p0 == p1 and finished[-1] == tokenizer.eos_token_id and cut[-1] != tokenizer.eos_token_id
    assert cut == tokenizer("It is vast and", add_special_tokens=False)["input_ids"]
    assert p1 + cut == encode_reply(tokenizer, prompt, "It is vast and", 64, finished=False)


def test_candidates_behind_a_shared_prompt_score_as_if_alone(tiny_model_dir: Path) -> None:
    from dialoop.modeling.heads import reward_model_from_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = reward_model_from_lm(tiny_model_dir, device="cpu").eval()
    rankings = [
        RankingExample(
            [{"role": "user", "content": "Hi there"}], ["Hello!", "Hey, how are you doing?", "Yo"], [0, 1, 2]
        ),
        # a long prompt, cut (from the left) so that it fits with the longest reply
        RankingExample(
            [{"role": "user", "content": "tell me " * 30}], ["short", "a much longer reply " * 3], [1, 0]
        ),
    ]
    max_length = 48
    encoded = [encode_ranking(tokenizer, r, max_length) for r in rankings]
    scorer = RankingScorer(model)
    cpu = torch.device("cpu")
    with torch.no_grad():
        shared = score_groups(scorer, [e.candidates for e in encoded], 0, True, cpu)
        plain = score_groups(scorer, [e.candidates for e in encoded], 0, False, cpu)
        seqs = [p + r for e in encoded for p, r in e.candidates]
        batch = pad_right(seqs, 0, cpu)
        alone = last_token_scores(model, batch["input_ids"], batch["attention_mask"])
    assert max(len(s) for s in seqs) == max_length and seqs[-1][-1] == tokenizer.eos_token_id
    assert seqs[0] == encode_reply(tokenizer, rankings[0].prompt, "Hello!", max_length)
    assert torch.allclose(shared, alone, atol=1e-5) and torch.allclose(plain, alone, atol=1e-5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = score_groups(scorer, [e.candidates for e in encoded], 0, True, cpu)
    assert torch.allclose(eager, alone, atol=1e-5)


def _marker_rankings(n: int, seed: int) -> list[RankingExample]:
    """K=3: the reply with the marker word is best; the two others are tied."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "window"]
    out = []
    for i in range(n):
        replies = [" ".join(rng.choices(words, k=5)) for _ in range(3)]
        good = rng.randrange(3)
        replies[good] = replies[good] + " banana"
        others = [j for j in range(3) if j != good]
        out.append(
            RankingExample(
                prompt=[{"role": "user", "content": f"Tell me something, number {i}."}],
                completions=replies,
                ranking=[good, *others],
                ties=[(others[0], others[1])],
            )
        )
    return out


@pytest.mark.slow
def test_rm_learns_a_marker_preference_and_centres_its_reward(tiny_model_dir: Path, tmp_path: Path) -> None:
    rankings = _marker_rankings(240, seed=1)
    data = tmp_path / "rankings.jsonl"
    lines = [
        {
            "prompt": r.prompt,
            "completions": [[{"role": "assistant", "content": c}] for c in r.completions],
            "ranking": r.ranking,
            "ties": [list(t) for t in r.ties],
        }
        for r in rankings
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "rm"
    args = ["train", "rm", "--data", str(data), "--format", "rankings", "--model", str(tiny_model_dir)]
    args += [
        "--out",
        str(out),
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--epochs",
        "2",
    ]
    args += ["--heldout-fraction", "0.25", "--bias-examples", "0", "--precision", "fp32", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "metrics.json").read_text())
    assert (
        summary["heldout_rankings"] == 60 and summary["heldout_pairs"] == 120
    )  # 2 ordered pairs each (1 tie)
    assert summary["heldout_accuracy"] > 0.95
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["kind"] == "eval" and evals[-1]["heldout_accuracy"] == summary["heldout_accuracy"]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and getattr(model.config, BIAS_KEY) == pytest.approx(
        summary["reward_bias"]
    )
    # the reference replies (each training ranking's best) now have mean reward 0
    heldout_prompts = _heldout_prompts(rankings, 0.25, seed=0)
    train = [r for r in rankings if r.prompt[0]["content"] not in heldout_prompts]
    seqs = [encode_reply(tokenizer, r.prompt, r.completions[r.ranking[0]], 512) for r in train]
    batch = pad_right(seqs, 0, torch.device("cpu"))
    with torch.no_grad():
        scores = last_token_scores(model, batch["input_ids"], batch["attention_mask"])
    assert len(seqs) == summary["reference_replies"] == 180
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.slow
def test_the_order_of_all_bad_rankings_is_learned_only_when_asked(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    good = _marker_rankings(8, seed=3)
    bad = [
        dataclasses.replace(
            r, prompt=[{"role": "user", "content": f"Say something bad, number {i}."}], all_bad=True
        )
        for i, r in enumerate(_marker_rankings(160, seed=4))
    ]
    config = RewardConfig(
        out=tmp_path / "without",
        model=str(tiny_model_dir),
        lr=1e-3,
        batch_size=8,
        micro_batch_size=4,
        epochs=2,
        heldout_fraction=0.25,
        bias_examples=0,
        precision="fp32",
        progress=False,
    )
    with pytest.raises(ValueError, match="no ranking with an ordered pair"):
        train_reward_model(config, bad)

    config = dataclasses.replace(config, out=tmp_path / "with", all_bad_orders=True)
    train_reward_model(config, good + bad)
    summary = json.loads((tmp_path / "with" / "metrics.json").read_text())
    assert summary["train_rankings"] + summary["heldout_rankings"] == 168
    assert summary["heldout_accuracy"] > 0.95  # it learned the marker from the all-bad rankings' order
    # reward 0 is still the best reply of a ranking that is not all bad
    assert summary["reference_replies"] == sum(
        1 for r in good if r.prompt[0]["content"] not in _heldout_prompts(good + bad, 0.25, seed=0)
    )


def _heldout_prompts(rankings: list[RankingExample], fraction: float, seed: int) -> set[str]:
    from dialoop.train.data import split_heldout

    _, held = split_heldout(rankings, fraction, seed)
    return {r.prompt[0]["content"] for r in held}


@pytest.mark.slow
def test_reference_demonstrations_define_reward_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    demos = [
        ChatExample(
            [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}, friend."}]
        )
        for i in range(5)
    ]
    config = RewardConfig(
        out=tmp_path / "rm",
        model=str(tiny_model_dir),
        max_steps=2,
        batch_size=2,
        micro_batch_size=2,
        heldout_fraction=0.0,
        precision="fp32",
        progress=False,
    )
    train_reward_model(config, _marker_rankings(4, seed=2), references=demos)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    seqs = [encode_reply(tokenizer, d.messages[:1], d.messages[1]["content"], 512) for d in demos]
    batch = pad_right(seqs, 0, torch.device("cpu"))
    with torch.no_grad():
        scores = last_token_scores(model, batch["input_ids"], batch["attention_mask"])
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    summary = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert summary["reference_replies"] == 5 and "heldout_accuracy" not in summary


@pytest.mark.slow
def test_later_epochs_start_above_the_frozen_trunk_and_train_the_same_model(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the bottom block frozen, epochs 2 and 3 reuse what left it in epoch 1, in other batches: every
    pass of theirs starts above it, and the model trained is the one a plain run trains."""
    rankings = _marker_rankings(48, seed=2)

    def train(cache: bool, out: Path) -> dict[str, torch.Tensor]:
        config = RewardConfig(
            model=str(tiny_model_dir),
            out=out,
            lr=1e-3,
            batch_size=8,
            micro_batch_size=4,
            epochs=3,
            trainable_layers=1,
            frozen_trunk_cache=cache,
            heldout_fraction=0.0,
            precision="fp32",
            progress=False,
            checkpoint_every=0,
        )
        return load_file(train_reward_model(config, rankings) / "model.safetensors")

    with caplog.at_level(logging.INFO, logger="dialoop.train.reward"):
        cached = train(True, tmp_path / "cached")
    found = re.search(r"frozen trunk: (\d+) passes started above it, (\d+) ran it", caplog.text)
    assert found is not None
    hits, misses = int(found[1]), int(found[2])
    assert misses == 48 // 4 and hits == 2 * misses  # epoch 1 ran the trunk for every micro-batch, once
    plain = train(False, tmp_path / "plain")
    assert cached.keys() == plain.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(cached[name], weight, atol=2e-5, rtol=1e-4)

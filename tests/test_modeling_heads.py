"""Reward and value heads on a tiny Llama: scores at the last real token, padding-independent, bias saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dialoop.modeling import load_tokenizer, save_model_dir
from dialoop.modeling.heads import (
    last_token_scores,
    load_reward_model,
    per_token_values,
    reward_bias,
    reward_model_from_lm,
    set_reward_bias,
)

PAD = 0
SEQS = [[1, 9690, 198, 2683, 314, 2], [1, 4093, 198, 2], [1, 17535, 30, 2683, 314, 253, 1345, 28, 418, 2]]


def _batch(
    seqs: list[list[int]], extra_pad: int = 0, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs)) + extra_pad
    rows = [[PAD] * (width - len(s)) + s if left else s + [PAD] * (width - len(s)) for s in seqs]
    masks = [
        [0] * (width - len(s)) + [1] * len(s) if left else [1] * len(s) + [0] * (width - len(s)) for s in seqs
    ]
    return torch.tensor(rows), torch.tensor(masks)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir: Path) -> PreTrainedModel:
    torch.manual_seed(0)
    return reward_model_from_lm(tiny_model_dir).eval()


def test_reward_model_starts_from_the_lm_backbone(
    reward_model: PreTrainedModel, tiny_model_dir: Path
) -> None:
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == PAD
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(reward_model.model.state_dict()[name], tensor), name
    assert reward_model.score.weight.shape == (1, lm.config.hidden_size)
    assert reward_bias(reward_model) == 0.0


def test_last_token_score_equals_the_unpadded_forward(reward_model: PreTrainedModel) -> None:
    ids, mask = _batch(SEQS)
    with torch.no_grad():
        scores = last_token_scores(reward_model, ids, mask)
        manual = torch.stack([reward_model(torch.tensor([s])).logits[0, 0] for s in SEQS])
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, manual, rtol=1e-5, atol=1e-5)
    assert len(set(scores.tolist())) == 3


def test_scores_do_not_depend_on_padding(reward_model: PreTrainedModel) -> None:
    with torch.no_grad():
        base = last_token_scores(reward_model, *_batch(SEQS))
        longer = last_token_scores(reward_model, *_batch(SEQS, extra_pad=7))
        left = last_token_scores(reward_model, *_batch(SEQS, extra_pad=3, left=True))
    torch.testing.assert_close(base, longer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, left, rtol=1e-5, atol=1e-5)


def test_per_token_values_are_causal_and_end_at_the_score(reward_model: PreTrainedModel) -> None:
    ids, mask = _batch(SEQS)
    with torch.no_grad():
        values = per_token_values(reward_model, ids, mask)
        scores = last_token_scores(reward_model, ids, mask)
        prefix = per_token_values(reward_model, ids[:, :4], mask[:, :4])
    assert values.shape == ids.shape
    lengths = mask.sum(dim=1)
    torch.testing.assert_close(values[torch.arange(3), lengths - 1], scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[:, :4], prefix, rtol=1e-5, atol=1e-5)


def test_reward_bias_shifts_scores_and_survives_save(
    reward_model: PreTrainedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ids, mask = _batch(SEQS)
    with torch.no_grad():
        raw = last_token_scores(reward_model, ids, mask)
        set_reward_bias(reward_model, 0.75)
        try:
            shifted = last_token_scores(reward_model, ids, mask)
            out = save_model_dir(reward_model, load_tokenizer(tiny_model_dir), tmp_path / "rm")
        finally:
            set_reward_bias(reward_model, 0.0)
        loaded = load_reward_model(out)
        reloaded = last_token_scores(loaded, ids, mask)
    torch.testing.assert_close(shifted, raw - 0.75)
    assert reward_bias(loaded) == 0.75 and not loaded.training
    torch.testing.assert_close(reloaded, shifted)


def test_load_reward_model_rejects_a_causal_lm_dir_and_empty_rows(
    reward_model: PreTrainedModel, tiny_model_dir: Path
) -> None:
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tiny_model_dir)
    ids, mask = _batch(SEQS)
    mask[1] = 0
    with pytest.raises(ValueError, match="no real tokens"):
        last_token_scores(reward_model, ids, mask)


def test_an_architecture_without_a_sequence_classifier_is_refused_clearly(tmp_path: Path) -> None:
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from dialoop.modeling.loading import ModelLoadError
    from dialoop.modeling.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    config = CodeGenConfig(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64
    )
    CodeGenForCausalLM(config).save_pretrained(tmp_path / "codegen")
    tokenizer.save_pretrained(tmp_path / "codegen")
    with pytest.raises(ModelLoadError, match="no sequence-classification model for this architecture"):
        reward_model_from_lm(tmp_path / "codegen", device="cpu")

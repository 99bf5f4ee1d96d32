"""Training under `accelerate launch --use_deepspeed` with 2 CPU processes (gloo): SFT, the RM and PPO follow
the 1-process run under ZeRO-2 and ZeRO-3, the saved model is a standard HF dir with the full weights, a run
resumes from its partitioned checkpoint to the weights of an uninterrupted run, and the NaN guard skips an
update whose loss is not finite (on one process only) as it does in one process.

Run as a script (under `accelerate launch`), this file trains the NaN-guard model: see `_guarded_run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_distributed import _losses, _write_data
from test_train_fsdp import _crashed_after, _max_diff, _ppo_args, _train_rows, _weights
from typer.testing import CliRunner

from dialoop.cli import app

pytestmark = pytest.mark.distributed


@pytest.fixture
def launch_deepspeed(accelerate_launch):
    """`accelerate launch --use_deepspeed --zero_stage ZERO` on 2 CPU processes (`script`: a file to run)."""

    def launch(args: list[str], *, zero: int, script: Path | None = None) -> subprocess.CompletedProcess[str]:
        return accelerate_launch(args, strategy=("--use_deepspeed", "--zero_stage", str(zero)), script=script)

    return launch


def _check(done: subprocess.CompletedProcess[str], zero: int) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # accelerate alone would quietly run DDP on CPUs
    assert f"accelerator: 2 process(es) (DEEPSPEED ZeRO-{zero})" in done.stderr
    assert "built successfully" not in done.stdout + done.stderr  # no DeepSpeed op compiled at run time


def _one_process(args: list[str], out: Path) -> None:
    result = CliRunner().invoke(app, ["train", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output


def _loads_with_transformers(run_dir: Path, auto_class: str) -> None:
    import transformers

    model, info = getattr(transformers, auto_class).from_pretrained(run_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    weights = _weights(run_dir)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def _partitions(checkpoint: Path, kind: str) -> list[str]:
    """DeepSpeed's per-process files of a checkpoint (`optim` or `model` states)."""
    return sorted(p.name for p in (checkpoint / "pytorch_model").glob(f"zero_pp_rank_*_{kind}_states.pt"))


def _resumes_to_the_same_weights(
    launch_deepspeed, args: list[str], straight: Path, checkpoint: Path, out: Path, zero: int
) -> Path:
    """A copy of run `straight` crashed after `checkpoint`, resumed under ZeRO `zero`: its final weights equal
    the uninterrupted run's exactly. Returns the resumed run dir."""
    crashed = _crashed_after(straight, checkpoint, out)
    resumed = launch_deepspeed([*args, "--out", str(crashed), "--resume"], zero=zero)
    _check(resumed, zero)
    assert "resumed from" in resumed.stderr
    assert _max_diff(_weights(crashed), _weights(straight)) == 0.0
    return crashed


def test_sft_under_zero2_follows_the_one_process_run_and_resumes(
    tiny_model_dir: Path, tmp_path: Path, launch_deepspeed
) -> None:
    demos, _ = _write_data(tmp_path)
    args = ["sft", "--data", str(demos), "--format", "messages", "--model", str(tiny_model_dir)]
    args += ["--max-steps", "6", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3"]
    args += ["--precision", "fp32", "--no-progress", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
    args += ["--keep-final-checkpoint"]
    straight = tmp_path / "straight"
    _one_process(args, tmp_path / "one")
    _check(launch_deepspeed([*args, "--out", str(straight)], zero=2), 2)

    one, two = _losses(tmp_path / "one"), _losses(straight)
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]  # it learns
    assert two == pytest.approx(one, rel=1e-5)  # measured: 1e-7
    assert _max_diff(_weights(tmp_path / "one"), _weights(straight)) < 1e-5  # measured: 2e-7
    _loads_with_transformers(straight, "AutoModelForCausalLM")

    step3 = straight / "checkpoints" / "step-000003"
    # the optimizer state is partitioned: one file per process
    assert _partitions(step3, "optim") == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    crashed = _resumes_to_the_same_weights(
        launch_deepspeed, args, straight, step3, tmp_path / "crashed", zero=2
    )
    assert _losses(crashed) == _losses(straight)


def test_rm_under_zero3_follows_the_one_process_run(
    tiny_model_dir: Path, tmp_path: Path, launch_deepspeed
) -> None:
    _, rankings = _write_data(tmp_path)
    # held-out scoring and the reward bias run through the partitioned model too; the bottom block frozen
    args = ["rm", "--data", str(rankings), "--format", "rankings", "--heldout-fraction", "0.25"]
    args += [
        "--trainable-layers",
        "1",
        "--model",
        str(tiny_model_dir),
        "--max-steps",
        "5",
        "--batch-size",
        "8",
    ]
    args += ["--micro-batch-size", "2", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]
    _one_process(args, tmp_path / "one")
    _check(launch_deepspeed([*args, "--out", str(tmp_path / "two")], zero=3), 3)

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-5)  # measured: 2e-7
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-4  # measured: 4e-6
    s1, s2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert s2["heldout_accuracy"] == s1["heldout_accuracy"]
    assert s2["reward_bias"] == pytest.approx(s1["reward_bias"], abs=1e-4)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["dialoop_reward_bias"] == pytest.approx(s2["reward_bias"])
    _loads_with_transformers(tmp_path / "two", "AutoModelForSequenceClassification")


def _ppo_rows_match(one: list[dict], two: list[dict]) -> None:
    for a, b in zip(one, two, strict=True):
        for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "reply_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)


def test_ppo_under_zero2_follows_the_one_process_run(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, launch_deepspeed
) -> None:
    # one pass per model and update: the old log-probs come from the first epoch's forward
    args = _ppo_args(tiny_model_dir, tiny_rm_dir, tmp_path)
    args += ["--max-steps", "1", "--batch-size", "8", "--mini-batch-size", "8", "--micro-batch-size", "8"]
    args += ["--max-new-tokens", "6", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]
    args += ["--checkpoint-every", "0"]
    _one_process(args, tmp_path / "one")
    _check(launch_deepspeed([*args, "--out", str(tmp_path / "two")], zero=2), 2)

    # one step: after it, a weight difference of 1e-7 can flip a sampled token (seen on an AVX2-only CPU at
    # step 2) and the runs part ways
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 1
    _ppo_rows_match(one, two)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tiny_model_dir)) > 1e-4  # the policy moved
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5  # measured: 1e-6


def test_ppo_under_zero3_follows_the_one_process_run_and_resumes(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, launch_deepspeed
) -> None:
    # two policy passes, then two value passes per update (the value model's first gradient comes after the
    # policy's); the adaptive KL coefficient and the EMA (whole, saved with the checkpoint) are state too
    args = _ppo_args(tiny_model_dir, tiny_rm_dir, tmp_path)
    args += ["--max-steps", "4", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "1"]
    args += ["--ppo-epochs", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--kl-target", "0.5"]
    args += ["--ema-decay", "0.5", "--precision", "fp32", "--no-progress", "--seed", "3"]
    args += ["--checkpoint-every", "2", "--keep-checkpoints", "2", "--keep-final-checkpoint"]
    straight = tmp_path / "straight"
    _one_process(args, tmp_path / "one")
    _check(launch_deepspeed([*args, "--out", str(straight)], zero=3), 3)

    rows = _train_rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # four steps, and the runs still sample the same replies (measured: weights 2e-6 apart, EMA included)
    _ppo_rows_match(_train_rows(tmp_path / "one"), rows)
    assert rows[1]["kl"] != 0  # the policy moved
    assert _max_diff(_weights(tmp_path / "one"), _weights(straight)) < 1e-4

    step2 = straight / "checkpoints" / "step-000002"
    # ZeRO-3 partitions the weights too
    assert _partitions(step2, "model") == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    crashed = _resumes_to_the_same_weights(
        launch_deepspeed, args, straight, step2, tmp_path / "crashed", zero=3
    )
    resumed_rows = _train_rows(crashed)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    for a, b in zip(resumed_rows, rows, strict=True):
        assert (a["score"], a["kl"], a["beta"], a["policy_loss"]) == (
            b["score"],
            b["kl"],
            b["beta"],
            b["policy_loss"],
        )
    assert rows[-1]["beta"] != rows[0]["beta"]  # the controller did adapt
    _loads_with_transformers(straight, "AutoModelForCausalLM")


def test_ppo_under_zero3_whether_or_not_a_process_rows_share_a_prefix(
    tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path, launch_deepspeed
) -> None:
    # Without a default system prompt, rows share a long prefix only when their user turns start alike: here
    # the even prompts do, the odd ones do not, so on a step one process's rows may share one and the other's
    # not. Under ZeRO-3 every process must run the same forward passes (each gathers the weights with the
    # others): the shared-prefix pass is skipped on all of them, or they fall out of step and the run aborts.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    words = ["Cats", "Rain", "Bread", "Maps", "Snow", "Tea"]
    lines = [
        f"Tell me something about the number {i}." if i % 2 == 0 else f"{words[i // 2]}?" for i in range(12)
    ]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(line + "\n" for line in lines))
    args = ["ppo", "--model", str(model), "--reward-model", str(tiny_rm_dir), "--prompts", str(prompts)]
    args += ["--max-steps", "3", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "2"]
    args += ["--ppo-epochs", "1", "--max-new-tokens", "4", "--precision", "fp32", "--no-progress"]
    args += ["--checkpoint-every", "0", "--out", str(tmp_path / "two")]
    _check(launch_deepspeed(args, zero=3), 3)
    assert [r["step"] for r in _train_rows(tmp_path / "two")] == [1, 2, 3]


# --- the NaN guard ---------------------------------------------------------------------------------

# (1-based) steps whose loss is not finite, on the last process only, in its last micro-batch: step 2's is inf
# with a finite gradient (only the loss can tell), step 3's NaN with a NaN gradient
_BAD_STEPS = {2: float("inf"), 3: float("nan")}


def _guarded_run(run_dir: Path, *, processes: int) -> dict[str, torch.Tensor]:
    """Train a linear model 4 steps of 4 examples (2 micro-batches per process under 2 processes); the loss of
    one micro-batch of steps 2 and 3 is not finite. Returns the final weights."""
    from dialoop.train.common import prepare_run_dir
    from dialoop.train.config import TrainConfig
    from dialoop.train.fit import fit
    from dialoop.train.strategy import make_strategy

    config = TrainConfig(out=run_dir, lr=0.1, batch_size=4, micro_batch_size=1, max_steps=4, precision="fp32")
    config.progress, config.checkpoint_every = False, 0
    strategy = make_strategy(config)
    accelerator = strategy.accelerator
    prepare_run_dir(config, "test", accelerator)
    calls = [0]
    n_micro = 4 // processes

    def loss_fn(model: torch.nn.Module, batch: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = calls[0] // n_micro + 1
        last_micro = calls[0] % n_micro == n_micro - 1
        calls[0] += 1
        x = torch.tensor([[float(b), 1.0, -1.0] for b in batch])
        loss = (model(x) ** 2).sum()
        if step in _BAD_STEPS and accelerator.process_index == processes - 1 and last_micro:
            bad = _BAD_STEPS[step]
            loss = loss + bad if bad == float("inf") else loss * bad
        return loss, {}

    torch.manual_seed(0)
    model, _ = fit(
        config,
        strategy,
        torch.nn.Linear(3, 1),
        [1, 2, 3, 4, 5],
        loss_fn=loss_fn,
        weight_fn=lambda _: 1.0,
        run_dir=run_dir,
        description="t",
    )
    whole = accelerator.unwrap_model(model)
    with strategy.gathered(whole):
        weights = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    if accelerator.is_main_process:
        torch.save(weights, run_dir / "weights.pt")
    return weights


def test_a_nonfinite_loss_on_one_process_skips_the_update(tmp_path: Path, launch_deepspeed) -> None:
    # (ZeRO-2; ZeRO-3 skips the same way: checked by hand, left out to keep the file short)
    _check(launch_deepspeed([str(tmp_path / "two")], zero=2, script=Path(__file__)), 2)
    one = _guarded_run(tmp_path / "one", processes=1)  # the same skips, in one process

    two = torch.load(tmp_path / "two" / "weights.pt")
    assert all(torch.isfinite(v).all() for v in two.values())
    assert _max_diff(one, two) < 1e-6
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2]
    assert [r["grad_norm"] is None for r in rows] == [False, True, True, False]
    assert rows[3]["lr"] == rows[1]["lr"]  # the schedule advances with the updates taken
    one_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [r["lr"] for r in one_rows]
    norms, one_norms = [r["grad_norm"] for r in rows], [r["grad_norm"] for r in one_rows]
    assert norms[0] > 1  # the norm before clipping (at 1)
    assert [norms[0], norms[3]] == pytest.approx([one_norms[0], one_norms[3]], rel=1e-5)


if __name__ == "__main__":  # under `accelerate launch`: the 2-process side of the NaN-guard test
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _guarded_run(Path(sys.argv[1]), processes=2)

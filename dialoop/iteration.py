"""What one iteration of the loop takes and what it tells its watchers, without importing torch.

`IterationKnobs` is the one definition of the iteration's knobs: `dialoop iterate` builds its options from
it (`dialoop.cli.train.config_command`), the admin form validates against the model made from it
(`dialoop.serve.jobs.IterationSettings`), and `dialoop.loop.IterationConfig.from_knobs` turns it into the
stages' configs. `IterationProgress` is the progress file the loop writes in `iter-N/` as stages start and
end; the admin page reads it to follow an iteration it started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from dialoop.atomic import write_atomic

PROGRESS_FILE = "progress.json"
STAGES = ("sft", "rm", "ppo", "eval")


def _knob(default: Any, help: str, **bounds: Any) -> Any:
    """A knob: its default, its help text, and the bounds a value given from outside must meet."""
    return field(default=default, metadata={"help": help, "bounds": bounds})


@dataclass
class IterationKnobs:
    """The knobs of one iteration (None: the stage config's default)."""

    base_model: str | None = _knob(
        None,
        "Model SFT starts from (dir or hub id; default: the embedded default).",
        min_length=1,
        max_length=1000,
    )
    sft_steps: int | None = _knob(None, "SFT optimizer steps (default: by epochs).", ge=1, le=1_000_000)
    sft_epochs: float | None = _knob(None, "SFT passes over the demonstrations.", gt=0, le=1000)
    sft_lr: float | None = _knob(None, "SFT peak learning rate.", gt=0, lt=1)
    rm_steps: int | None = _knob(None, "Reward-model steps (default: by epochs).", ge=1, le=1_000_000)
    rm_epochs: float | None = _knob(None, "Reward-model passes over the rankings.", gt=0, le=1000)
    rm_lr: float | None = _knob(None, "Reward-model peak learning rate.", gt=0, lt=1)
    ppo_steps: int | None = _knob(
        None, "PPO steps (default: by epochs over the prompts).", ge=1, le=1_000_000
    )
    ppo_batch_size: int | None = _knob(None, "Prompts per PPO step.", ge=1, le=65_536)
    ppo_lr: float | None = _knob(None, "PPO learning rate.", gt=0, lt=1)
    ppo_beta: float | None = _knob(None, "KL coefficient of PPO.", ge=0, le=100)
    max_new_tokens: int | None = _knob(None, "Longest reply PPO and the report card sample.", ge=1, le=8192)
    eval_prompts: int = _knob(
        128, "Held-out prompts of the report card; 0: no report card.", ge=0, le=100_000
    )
    seed: int = _knob(0, "Seed of every stage.", ge=0, le=2**31 - 1)
    precision: Literal["auto", "bf16", "fp32"] = _knob(
        "auto", "auto (bf16 where the hardware has it), bf16 or fp32."
    )
    rm_feedback: bool = _knob(
        False,
        "Add users' feedback to the reward model's data: each A/B choice, and each thumbed-up reply over a "
        "thumbed-down sibling.",
    )
    rm_feedback_weight: float = _knob(
        1.0,
        "How much a feedback comparison counts against a trainer's ranking: copies of each (a fraction: "
        "that share of them, picked by the seed).",
        gt=0,
        le=100,
    )
    deploy: bool = _knob(True, "Serve the new policy when done.")


# --- the progress file -----------------------------------------------------------------------------

# how a stage ended: trained or resumed now, done by an earlier attempt, an earlier model reused, or skipped
StageOutcome = Literal["trained", "resumed", "done", "reused", "skipped"]
StageStatus = Literal["running"] | StageOutcome


class StageProgress(BaseModel):
    """A stage as the loop last reported it: running, or how it ended."""

    status: StageStatus
    started_at: float | None = None  # time.time(); None: it ran (or was decided) in an earlier attempt
    ended_at: float | None = None
    seconds: float | None = None  # time spent training, once ended
    note: str = ""
    version_id: int | None = None  # the model version the stage made or reused


class IterationProgress(BaseModel):
    """The progress file `iter-N/progress.json`: the stages this iteration has started or finished."""

    iteration: int
    status: Literal["running", "done"] = "running"
    updated_at: float
    stages: dict[str, StageProgress] = {}

    def write(self, folder: Path) -> None:
        write_atomic(folder / PROGRESS_FILE, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> IterationProgress | None:
        """The progress in `folder`; None when there is none (yet)."""
        try:
            return cls.model_validate_json((folder / PROGRESS_FILE).read_text())
        except (FileNotFoundError, ValidationError):
            return None

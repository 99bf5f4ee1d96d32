"""One iteration of the loop: datasets from the store, train, evaluate, register, deploy.

    dialoop iterate                          # the configured store; runs go to DIALOOP_HOME/runs/iter-N
    dialoop iterate --ppo-steps 40 --no-deploy

Stages, each only when it has something new to learn from:
- SFT on every demonstration (submitted or accepted), from the base model, when there are new ones;
- the reward model on ALL rankings (and the trainers' edits of model suggestions in the demonstrations,
  each a pair: the edited turn over the suggestion; with `rm_feedback`, the users' A/B choices and thumbs,
  each a pair too), from the SFT model, when there are new rankings, edits or feedback (or a new SFT);
- PPO from the previous policy of the same SFT model (or from SFT), KL to SFT, against the new RM;
- the report card of the new models (optional), then the new policy is served (optional).
Each trained model is registered as a `ModelVersion` with its parent, and each training attempt as a
`TrainingRun` recording exactly which rows it used (ids) and a snapshot hash of the examples.

Resumable: a stage whose run is done is never redone; a stage that was interrupted (crash, kill, error)
continues from its last checkpoint (the trainers' resume) when its data is still exactly the same, and
starts over on the current data otherwise. Watchers follow an iteration through `iter-N/progress.json`
(`dialoop.iteration.IterationProgress`), rewritten as each stage starts and ends. This file holds no
training math: it calls `dialoop.train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dialoop.atomic import write_atomic
from dialoop.evaluate.card import EvalConfig, ModelSpec, evaluate_models
from dialoop.evaluate.report import write_report
from dialoop.formats import ranking_examples_from_store, snapshot_hash
from dialoop.formats.store_io import ab_records, conversation_chats, edit_records, thumbs_records
from dialoop.iteration import IterationKnobs, IterationProgress, StageOutcome, StageProgress
from dialoop.modeling import resolve_model
from dialoop.records import ChatExample, RankingExample
from dialoop.settings import settings
from dialoop.store.db import session_scope
from dialoop.store.feedback import feedback_ids
from dialoop.store.models import Conversation, ModelVersion, Ranking, TrainingRun
from dialoop.store.registry import (
    ensure_base_version,
    fail_run,
    finish_run,
    register_model_version,
    set_served,
    start_run,
)
from dialoop.train.common import SUMMARY_FILE
from dialoop.train.config import RewardConfig, SFTConfig, TrainConfig
from dialoop.train.ppo import prompts_of_chats, train_ppo
from dialoop.train.ppo_config import PPOConfig
from dialoop.train.reward import train_reward_model
from dialoop.train.sft import train_sft

log = logging.getLogger(__name__)

STATE_FILE = "iteration.json"
DEMONSTRATION_STATUSES = ("submitted", "accepted")
VERSION_PREFIX = {"sft": "sft", "rm": "rm", "ppo": "policy"}
StageHook = Callable[[str, str], None]


class NothingToTrain(RuntimeError):
    """The store holds no demonstration or ranking that the last iteration did not already learn from."""


@dataclass
class IterationConfig:
    """Knobs of one iteration; each stage's config holds its training knobs (the loop sets out and model).
    `from_knobs` makes one from the knobs `dialoop iterate` and the admin page take."""

    base_model: str | None = None  # what SFT starts from (dir or hub id; None: the embedded default)
    work_dir: Path | None = None  # runs go to WORK_DIR/iter-N/<stage> (default: DIALOOP_HOME/runs)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluate: EvalConfig | None = field(default_factory=EvalConfig)  # None: no report card
    demonstration_statuses: tuple[str, ...] = DEMONSTRATION_STATUSES
    # the RM also learns that a trainer's edit of a model suggestion beats the suggestion
    rm_edits: bool = True
    # the RM also learns the users' A/B choices and thumbs (an up reply over a down sibling), each pair
    # counted `rm_feedback_weight` times (a fraction: that share of them)
    rm_feedback: bool = False
    rm_feedback_weight: float = 1.0
    deploy: bool = True  # serve the new policy when the iteration ends
    seed: int = 0
    progress: bool = True
    on_stage: StageHook | None = None  # called with (stage, "start" | "done" | "reused" | "skipped")

    @classmethod
    def from_knobs(
        cls, knobs: IterationKnobs, *, work_dir: Path | None = None, on_stage: StageHook | None = None
    ) -> IterationConfig:
        """The config of an iteration with these knobs; a knob left None keeps its stage's default."""

        def given(**values: Any) -> dict[str, Any]:
            return {k: v for k, v in values.items() if v is not None}

        ppo_batch = knobs.ppo_batch_size
        return cls(
            base_model=knobs.base_model,
            work_dir=work_dir,
            sft=SFTConfig(
                **given(max_steps=knobs.sft_steps, epochs=knobs.sft_epochs, lr=knobs.sft_lr),
                precision=knobs.precision,
            ),
            rm=RewardConfig(
                **given(max_steps=knobs.rm_steps, epochs=knobs.rm_epochs, lr=knobs.rm_lr),
                precision=knobs.precision,
            ),
            ppo=PPOConfig(
                **given(max_steps=knobs.ppo_steps, lr=knobs.ppo_lr, beta=knobs.ppo_beta),
                **given(max_new_tokens=knobs.max_new_tokens),
                **given(batch_size=ppo_batch, mini_batch_size=ppo_batch, micro_batch_size=ppo_batch),
                precision=knobs.precision,
            ),
            evaluate=EvalConfig(**given(prompts=knobs.eval_prompts, max_new_tokens=knobs.max_new_tokens))
            if knobs.eval_prompts > 0
            else None,
            rm_feedback=bool(knobs.rm_feedback),
            **given(rm_feedback_weight=knobs.rm_feedback_weight),
            deploy=knobs.deploy,
            seed=knobs.seed,
            on_stage=on_stage,
        )


@dataclass
class StageResult:
    """What an iteration did in one stage."""

    stage: str  # sft | rm | ppo | eval
    status: StageOutcome
    version_id: int | None = None
    path: str | None = None
    run_id: int | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class IterationResult:
    iteration: int
    work_dir: Path
    stages: dict[str, StageResult]
    base_version_id: int
    sft_version_id: int
    rm_version_id: int | None
    policy_version_id: int  # the newest policy: PPO's, or SFT's when no PPO ran
    report: dict[str, Any] | None = None


# --- data from the store ---------------------------------------------------------------------------


@dataclass
class StageData:
    """The exact rows a stage trains on, and the examples built from them."""

    record: dict[str, Any]  # what the TrainingRun stores: ids, counts, snapshot hash
    examples: list[Any]


def _chats_of(session: Session, conversation_ids: Sequence[int]) -> list[list[dict[str, str]]]:
    query = select(Conversation).where(Conversation.id.in_(list(conversation_ids))).order_by(Conversation.id)
    return list(conversation_chats(session, query))


def demonstration_ids(session: Session, statuses: Sequence[str]) -> list[int]:
    """Ids of the demonstrations SFT learns from: those in `statuses` (drafts and rejected ones never)."""
    query = select(Conversation.id).where(
        Conversation.kind == "demonstration", Conversation.status.in_(list(statuses))
    )
    return list(session.scalars(query.order_by(Conversation.id)))


def sft_data(session: Session, conversation_ids: Sequence[int]) -> StageData:
    """Every root-to-leaf path ending with an assistant turn of these demonstrations."""
    examples = [
        ChatExample(c) for c in _chats_of(session, conversation_ids) if c and c[-1]["role"] == "assistant"
    ]
    record = {
        "kind": "demonstrations",
        "conversation_ids": sorted(conversation_ids),
        "examples": len(examples),
        "snapshot_hash": snapshot_hash(examples),
    }
    return StageData(record, examples)


def ranking_ids(session: Session) -> list[int]:
    """Ids of every ranking that is not a skip."""
    return list(session.scalars(select(Ranking.id).where(Ranking.skip_reason.is_(None)).order_by(Ranking.id)))


def weighted(examples: list[RankingExample], weight: float, seed: int) -> list[RankingExample]:
    """`weight` copies of each example: whole copies, then that fraction of them picked by `seed`."""
    copies, fraction = divmod(weight, 1)
    extra = random.Random(seed).sample(examples, round(fraction * len(examples)))
    return examples * int(copies) + extra


def rm_data(
    session: Session,
    ids: Sequence[int],
    edit_conversation_ids: Sequence[int] = (),
    feedback: Sequence[int] = (),
    feedback_weight: float = 1.0,
    seed: int = 0,
) -> StageData:
    """The rankings `ids` as RM examples (the formats layer builds them per task), then the edits of model
    suggestions in the demonstrations `edit_conversation_ids`, one pair each, then the users' feedback rows
    `feedback` as pairs (A/B choices, then thumbs), each counted `feedback_weight` times. The record counts
    the comparisons of each source (the report card shows them)."""
    rows = session.execute(select(Ranking.id, Ranking.task_id).where(Ranking.id.in_(list(ids)))).all()
    task_ids = sorted({t for _, t in rows})
    examples: list[RankingExample] = ranking_examples_from_store(session, task_ids=task_ids)
    edits = list(edit_records(session, edit_conversation_ids))
    ab = list(ab_records(session, feedback)) if feedback else []
    thumbs = list(thumbs_records(session, feedback)) if feedback else []
    from_users = weighted(ab + thumbs, feedback_weight, seed)
    record = {
        "kind": "rankings",
        "ranking_ids": sorted(ids),
        "task_ids": task_ids,
        "edit_conversation_ids": sorted(edit_conversation_ids),
        "edit_pairs": len(edits),
        "feedback_ids": sorted(feedback),
        "feedback_weight": feedback_weight,
        "comparisons": {"rankings": len(examples), "edits": len(edits), "ab": len(ab), "thumbs": len(thumbs)},
        "examples": len(examples) + len(edits) + len(from_users),
        "snapshot_hash": snapshot_hash(examples + edits + from_users),
    }
    return StageData(record, examples + edits + from_users)


def prompt_conversation_ids(session: Session) -> list[int]:
    """Conversations whose user turns are PPO prompts: demonstrations (not rejected) and chats."""
    query = select(Conversation.id).where(
        (Conversation.kind == "chat")
        | ((Conversation.kind == "demonstration") & (Conversation.status != "rejected"))
    )
    return list(session.scalars(query.order_by(Conversation.id)))


def ppo_data(session: Session, conversation_ids: Sequence[int]) -> StageData:
    """Every distinct conversation prefix that ends with a user turn: the prompts PPO samples replies to."""
    prompts = prompts_of_chats(_chats_of(session, conversation_ids))
    examples = [ChatExample(p) for p in prompts]
    record = {
        "kind": "prompts",
        "conversation_ids": sorted(conversation_ids),
        "examples": len(examples),
        "snapshot_hash": snapshot_hash(examples),
    }
    return StageData(record, prompts)


# --- the iteration's state ------------------------------------------------------------------------


def _iteration_dirs(work_dir: Path) -> dict[int, Path]:
    out = {}
    for path in work_dir.glob("iter-*"):
        suffix = path.name.removeprefix("iter-")
        if path.is_dir() and suffix.isdigit():
            out[int(suffix)] = path
    return out


def _read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def _open_iteration(session: Session, work_dir: Path) -> tuple[int, dict[str, Any]]:
    """The unfinished iteration to continue, or the number of a new one, and its state."""
    dirs = _iteration_dirs(work_dir)
    for number in sorted(dirs, reverse=True):
        state = _read_state(dirs[number])
        if state.get("status") != "done":
            return number, state or {"iteration": number, "status": "running", "stages": {}}
        break
    last_run = session.scalar(select(func.max(TrainingRun.iteration))) or 0
    number = max([last_run, *dirs]) + 1
    return number, {"iteration": number, "status": "running", "stages": {}}


@contextlib.contextmanager
def _exclusive(work_dir: Path) -> Iterator[None]:
    """One iteration at a time per work dir; the OS drops the lock when the process dies."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".iterate.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another iteration is running in {work_dir}") from None
        yield


def _latest_done(
    session: Session, stage: str, before: int | None = None
) -> tuple[TrainingRun, ModelVersion] | None:
    """The newest finished run of `stage` (before iteration `before`) and the version it produced."""
    query = select(TrainingRun, ModelVersion).join(ModelVersion, ModelVersion.run_id == TrainingRun.id)
    query = query.where(TrainingRun.stage == stage, TrainingRun.status == "done")
    if before is not None:
        query = query.where(TrainingRun.iteration < before)
    row = session.execute(query.order_by(TrainingRun.id.desc())).first()
    return (row[0], row[1]) if row is not None else None


def _runs_of(session: Session, iteration: int, stage: str) -> list[TrainingRun]:
    query = select(TrainingRun).where(TrainingRun.iteration == iteration, TrainingRun.stage == stage)
    return list(session.scalars(query.order_by(TrainingRun.id)))


def _version_of_run(session: Session, run_id: int) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.run_id == run_id)).first()


# --- one stage -------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """A stage to train: its config (out and model set), its data, and what its version descends from."""

    stage: str
    config: TrainConfig
    data: StageData
    parent_id: int
    loop: dict[str, Any]  # the loop's own facts about the run (init and reference versions)


def _train(plan: StagePlan, demonstrations: list[ChatExample] | None) -> Path:
    """Run the stage's trainer (`demonstrations`: PPO-ptx's); returns the run dir that holds the model."""
    if plan.stage == "sft":
        assert isinstance(plan.config, SFTConfig)
        return train_sft(plan.config, plan.data.examples)
    if plan.stage == "rm":
        assert isinstance(plan.config, RewardConfig)
        return train_reward_model(plan.config, plan.data.examples)
    assert isinstance(plan.config, PPOConfig)
    return train_ppo(plan.config, plan.data.examples, demonstrations=demonstrations)


def _config_from_record(cls: type[TrainConfig], record: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


def _run_stage(
    engine: Engine,
    iteration: int,
    plan: StagePlan,
    rebuild: Callable[[Session, dict[str, Any]], StageData],
    demonstrations: list[ChatExample] | None = None,
) -> StageResult:
    """Train one stage as a TrainingRun (resuming an interrupted attempt) and register its version."""
    run_dir = Path(plan.config.out or "")
    status: StageOutcome = "trained"
    with session_scope(engine) as session:
        attempts = _runs_of(session, iteration, plan.stage)
        for run in attempts:
            if run.status == "running":  # its process died without a word: it was interrupted
                fail_run(session, run, "interrupted (the process stopped during the run)")
        if not attempts:
            _clear_run_dir(run_dir)  # left by a run the store does not know (e.g. a store reset)
        else:
            last = attempts[-1]
            same = rebuild(session, last.data)
            if same.record["snapshot_hash"] == last.data.get("snapshot_hash"):
                # the same data: continue the interrupted attempt from its checkpoint, with its config
                plan.config = _config_from_record(type(plan.config), last.config)
                plan.data, plan.loop = same, dict(last.config.get("loop", {}))
                status = "resumed"
            else:
                log.warning("%s: the data changed since the interrupted run: starting over", plan.stage)
                _clear_run_dir(run_dir)
        plan.config.resume = status == "resumed" and run_dir.exists()
        run = start_run(
            session,
            plan.stage,
            {**plan.config.to_json(), "loop": plan.loop},
            plan.data.record,
            run_dir,
            iteration,
        )
        run_id = run.id
    started = time.perf_counter()
    try:
        if (run_dir / SUMMARY_FILE).exists():
            log.info("%s: %s already holds the finished model", plan.stage, run_dir)
        else:
            _train(plan, demonstrations)
    except BaseException as exc:
        with session_scope(engine) as session:
            fail_run(session, session.get_one(TrainingRun, run_id), f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - started
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    with session_scope(engine) as session:
        run = session.get_one(TrainingRun, run_id)
        # the run and its version commit together: a finished run always has its version
        finish_run(session, run, {**summary, "wall_seconds": round(seconds, 2)})
        version = register_model_version(
            session,
            name=f"{VERSION_PREFIX[plan.stage]}-{iteration}",
            kind="reward" if plan.stage == "rm" else "policy",
            path=run_dir,
            parent=plan.parent_id,
            run=run,
            metrics=summary,
        )
        version_id = version.id
    return StageResult(plan.stage, status, version_id, str(run_dir), run_id, seconds)


def _clear_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)


def _done_before(session: Session, iteration: int, stage: str) -> StageResult | None:
    """The result of a stage an earlier attempt at this iteration finished, if any."""
    for run in reversed(_runs_of(session, iteration, stage)):
        version = _version_of_run(session, run.id) if run.status == "done" else None
        if version is not None:
            return StageResult(
                stage, "done", version.id, version.path, run.id, 0.0, "finished in an earlier attempt"
            )
    return None


# --- the iteration ---------------------------------------------------------------------------------

NEW = ("trained", "resumed", "done")  # statuses of a stage that made a new model in this iteration


def _stage_config(template: TrainConfig, out: Path, model: str, seed: int, progress: bool) -> Any:
    fields: dict[str, Any] = dict(out=out, model=model, seed=seed, resume=False, progress=progress)
    if isinstance(template, RewardConfig):
        fields["sft"] = None  # `model` is where the RM starts
    return dataclasses.replace(template, **fields)


class _Iteration:
    """The state of one iteration while it runs: its number, dir, stage results, the state file (what a
    later attempt continues from) and the progress file (what watchers read)."""

    def __init__(self, engine: Engine, config: IterationConfig, work_dir: Path) -> None:
        self.engine, self.config = engine, config
        self.hook: StageHook = config.on_stage or (lambda stage, status: None)
        with session_scope(engine) as session:
            self.number, self.state = _open_iteration(session, work_dir)
            base = ensure_base_version(session, resolve_model(config.base_model))
            self.base_id, self.base_path = base.id, base.path
        self.dir = work_dir / f"iter-{self.number}"
        self.stages = {k: StageResult(**v) for k, v in self.state.get("stages", {}).items()}
        self.seed = config.seed * 1000 + self.number
        self.progress = IterationProgress(
            iteration=self.number,
            updated_at=time.time(),
            stages={k: _ended(v, started_at=None) for k, v in self.stages.items()},
        )

    def save(self, status: Literal["running", "done"] = "running") -> None:
        self.state.update(
            iteration=self.number,
            status=status,
            stages={k: dataclasses.asdict(v) for k, v in self.stages.items()},
        )
        write_atomic(self.dir / STATE_FILE, json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        self.progress.status = status
        self._write_progress()

    def _write_progress(self) -> None:
        self.progress.updated_at = time.time()
        self.progress.write(self.dir)

    def started(self, name: str) -> None:
        """Stage `name` starts: the progress file says so, then the hook."""
        self.progress.stages[name] = StageProgress(status="running", started_at=time.time())
        self._write_progress()
        self.hook(name, "start")

    def ended(self, result: StageResult, event: str) -> None:
        """A stage ended with `result`: record it, then the hook gets `event`."""
        before = self.progress.stages.get(result.stage)
        self._record(result, before.started_at if before is not None else time.time())
        self.hook(result.stage, event)

    def _record(self, result: StageResult, started_at: float | None) -> None:
        self.stages[result.stage] = result
        self.progress.stages[result.stage] = _ended(result, started_at)
        self.save()

    def stage(
        self,
        name: str,
        decide: Callable[[], StageResult | StagePlan],
        rebuild: Callable[[Session, dict[str, Any]], StageData],
        demonstrations: list[ChatExample] | None = None,
    ) -> StageResult:
        """The stage's result: recorded already, finished by an earlier attempt, or made now."""
        if name in self.stages:
            return self.stages[name]
        with session_scope(self.engine) as session:
            result = _done_before(session, self.number, name)
        if result is not None:
            self._record(result, started_at=None)
            return result
        decision = decide()
        if isinstance(decision, StagePlan):
            self.started(name)
            self.ended(_run_stage(self.engine, self.number, decision, rebuild, demonstrations), "done")
        else:
            self.ended(decision, decision.status)
        return self.stages[name]

    def config_for(self, template: TrainConfig, stage: str, model: str) -> Any:
        return _stage_config(template, self.dir / stage, model, self.seed, self.config.progress)


def _ended(result: StageResult, started_at: float | None) -> StageProgress:
    """The progress record of a stage that ended with `result`."""
    return StageProgress(
        status=result.status,
        started_at=started_at,
        ended_at=time.time() if started_at is not None else None,
        seconds=round(result.seconds, 2),
        note=result.note,
        version_id=result.version_id,
    )


def run_iteration(engine: Engine, config: IterationConfig | None = None) -> IterationResult:
    """Run (or continue) one iteration on the store behind `engine`; see the module docstring.

    Raises `NothingToTrain` when the store holds nothing new since the last iteration."""
    config = config or IterationConfig()
    work_dir = Path(config.work_dir or settings().home / "runs").resolve()
    with _exclusive(work_dir):
        it = _Iteration(engine, config, work_dir)
        it.dir.mkdir(parents=True, exist_ok=True)
        it.save()
        log.info("iteration %d in %s", it.number, it.dir)
        sft = it.stage(
            "sft", lambda: _decide_sft(it), lambda s, rec: sft_data(s, rec.get("conversation_ids", []))
        )
        rm = it.stage(
            "rm",
            lambda: _decide_rm(it, sft),
            lambda s, rec: rm_data(
                s,
                rec.get("ranking_ids", []),
                rec.get("edit_conversation_ids", []),
                rec.get("feedback_ids", []),
                rec.get("feedback_weight", 1.0),
                config.seed,
            ),
        )
        demonstrations = None  # PPO-ptx mixes the SFT loss on the demonstrations in
        if config.ppo.ptx_coef > 0:
            with session_scope(engine) as session:
                ids = demonstration_ids(session, config.demonstration_statuses)
                demonstrations = sft_data(session, ids).examples
        ppo = it.stage(
            "ppo",
            lambda: _decide_ppo(it, sft, rm),
            lambda s, rec: ppo_data(s, rec.get("conversation_ids", [])),
            demonstrations,
        )
        if not any(s.status in NEW for s in it.stages.values()):
            last = it.number - 1
            _clear_run_dir(it.dir)
            raise NothingToTrain(
                "nothing new to learn from: no new demonstrations or rankings"
                + (f" since iteration {last}" if last > 0 else " in the store")
            )
        policy = ppo if ppo.version_id is not None else sft
        assert sft.version_id is not None and policy.version_id is not None and policy.path is not None
        report = None
        if config.evaluate is not None and "eval" not in it.stages:
            report = _evaluate(it, config.evaluate, sft, rm, ppo)
        if config.deploy:
            with session_scope(engine) as session:
                set_served(session, policy.version_id)
        it.save("done")
        log.info("iteration %d done: policy version %d", it.number, policy.version_id)
        return IterationResult(
            iteration=it.number,
            work_dir=it.dir,
            stages=it.stages,
            base_version_id=it.base_id,
            sft_version_id=sft.version_id,
            rm_version_id=rm.version_id,
            policy_version_id=policy.version_id,
            report=report,
        )


def _decide_sft(it: _Iteration) -> StageResult | StagePlan:
    """SFT on every demonstration, from the base model, when some are new."""
    with session_scope(it.engine) as session:
        ids = demonstration_ids(session, it.config.demonstration_statuses)
        previous = _latest_done(session, "sft", before=it.number)
        if previous is not None and set(ids) <= set(previous[0].data.get("conversation_ids", [])):
            run, version = previous
            return StageResult(
                "sft", "reused", version.id, version.path, run.id, note="no new demonstrations"
            )
        if not ids:
            return StageResult(
                "sft", "skipped", it.base_id, it.base_path, note="no demonstrations: the base model"
            )
        data = sft_data(session, ids)
    config = it.config_for(it.config.sft, "sft", it.base_path)
    return StagePlan("sft", config, data, it.base_id, {"init_version_id": it.base_id})


def _decide_rm(it: _Iteration, sft: StageResult) -> StageResult | StagePlan:
    """The RM on all rankings (and edits), from the SFT model, when they or the SFT model are new."""
    assert sft.version_id is not None and sft.path is not None
    with session_scope(it.engine) as session:
        ids = ranking_ids(session)
        if not ids:
            return StageResult("rm", "skipped", note="no rankings yet")
        edits = demonstration_ids(session, it.config.demonstration_statuses) if it.config.rm_edits else []
        feedback = feedback_ids(session) if it.config.rm_feedback else []
        previous = _latest_done(session, "rm", before=it.number)
        if previous is not None:
            run, version = previous
            same_init = run.config.get("loop", {}).get("init_version_id") == sft.version_id
            new_rankings = not set(ids) <= set(run.data.get("ranking_ids", []))
            new_edits = not set(edits) <= set(run.data.get("edit_conversation_ids", []))
            new_feedback = not set(feedback) <= set(run.data.get("feedback_ids", []))
            if same_init and not new_rankings and not new_edits and not new_feedback:
                return StageResult(
                    "rm",
                    "reused",
                    version.id,
                    version.path,
                    run.id,
                    note="no new rankings, edits or feedback",
                )
        data = rm_data(session, ids, edits, feedback, it.config.rm_feedback_weight, it.config.seed)
    config = it.config_for(it.config.rm, "rm", sft.path)
    return StagePlan("rm", config, data, sft.version_id, {"init_version_id": sft.version_id})


def _decide_ppo(it: _Iteration, sft: StageResult, rm: StageResult) -> StageResult | StagePlan:
    """PPO against the RM from the newest policy trained from this SFT model (else from SFT itself), with
    the KL penalty to the SFT model."""
    assert sft.version_id is not None and sft.path is not None
    if rm.version_id is None or rm.path is None:
        return StageResult("ppo", "skipped", note="no reward model yet")
    if sft.status not in NEW and rm.status not in NEW:
        return StageResult("ppo", "skipped", note="no new data since the last PPO run")
    init_id, init_path = sft.version_id, sft.path
    with session_scope(it.engine) as session:
        previous = _latest_done(session, "ppo", before=it.number)
        if (
            previous is not None
            and previous[0].config.get("loop", {}).get("sft_version_id") == sft.version_id
        ):
            init_id, init_path = previous[1].id, previous[1].path
        data = ppo_data(session, prompt_conversation_ids(session))
    if not data.examples:
        return StageResult("ppo", "skipped", note="no prompts in the store")
    config = it.config_for(it.config.ppo, "ppo", init_path)
    config.reward_model = rm.path
    config.value_model = None  # the value model starts as this iteration's RM
    config.reference_model = sft.path  # every iteration's KL leash is to the SFT model, as InstructGPT's
    loop = {"init_version_id": init_id, "sft_version_id": sft.version_id, "rm_version_id": rm.version_id}
    return StagePlan("ppo", config, data, init_id, loop)


def _evaluate(
    it: _Iteration, eval_config: EvalConfig, sft: StageResult, rm: StageResult, ppo: StageResult
) -> dict[str, Any]:
    """The report card of this iteration's models (base and SFT, or SFT, the policy PPO continued and the new
    policy). The RM's accuracy is on held-out replies of the policy PPO started from: the served one, whose
    replies the newest rankings hold (the new policy's, which PPO optimised against this RM, stay on the card
    as `accuracy_final_model`)."""
    assert sft.path is not None
    it.started("eval")
    started = time.perf_counter()
    models = [ModelSpec("sft", Path(sft.path))]
    names = {"sft": sft.version_id}
    rm_policy = None
    if ppo.path is not None:
        rm_policy = "sft"
        with session_scope(it.engine) as session:
            init = session.get_one(ModelVersion, ppo.version_id).parent  # the policy PPO started from
            if init is not None and init.id != sft.version_id:
                rm_policy = init.name
                models.append(ModelSpec(init.name, Path(init.path), init.run.iteration if init.run else None))
        models.append(ModelSpec(f"policy-{it.number}", Path(ppo.path), it.number))
        names[f"policy-{it.number}"] = ppo.version_id
    else:
        models.insert(0, ModelSpec("base", Path(it.base_path)))
    report, samples = evaluate_models(
        models,
        sft="sft",
        reward_model=Path(rm.path) if rm.path is not None else None,
        config=dataclasses.replace(eval_config, progress=it.config.progress),
        ppo_runs=[(it.number, Path(ppo.path))] if ppo.status in NEW and ppo.path is not None else [],
        stage_seconds={k: round(v.seconds, 2) for k, v in it.stages.items()},
        rm_policy=rm_policy,
    )
    if rm.run_id is not None:
        with session_scope(it.engine) as session:
            rm_run = session.get_one(TrainingRun, rm.run_id)
            # how many comparisons the RM learned from, by source (rankings, edits, A/B choices, thumbs)
            report["rm_comparisons"] = rm_run.data.get("comparisons") or {
                "rankings": rm_run.data.get("examples", 0) - rm_run.data.get("edit_pairs", 0),
                "edits": rm_run.data.get("edit_pairs", 0),
            }
    write_report(report, it.dir / "report", samples)
    with session_scope(it.engine) as session:
        record_cards(session, report, names, rm.version_id)
    result = StageResult(
        "eval", "trained", path=str(it.dir / "report"), seconds=time.perf_counter() - started
    )
    it.ended(result, "done")
    return report


def record_cards(
    session: Session, report: dict[str, Any], versions: dict[str, int | None], rm_version_id: int | None
) -> None:
    """Store each model's report card in its version's metrics (key `eval`), the RM's accuracy in the RM's;
    a figure the card could not compute (NaN) is stored as null, which every JSON column accepts."""
    for card in report["models"]:
        version_id = versions.get(card["name"])
        if version_id is not None:
            version = session.get_one(ModelVersion, version_id)
            version.metrics = {**(version.metrics or {}), "eval": _nan_to_none(card)}
    if rm_version_id is not None and report.get("reward_model"):
        version = session.get_one(ModelVersion, rm_version_id)
        version.metrics = {**(version.metrics or {}), "eval": _nan_to_none(report["reward_model"])}


def _nan_to_none(value: Any) -> Any:
    """`value` with every NaN float, at any depth, replaced by None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value

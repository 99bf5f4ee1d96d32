"""Simulated trainers: trainer accounts that write demonstrations, chat and rank through `dialoop.collect`.

They follow the labeling guide: a demonstration is the best of N model suggestions by gold score,
repaired where a rule can; chats use prompts from the prompt generator; rankings follow the gold
score with noise (`dialoop.sim.ranking`). They touch the store only through `dialoop.collect`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from dialoop.collect import (
    PolicyHandle,
    add_turn,
    add_user_turn,
    create_demonstration,
    delete_demonstration,
    generate_chat_replies,
    next_task_for,
    skip_task,
    start_chat,
    submit_demonstration,
    submit_ranking,
    suggest_replies_many,
)
from dialoop.collect.tasks import CHAT_SOURCE, TaskView
from dialoop.engine import SamplingParams
from dialoop.sim.gold import gold_score, is_refusal
from dialoop.sim.prompts import Prompt, parse_prompt
from dialoop.sim.ranking import noisy_ranking
from dialoop.sim.repair import repair
from dialoop.store.accounts import create_user, get_user
from dialoop.store.models import Conversation, Ranking, User

log = logging.getLogger(__name__)


@dataclass
class SimTrainerConfig:
    """How simulated trainers behave; the defaults follow the labeling guide."""

    agreement: float = 0.75  # expected pairwise agreement of their rankings with the gold order
    suggestions: int = 4  # model suggestions asked for per demonstration
    suggestion_params: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_tokens=128, temperature=0.8)
    )
    chat_params: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_tokens=128, temperature=1.0)
    )
    min_demo_score: float = 1.0  # a repaired demonstration scoring less is abandoned (the draft deleted)
    skip_rate: float = 0.0  # chance of skipping a task instead of ranking it


class SimulatedTrainer:
    """One simulated trainer, a `User` with role trainer, with its own seeded randomness."""

    def __init__(self, user: User, *, seed: int = 0, config: SimTrainerConfig | None = None) -> None:
        self.user = user
        self.config = config or SimTrainerConfig()
        self.rng = random.Random(f"sim-trainer:{user.name}:{seed}")

    @classmethod
    def create(
        cls, session: Session, name: str, *, seed: int = 0, config: SimTrainerConfig | None = None
    ) -> SimulatedTrainer:
        """The trainer account `name` (created if missing, with a random password nobody knows)."""
        user = get_user(session, name)
        if user is None:
            user = create_user(session, name, "trainer", secrets.token_urlsafe(24))
        elif user.role != "trainer":
            raise ValueError(f"user {name!r} exists with role {user.role}, not trainer")
        return cls(user, seed=seed, config=config)

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(params, seed=self.rng.randrange(2**31))

    def write_demonstrations(
        self, session: Session, handle: PolicyHandle, prompts: Sequence[Prompt]
    ) -> list[Conversation]:
        """One submitted demonstration per prompt the trainer could answer well; suggestions in one batch."""
        drafts = []
        for prompt in prompts:
            draft = create_demonstration(session, self.user)
            add_turn(session, draft, self.user, "user", prompt.text)
            drafts.append(draft)
        batches = suggest_replies_many(
            session, handle, drafts, self.config.suggestions, self._seeded(self.config.suggestion_params)
        )
        submitted = []
        for prompt, draft, suggestions in zip(prompts, drafts, batches, strict=True):
            best = max(suggestions, key=lambda s: gold_score(prompt, s.text, finished=s.finished))
            text = repair(prompt, best.text, finished=best.finished)
            if text is None or gold_score(prompt, text) < self.config.min_demo_score:
                delete_demonstration(session, draft, self.user)
                continue
            add_turn(session, draft, self.user, "assistant", text, suggestion=best)
            submitted.append(submit_demonstration(session, draft, self.user))
        log.info("%s wrote %d of %d demonstrations", self.user.name, len(submitted), len(prompts))
        return submitted

    def chat(
        self, session: Session, handle: PolicyHandle, prompts: Sequence[Prompt], *, turns: int = 1
    ) -> list[Conversation]:
        """Chats of `turns` user turns each, taken from `prompts` in order, with the model's replies."""
        if turns < 1 or len(prompts) % turns:
            raise ValueError(f"{len(prompts)} prompts do not make chats of {turns} turn(s)")
        chats = [start_chat(session, self.user) for _ in range(len(prompts) // turns)]
        for t in range(turns):
            asked = [
                add_user_turn(session, c, self.user, prompts[i * turns + t].text) for i, c in enumerate(chats)
            ]
            generate_chat_replies(
                session, handle, asked, [self._seeded(self.config.chat_params) for _ in asked]
            )
        return chats

    def judge(self, view: TaskView) -> tuple[list[float], dict[int, list[str]]]:
        """Gold scores of the task's candidates (by index) and the flags the guide calls for."""
        prompt = parse_prompt(view.context[-1]["content"])
        candidates = sorted(view.candidates, key=lambda c: c.index)
        scores = [
            gold_score(prompt, c.message.content, finished=c.message.finished is not False)
            for c in candidates
        ]
        flags = {
            c.index: ["harmful"] for c in candidates if prompt.harmful and not is_refusal(c.message.content)
        }
        return scores, flags

    def rank_next(self, session: Session) -> Ranking | None:
        """Answer the next task offered (rank it, or skip it at `skip_rate`); None when none is left."""
        view = next_task_for(session, self.user, source=CHAT_SOURCE)
        if view is None:
            return None
        scores, flags = self.judge(view)
        if self.rng.random() < self.config.skip_rate:
            return skip_task(session, view.task, self.user, "unsure which reply is better", flags)
        ranking = noisy_ranking(scores, self.rng, self.config.agreement)
        return submit_ranking(
            session, view.task, self.user, ranking.order, ranking.ties, ranking.all_bad, flags
        )


def create_trainers(
    session: Session,
    count: int,
    *,
    seed: int = 0,
    prefix: str = "sim-trainer",
    config: SimTrainerConfig | None = None,
) -> list[SimulatedTrainer]:
    """`count` simulated trainers named `{prefix}-1`, `{prefix}-2`, ... (accounts reused when they exist)."""
    return [
        SimulatedTrainer.create(session, f"{prefix}-{i + 1}", seed=seed, config=config) for i in range(count)
    ]


def rank_all(
    session: Session, trainers: Sequence[SimulatedTrainer], *, limit: int | None = None
) -> list[Ranking]:
    """Trainers take turns answering tasks until none is offered any (or `limit` answers are given)."""
    answers: list[Ranking] = []
    active = list(trainers)
    for trainer in itertools.cycle(trainers):
        if not active or (limit is not None and len(answers) >= limit):
            break
        if trainer not in active:
            continue
        ranking = trainer.rank_next(session)
        if ranking is None:
            active.remove(trainer)
        else:
            answers.append(ranking)
    return answers

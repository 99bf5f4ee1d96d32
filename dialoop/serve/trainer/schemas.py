"""The trainer API's request bodies: demonstrations, turns, suggestions, rankings and skips."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from dialoop.serve.openai_schemas import SEED_LIMIT


class DemonstrationIn(BaseModel):
    title: str = Field("", max_length=300)
    system_prompt: str = ""


class SuggestionRef(BaseModel):
    generation_id: str = Field(max_length=64)
    index: int = Field(ge=0)


class TurnIn(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    suggestion: SuggestionRef | None = None  # the suggestion this turn starts from
    replace_last: bool = False  # replace the last (assistant) turn, e.g. by a suggestion


class TurnEdit(BaseModel):
    content: str


class SuggestIn(BaseModel):
    n: int = Field(default=4, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)


class RankingIn(BaseModel):
    order: list[int] = Field(max_length=64)  # candidate indices, best first
    ties: list[list[int]] = Field(default_factory=list, max_length=64)
    all_bad: bool = False
    flags: dict[int, list[str]] = Field(default_factory=dict)  # candidate index -> kinds (FLAG_KINDS)


class SkipIn(BaseModel):
    reason: str = Field(max_length=2000)
    flags: dict[int, list[str]] = Field(default_factory=dict)

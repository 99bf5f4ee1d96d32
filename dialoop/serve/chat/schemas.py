"""The chat API's request bodies."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ConversationIn(BaseModel):
    title: str | None = Field(None, max_length=300)
    system_prompt: str | None = None


class GenerationOptions(BaseModel):
    """How to sample the reply; the model is a version name (None: the served one)."""

    model: str | None = Field(None, max_length=200)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)


class MessageIn(GenerationOptions):
    parent_id: int | None = None  # the assistant message replied to (None: the first turn)
    content: str


class FeedbackIn(BaseModel):
    value: int = Field(ge=-1, le=1)  # 1 thumbs up, -1 thumbs down, 0 none


class PreferenceIn(BaseModel):
    other_id: int

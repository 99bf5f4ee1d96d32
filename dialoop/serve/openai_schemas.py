"""The wire types of the OpenAI-compatible API: Chat Completions and Completions requests, the served-model
switch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dialoop.engine.params import MAX_TOP_LOGPROBS

# the sampler seeds torch generators, which take at most 64 bits: OpenAI's seeds are non-negative int64s
SEED_LIMIT = 2**63


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling parameters both completion endpoints share (OpenAI's, and vLLM's extras top_k, min_p,
    repetition_penalty). Any other field in a request is refused with a 400 naming it (see
    `openai_api.refuse_unsupported`), never ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM: -1 or 0 means no top-k
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records: accepted, not used


class ChatCompletionRequest(SamplingFields):
    """Chat Completions: the parameters this server honours, plus the few it accepts in their no-op form
    (`response_format` text, `tools` empty, `tool_choice` none)."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    """Legacy Completions: prompt strings, `logprobs` as the number of alternatives per token."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None


class ServedRequest(BaseModel):
    model: str

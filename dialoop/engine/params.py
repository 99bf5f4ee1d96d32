"""Sampling parameters of one engine request, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; `n` replies to one prompt are `n` requests (each with its own seed).

    Order per step (vLLM's): repetition, frequency and presence penalties on the raw logits, then
    temperature, top-k, min-p and top-p, then one uniform draw from the request's own generator.
    Logprobs are the model's log-softmax of the raw logits (before penalties and temperature), as in
    OpenAI's API and vLLM.
    """

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or reply
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the reply
    presence_penalty: float = 0.0  # subtracted once when a token is already in the reply
    seed: int | None = None  # same seed + same prompt -> same reply, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()  # in addition to the engine's EOS ids
    stop: tuple[str, ...] = ()  # stop strings; need an engine built with a `decode` callback
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {list(self.stop_token_ids)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

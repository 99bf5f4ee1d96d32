"""Dialoop's generation engine: continuous batching over token ids. It is meant for chat, /v1, suggestions,
comparison sampling, evaluation and PPO rollouts; none of them uses it yet (they still call
`dialoop.modeling.generation.sample`), only its tests and `python -m dialoop.engine.bench`.

It knows only token ids (no tokenizer, no chat templates); text and stop strings come from a `decode`
callback given at construction. `n` replies to one prompt are `n` submitted requests.
"""

from dialoop.engine.engine import Engine, EngineConfig
from dialoop.engine.params import SamplingParams
from dialoop.engine.request import Completion, Event, FinishReason, RequestHandle, TokenLogprob
from dialoop.engine.scheduler import QueueFull

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "Event",
    "FinishReason",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
    "TokenLogprob",
]

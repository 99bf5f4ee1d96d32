"""Dialoop's generation engine: continuous batching over token ids, with shared prompt prefixes prefilled
once. PPO's rollouts (`dialoop.train.rollout`) run on it, and `dialoop.engine.chat.generate_replies` gives
chat replies from it; the collection, simulation and evaluation callers still use
`dialoop.modeling.generation.sample` until they move to this package's `SamplingParams`.

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

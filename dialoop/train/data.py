"""Splitting a stage's dataset. The caller loads the data (`dialoop.cli.data_sources`): training never reads
the store."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_heldout(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded (train, held-out) split; held-out gets round(fraction * n) examples (at least 1)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(examples))) if fraction > 0 and len(examples) > 1 else 0
    held = set(order[:n_held])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]

"""Datasets of a stage: from the store (the default, through `dialoop.formats`' dataset builders) or from a
file in any format of `dialoop import`. Training never queries the database itself."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dialoop.formats import (
    chat_examples_from_store,
    ranking_examples_from_store,
    read_chat_examples,
    read_ranking_examples,
)
from dialoop.records import ChatExample, RankingExample

T = TypeVar("T")


def _from_store(builder: Callable[..., list[T]]) -> list[T]:
    from dialoop.settings import settings
    from dialoop.store.db import session_scope
    from dialoop.store.migrate import open_store

    engine = open_store(settings().db_url)
    try:
        with session_scope(engine) as session:
            return builder(session)
    finally:
        engine.dispose()


def load_chat_examples(data: Path | None, format_name: str | None) -> list[ChatExample]:
    """Demonstrations: from `data` in `format_name` (default `messages`), or from the store (`data` None)."""
    if data is None:
        return _from_store(chat_examples_from_store)
    return read_chat_examples(data, format_name or "messages")


def load_ranking_examples(data: Path | None, format_name: str | None) -> list[RankingExample]:
    """Rankings: from `data` in `format_name` (default `rankings`), or from the store when `data` is None."""
    if data is None:
        return _from_store(ranking_examples_from_store)
    return read_ranking_examples(data, format_name or "rankings")


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

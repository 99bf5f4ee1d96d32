"""Datasets of a stage: from the store (the default, through `dialoop.formats`' store builders) or from a file
in any format of `dialoop import`. Training never reads the database itself."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from dialoop.formats.records import ChatExample, RankingExample

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _formats_function(name: str) -> Any:
    import dialoop.formats

    return getattr(dialoop.formats, name, None)


def _read_file(path: Path, format_name: str, want: str) -> list[Any]:
    """Records of `path` as ChatExample or RankingExample (`want` = "chat" or "ranking")."""
    reader = _formats_function("read_chat_examples" if want == "chat" else "read_ranking_examples")
    if reader is not None:
        return list(reader(path, format_name))
    # until dialoop.formats offers the readers: parse through its format registry
    from dialoop.formats import oasst
    from dialoop.formats.jsonl import parse_lines
    from dialoop.formats.registry import ChatFormat, RankingFormat, TreeFormat, get_format

    fmt = get_format(format_name)
    records = [r for _, r in parse_lines(path, fmt.parse)]
    if isinstance(fmt, TreeFormat):
        if want == "chat":
            return [ChatExample(c) for tree in records for c in oasst.tree_chats(tree)]
        return [r for tree in records for r in oasst.tree_rankings(tree)]
    if want == "chat" and isinstance(fmt, ChatFormat):
        return records
    if want == "ranking" and isinstance(fmt, RankingFormat):
        return records
    kind = (
        "conversations (e.g. messages, oasst)"
        if want == "chat"
        else "rankings (e.g. rankings, pairs, hh-rlhf)"
    )
    raise ValueError(f"format {format_name!r} does not hold {kind}")


def _from_store(name: str) -> list[Any]:
    builder = _formats_function(name)
    if builder is None:
        raise RuntimeError(
            f"reading training data from the store needs dialoop.formats.{name}; use --data FILE --format F"
        )
    from dialoop.settings import settings
    from dialoop.store.migrate import open_store

    engine = open_store(settings().db_url)
    try:
        return list(builder(engine))
    finally:
        engine.dispose()


def load_chat_examples(data: Path | None, format_name: str | None) -> list[ChatExample]:
    """Demonstrations: from `data` in `format_name`, or from the store when `data` is None."""
    if data is None:
        return _from_store("chat_examples_from_store")
    return _read_file(Path(data), format_name or "messages", "chat")


def load_ranking_examples(data: Path | None, format_name: str | None) -> list[RankingExample]:
    """Rankings: from `data` in `format_name`, or from the store when `data` is None."""
    if data is None:
        return _from_store("ranking_examples_from_store")
    return _read_file(Path(data), format_name or "rankings", "ranking")


def split_heldout(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded (train, held-out) split; held-out gets round(fraction * n) examples (at least 1)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(examples))) if fraction > 0 and len(examples) > 1 else 0
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [examples[i] for i in train], [examples[i] for i in held]

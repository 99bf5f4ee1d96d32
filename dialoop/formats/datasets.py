"""Training data: `ChatExample`s (SFT) and `RankingExample`s (reward model) from files or the store,
and `snapshot_hash` so that a training run records exactly which data it used."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dialoop.formats import oasst
from dialoop.formats.jsonl import content_hash
from dialoop.formats.messages import assistant_turn
from dialoop.formats.registry import ChatFormat, RankingFormat, get_format
from dialoop.formats.sources import detect_format, parse_source
from dialoop.formats.store_io import conversation_chats, ranking_records
from dialoop.records import ChatExample, RankingExample
from dialoop.store.models import Conversation


def read_chat_examples(path: str | Path, fmt: str | None = None) -> list[ChatExample]:
    """The conversations of a source (`dialoop.formats.sources`: JSONL, Parquet, a saved dataset, a hub id)
    in format `fmt` (None: told from its columns): `messages` rows; every root-to-leaf path of `oasst` trees
    that ends with an assistant reply; for preference formats, each prompt with its best reply (all-bad:
    none)."""
    format_ = get_format(fmt or detect_format(path))
    if isinstance(format_, ChatFormat):
        return [example for _, example in parse_source(path, format_.parse)]
    if isinstance(format_, RankingFormat):
        return [
            ChatExample(messages=e.prompt + assistant_turn(e.completions[e.ranking[0]]))
            for _, e in parse_source(path, format_.parse)
            if e.ranking and not e.all_bad
        ]
    return [
        ChatExample(messages=chat)
        for _, tree in parse_source(path, format_.parse)
        for chat in oasst.tree_chats(tree)
    ]


def read_ranking_examples(path: str | Path, fmt: str | None = None) -> list[RankingExample]:
    """The ranked comparisons of a source in format `fmt` (None: told from its columns): one per row of a
    preference format, one per prompter message with two or more ranked assistant replies in `oasst`
    trees."""
    format_ = get_format(fmt or detect_format(path))
    if isinstance(format_, ChatFormat):
        raise ValueError(f"{format_.name} files hold conversations, not rankings")
    if isinstance(format_, RankingFormat):
        return [example for _, example in parse_source(path, format_.parse)]
    return [example for _, tree in parse_source(path, format_.parse) for example in oasst.tree_rankings(tree)]


def chat_examples_from_store(
    session: Session, *, kinds: Sequence[str] = ("demonstration",), status: str | Sequence[str] | None = None
) -> list[ChatExample]:
    """Every root-to-leaf path ending with an assistant reply of the conversations of `kinds` (and
    `status`, when given), oldest conversation first; alternatives sampled for comparisons are left out."""
    query = select(Conversation).where(Conversation.kind.in_(list(kinds)))
    if status is not None:
        query = query.where(Conversation.status.in_([status] if isinstance(status, str) else list(status)))
    return [
        ChatExample(messages=chat)
        for chat in conversation_chats(session, query)
        if chat[-1]["role"] == "assistant"
    ]


def ranking_examples_from_store(
    session: Session, *, task_ids: Sequence[int] | None = None
) -> list[RankingExample]:
    """One example per ranking (a task ranked by three trainers gives three), in task order; skipped
    rankings are left out, all-bad ones kept with `all_bad=True`."""
    return list(ranking_records(session, "all", task_ids))


def snapshot_hash(examples: Sequence[ChatExample | RankingExample]) -> str:
    """SHA-256 of the examples' content and order: equal data, equal hash."""
    return content_hash([[type(e).__name__, asdict(e)] for e in examples])

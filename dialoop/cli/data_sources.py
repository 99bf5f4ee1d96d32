"""A training stage's data: from a file in any `dialoop import` format, or from the store (the default).

The stages take lists of records (`dialoop.records`) and never read the database; the commands load them here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session

from dialoop.formats import (
    chat_examples_from_store,
    get_format,
    ranking_examples_from_store,
    read_chat_examples,
    read_ranking_examples,
)
from dialoop.formats.registry import RankingFormat
from dialoop.formats.sources import detect_format
from dialoop.records import ChatExample, ChatMessage, RankingExample
from dialoop.settings import settings
from dialoop.store.db import session_scope
from dialoop.store.migrate import open_store
from dialoop.store.models import CONVERSATION_KINDS
from dialoop.train.ppo import prompts_of_chats
from dialoop.train.ppo_config import PPOConfig

T = TypeVar("T")


def _from_store(builder: Callable[[Session], T]) -> T:
    engine = open_store(settings().db_url)
    try:
        with session_scope(engine) as session:
            return builder(session)
    finally:
        engine.dispose()


def load_chat_examples(data: Path | None, format_name: str | None) -> list[ChatExample]:
    """Demonstrations: from the source `data` (a file, a saved dataset, a hub id) in `format_name` (None:
    told from its columns), or from the store when `data` is None."""
    if data is None:
        return _from_store(chat_examples_from_store)
    return read_chat_examples(data, format_name)


def load_ranking_examples(data: Path | None, format_name: str | None) -> list[RankingExample]:
    """Rankings: from the source `data` in `format_name` (None: told from its columns), or from the store
    when `data` is None."""
    if data is None:
        return _from_store(ranking_examples_from_store)
    return read_ranking_examples(data, format_name)


def read_prompt_lines(path: Path) -> list[list[ChatMessage]]:
    """One single-turn prompt per non-empty line of a plain-text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts: list[list[ChatMessage]] = [[{"role": "user", "content": line}] for line in lines if line]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def _store_chats(session: Session) -> list[list[ChatMessage]]:
    """Conversations of every kind (demonstrations, chats, imported) and comparison contexts of the store."""
    chats = [e.messages for e in chat_examples_from_store(session, kinds=CONVERSATION_KINDS)]
    return chats + [e.prompt for e in ranking_examples_from_store(session)]


def load_prompts(config: PPOConfig) -> list[list[ChatMessage]]:
    """PPO's prompts: `--prompts` lines, user turns of `--data` (any import format), or the store's."""
    if config.prompts is not None:
        return read_prompt_lines(config.prompts)
    if config.data is not None:
        format_name = config.format or detect_format(config.data)
        if isinstance(get_format(format_name), RankingFormat):
            chats = [e.prompt for e in read_ranking_examples(config.data, format_name)]
        else:
            chats = [e.messages for e in read_chat_examples(config.data, format_name)]
        where = str(config.data)
    else:
        chats, where = _from_store(_store_chats), "the store"
    prompts = prompts_of_chats(chats)
    if not prompts:
        raise ValueError(f"no user turns to use as prompts in {where}")
    return prompts


def load_demonstrations(config: PPOConfig) -> list[ChatExample] | None:
    """PPO-ptx's demonstrations (`--ptx-data`, else the store's); None when PPO-ptx is off."""
    if config.ptx_coef <= 0:
        return None
    return load_chat_examples(config.ptx_data, config.ptx_format if config.ptx_data else None)

"""The formats by name: how each parses one JSON line into a record and dumps a record into lines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dialoop.formats import hh_rlhf, messages, oasst, pairs, rankings
from dialoop.formats.oasst import OasstTree
from dialoop.records import ChatExample, RankingExample


@dataclass(frozen=True)
class ChatFormat:
    """A format of conversations: one `ChatExample` per line."""

    name: str
    parse: Callable[[Any], ChatExample]
    dump: Callable[[ChatExample], list[dict[str, Any]]]


@dataclass(frozen=True)
class RankingFormat:
    """A format of preferences: one ranked comparison per line (`dump` may expand one into several)."""

    name: str
    parse: Callable[[Any], RankingExample]
    dump: Callable[[RankingExample], list[dict[str, Any]]]


@dataclass(frozen=True)
class TreeFormat:
    """A format of message trees with ranked sibling replies."""

    name: str
    parse: Callable[[Any], OasstTree]
    dump: Callable[[OasstTree], list[dict[str, Any]]]


Format = ChatFormat | RankingFormat | TreeFormat

FORMATS: dict[str, Format] = {
    "messages": ChatFormat("messages", messages.parse, messages.dump),
    "pairs": RankingFormat("pairs", pairs.parse, pairs.dump),
    "rankings": RankingFormat("rankings", rankings.parse, rankings.dump),
    "hh-rlhf": RankingFormat("hh-rlhf", hh_rlhf.parse, hh_rlhf.dump),
    "oasst": TreeFormat("oasst", oasst.parse, oasst.dump),
}


def get_format(name: str) -> Format:
    """The format called `name`; ValueError naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}") from None

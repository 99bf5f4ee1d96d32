"""Formats without a store: parsing, checks with FILE:LINE errors, HH-RLHF splitting, datasets from files."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dialoop.formats import (
    FormatError,
    hh_rlhf,
    read_chat_examples,
    read_ranking_examples,
    snapshot_hash,
)
from dialoop.formats.jsonl import NotRepresentable, dumps, parse_lines, write_lines
from dialoop.formats.oasst import ranks_from_rankings
from dialoop.formats.pairs import ordered_pairs
from dialoop.formats.registry import get_format
from dialoop.records import RankingExample

DATA = Path(__file__).parent / "data"
FIXTURES = {
    "messages": "messages.jsonl",
    "pairs": "pairs.jsonl",
    "rankings": "rankings.jsonl",
    "hh-rlhf": "hh_rlhf.jsonl",
    "oasst": "oasst.jsonl",
}
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("fmt", "line", "reason"),
    [
        ("messages", "[1, 2]", "expected a JSON object"),
        ("messages", '{"messages": []}', "non-empty list"),
        ("messages", '{"messages": [{"role": "tool", "content": "x"}]}', r"messages\[0\].role"),
        ("messages", '{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ("pairs", '{"prompt": [], "chosen": [], "rejected": []}', "prompt must be a non-empty"),
        ("pairs", json.dumps({"prompt": [A], "chosen": [A], "rejected": [A]}), "end with a user message"),
        ("pairs", json.dumps({"prompt": [U], "chosen": [A, A], "rejected": [A]}), "exactly one assistant"),
        ("pairs", json.dumps({"prompt": [U], "chosen": [U], "rejected": [A]}), "must be 'assistant'"),
        (
            "pairs",
            json.dumps({"prompt": 3, "chosen": [A], "rejected": [A]}),  # a string is TRL's plain text
            "prompt must be a non-empty list",
        ),
        ("pairs", json.dumps({"prompt": [U], "chosen": [A]}), "missing key 'rejected'"),
        ("rankings", json.dumps({"prompt": [U], "completions": [[A]], "ranking": [0]}), "at least 2"),
        (
            "rankings",
            json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [0, 2]}),
            "index from 0 to 1",
        ),
        ("rankings", json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [1, 1]}), "twice"),
        (
            "rankings",
            json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [0]}),
            "at least 2 completions",
        ),
        ("rankings", json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [0, True]}), "index"),
        (
            "rankings",
            json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [0, 1], "ties": [[1, 1]]}),
            "two different",
        ),
        (
            "rankings",
            json.dumps({"prompt": [U], "completions": [[A], [A]], "ranking": [0, 1], "truncated": [2]}),
            "truncated entry must be a completion index",
        ),
        ("hh-rlhf", json.dumps({"chosen": "Human: hi", "rejected": "x"}), "must start with"),
        (
            "hh-rlhf",
            json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 5}),
            "rejected must be a string",
        ),
        (
            "hh-rlhf",
            json.dumps(
                {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"}
            ),
            "first Human turn",
        ),
        (
            "hh-rlhf",
            json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a"}),
            "rejected must continue",
        ),
        (
            "oasst",
            json.dumps({"prompt": {"message_id": "x", "text": "t", "role": "assistant"}}),
            "'prompter'",
        ),
        ("oasst", json.dumps({"prompt": {"message_id": "x", "text": "t", "role": "bot"}}), "prompt.role"),
        (
            "oasst",
            json.dumps(
                {"prompt": {"message_id": "x", "text": "t", "role": "prompter", "replies": [{"text": "r"}]}}
            ),
            r"prompt.replies\[0\].message_id",
        ),
        (
            "oasst",
            json.dumps({"prompt": {"message_id": "x", "text": "t", "role": "prompter", "rank": "1"}}),
            "rank",
        ),
    ],
)
def test_a_bad_line_is_named_with_its_reason(tmp_path: Path, fmt: str, line: str, reason: str) -> None:
    good = (DATA / FIXTURES[fmt]).read_text(encoding="utf-8").splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # the blank line 2 still counts
    with pytest.raises(FormatError, match=reason) as info:
        parse_lines(path, get_format(fmt).parse)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.line == 3


def test_invalid_json_and_bad_bytes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "a"}]}\n{"messages": \n')
    with pytest.raises(FormatError, match=r"x.jsonl:2: invalid JSON"):
        read_chat_examples(path, "messages")
    path.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(FormatError, match=r"x.jsonl:1: not UTF-8"):
        read_chat_examples(path, "messages")
    with pytest.raises(FormatError, match="cannot read"):
        read_chat_examples(tmp_path / "missing.jsonl", "messages")


def test_gzip_is_read_by_its_magic_and_corruption_is_an_error(tmp_path: Path) -> None:
    plain = (DATA / "messages.jsonl").read_bytes()
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(plain))
    assert read_chat_examples(gz, "messages") == read_chat_examples(DATA / "messages.jsonl", "messages")
    gz.write_bytes(gzip.compress(plain)[:-20])
    with pytest.raises(FormatError, match="corrupt gzip"):
        read_chat_examples(gz, "messages")


def test_write_lines_is_deterministic_and_atomic(tmp_path: Path) -> None:
    rows = [{"b": "é", "a": [1, 2]}, {"x": None}]
    write_lines(tmp_path / "one.jsonl.gz", rows)
    write_lines(tmp_path / "two.jsonl.gz", rows)
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()
    assert gzip.decompress((tmp_path / "one.jsonl.gz").read_bytes()).decode() == "".join(
        dumps(r) + "\n" for r in rows
    )

    def failing() -> Iterator[dict[str, int]]:
        yield {"ok": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_lines(tmp_path / "one.jsonl.gz", failing())
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl.gz", "two.jsonl.gz"]


def test_hh_rlhf_context_is_the_common_turns_and_replies_are_verbatim() -> None:
    lines = [json.loads(x) for x in (DATA / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()]
    plain, empty_reply, differ_early = (hh_rlhf.parse(x) for x in lines)
    assert plain.prompt == [{"role": "user", "content": "How do I bake bread?"}]
    assert plain.completions == ["Mix flour, water, yeast and salt, then bake.", "Buy it."]
    assert plain.ranking == [0, 1] and plain.ties == []
    assert [m["role"] for m in empty_reply.prompt] == ["user", "assistant", "user"]
    assert empty_reply.completions == ["Why did the chicken cross the road?", ""]
    # the texts differ at the 4th turn, and chosen holds two Assistant turns: its reply keeps both
    assert [m["content"] for m in differ_early.prompt] == ["Can you help?", "Maybe.", "Please"]
    assert differ_early.completions == ["Okay.\n\nAssistant: Here you go.", "No."]
    for line, example in zip(lines, (plain, empty_reply, differ_early), strict=True):
        assert hh_rlhf.dump(example) == [line]  # byte for byte


def test_hh_rlhf_cannot_express_system_messages() -> None:
    system = {"role": "system", "content": "Be brief."}
    with pytest.raises(NotRepresentable):
        hh_rlhf.dump(RankingExample(prompt=[system, U], completions=["a", "b"], ranking=[0, 1]))
    assert hh_rlhf.dump(RankingExample(prompt=[U], completions=["a", "b"], ranking=[1, 0])) == [
        {"chosen": "\n\nHuman: q\n\nAssistant: b", "rejected": "\n\nHuman: q\n\nAssistant: a"}
    ]


def test_ordered_pairs_expand_a_ranking_and_leave_out_ties() -> None:
    example = RankingExample(prompt=[U], completions=list("abcd"), ranking=[2, 0, 1, 3], ties=[(0, 2)])
    assert ordered_pairs(example) == [(2, 1), (2, 3), (0, 1), (0, 3), (1, 3)]
    all_bad = RankingExample([U], list("abc"), [1, 0, 2], ties=[(0, 2)], all_bad=True)
    assert ordered_pairs(all_bad) == []
    assert ordered_pairs(all_bad, all_bad_orders=True) == [(1, 0), (1, 2)]
    assert ordered_pairs(RankingExample([U], list("ab"), [], all_bad=True), all_bad_orders=True) == []


def test_oasst_ranks_from_rankings_share_ranks_on_ties_and_average() -> None:
    one = RankingExample([U], list("abc"), ranking=[1, 0, 2], ties=[(0, 1)])
    assert ranks_from_rankings([one], 3) == [0, 0, 2]
    other = RankingExample([U], list("abc"), ranking=[0, 2, 1])
    # mean ranks a: (0+0)/2, b: (0+2)/2, c: (2+1)/2
    assert ranks_from_rankings([one, other], 3) == [0, 1, 2]
    partial = RankingExample([U], list("abc"), ranking=[2, 0])
    assert ranks_from_rankings([partial], 3) == [1, None, 0]


def test_read_ranking_examples_from_every_format_that_has_them() -> None:
    rankings = read_ranking_examples(DATA / "rankings.jsonl", "rankings")
    assert [(r.ranking, r.ties, r.all_bad, r.truncated) for r in rankings] == [
        ([2, 0, 1, 3], [(2, 0)], False, []),
        ([1, 0, 2], [], False, [2]),
        ([], [], True, []),
    ]
    pairs = read_ranking_examples(DATA / "pairs.jsonl", "pairs")
    assert len(pairs) == 8 and pairs[0].completions == ["0", "1, I think"] and pairs[0].ranking == [0, 1]
    assert len(read_ranking_examples(DATA / "hh_rlhf.jsonl", "hh-rlhf")) == 3
    trees = read_ranking_examples(DATA / "oasst.jsonl", "oasst")
    assert [[t.completions[i] for i in t.ranking] for t in trees] == [
        ["Mittens, because cats have paws.", "Whiskers.", "I don't know."],
        ["Quasar.", "Bob."],
    ]
    assert trees[1].prompt[-1] == {"role": "user", "content": "Something less common?"}
    with pytest.raises(ValueError, match="conversations, not rankings"):
        read_ranking_examples(DATA / "messages.jsonl", "messages")


def test_read_chat_examples_from_every_format() -> None:
    chats = read_chat_examples(DATA / "messages.jsonl", "messages")
    assert len(chats) == 5 and chats[1].messages[0] == {"role": "system", "content": "You are terse."}
    trees = read_chat_examples(DATA / "oasst.jsonl", "oasst")
    # every root-to-leaf path ending with an assistant reply (the prompter leaf "Why?" is not one)
    assert [c.messages[-1]["content"] for c in trees] == [
        "Quasar.",
        "Bob.",
        "Mittens, because cats have paws.",
        "I don't know.",
        "No tengo reloj.",
        "Son las tres.",
    ]
    best = read_chat_examples(DATA / "rankings.jsonl", "rankings")  # the all-bad ranking gives none
    assert [c.messages[-1]["content"] for c in best] == ["CATS PURR WHEN HAPPY.", "I can't help with that."]
    assert len(read_chat_examples(DATA / "hh_rlhf.jsonl", "hh-rlhf")) == 3


def test_snapshot_hash_depends_on_content_and_order(tmp_path: Path) -> None:
    examples = read_ranking_examples(DATA / "rankings.jsonl", "rankings")
    copy = tmp_path / "copy.jsonl"
    shutil.copy(DATA / "rankings.jsonl", copy)
    assert snapshot_hash(examples) == snapshot_hash(read_ranking_examples(copy, "rankings"))
    assert snapshot_hash(examples) != snapshot_hash(examples[::-1])
    assert snapshot_hash(examples) != snapshot_hash(examples[:2])
    assert len(snapshot_hash([])) == 64

"""Formats and the store, on SQLite and PostgreSQL: mapping, round trips, dedupe, all-or-nothing, datasets."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from dialoop.collect import Suggestion, add_turn, create_demonstration
from dialoop.formats import (
    FORMATS,
    ExportResult,
    FormatError,
    ImportResult,
    chat_examples_from_store,
    export_file,
    import_file,
    ranking_examples_from_store,
)
from dialoop.formats.store_io import edit_records
from dialoop.store import (
    Candidate,
    ComparisonTask,
    Conversation,
    Feedback,
    Message,
    Ranking,
    User,
    make_engine,
    session_scope,
)
from dialoop.store.stats import store_stats
from dialoop.store.trees import add_message, children

DATA = Path(__file__).parent / "data"
FIXTURES = {
    "messages": "messages.jsonl",
    "pairs": "pairs.jsonl",
    "rankings": "rankings.jsonl",
    "hh-rlhf": "hh_rlhf.jsonl",
    "oasst": "oasst.jsonl",
}


@pytest.fixture
def fresh_engine(second_db_url: str) -> Iterator[Engine]:
    """A second empty store of the same kind as `engine`'s, to import an export into."""
    engine = make_engine(second_db_url)
    yield engine
    engine.dispose()


def _import(engine: Engine, path: Path, fmt: str, **kw: str) -> ImportResult:
    with session_scope(engine) as s:
        return import_file(s, path, fmt, **kw)


def _export(engine: Engine, path: Path, fmt: str, source: str = "all") -> ExportResult:
    with session_scope(engine) as s:
        return export_file(s, path, fmt, source=source)


def _counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as s:
        return store_stats(s)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.slow
def test_export_import_export_is_byte_identical(
    engine: Engine, fresh_engine: Engine, tmp_path: Path, fmt: str
) -> None:
    source = DATA / FIXTURES[fmt]
    _import(engine, source, fmt)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    _export(engine, first, fmt)
    _import(fresh_engine, first, fmt)
    _export(fresh_engine, second, fmt)
    assert first.read_bytes() == second.read_bytes()
    if fmt == "oasst":  # every field of the source comes back (the keys in Dialoop's order)
        assert [json.loads(x) for x in first.read_text().splitlines()] == [
            json.loads(x) for x in source.read_text().splitlines()
        ]
    else:  # the fixtures are written in Dialoop's serialisation: import -> export gives them back
        assert first.read_bytes() == source.read_bytes()


def test_gz_export_is_deterministic_and_imports(engine: Engine, fresh_engine: Engine, tmp_path: Path) -> None:
    _import(engine, DATA / "rankings.jsonl", "rankings")
    _export(engine, tmp_path / "a.jsonl.gz", "rankings")
    _export(engine, tmp_path / "b.jsonl.gz", "rankings")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()) == (DATA / "rankings.jsonl").read_bytes()
    result = _import(fresh_engine, tmp_path / "a.jsonl.gz", "rankings")
    assert (result.imported, result.comparison_tasks) == (3, 3)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_importing_a_file_again_adds_nothing(engine: Engine, fmt: str) -> None:
    first = _import(engine, DATA / FIXTURES[fmt], fmt)
    counts = _counts(engine)
    again = _import(engine, DATA / FIXTURES[fmt], fmt)
    assert again.imported == 0 and again.duplicates == first.records == first.imported
    assert _counts(engine) == counts


def test_a_files_repeated_line_arrives_once_per_repeat(engine: Engine, tmp_path: Path) -> None:
    result = _import(engine, DATA / "messages.jsonl", "messages")  # its 5th line repeats the 1st
    assert (result.records, result.imported, result.conversations) == (5, 5, 5)
    line = (DATA / "messages.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "three.jsonl").write_text(f"{line}\n{line}\n{line}\n", encoding="utf-8")
    third = _import(engine, tmp_path / "three.jsonl", "messages")
    assert (third.imported, third.duplicates) == (1, 2)  # the store held it twice: only the third is new


def test_a_malformed_line_aborts_the_whole_import(engine: Engine, tmp_path: Path) -> None:
    _import(engine, DATA / "rankings.jsonl", "rankings")
    before = _counts(engine)
    lines = (DATA / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    lines[6] = '{"prompt": [{"role": "user", "content": "x"}], "chosen": []}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"bad.jsonl:7: missing key 'rejected'"):
        _import(engine, bad, "pairs")
    assert _counts(engine) == before


def test_preferences_become_tasks_with_sibling_candidates_and_one_ranking(engine: Engine) -> None:
    result = _import(engine, DATA / "rankings.jsonl", "rankings", source_name="my-rankings")
    assert (result.conversations, result.comparison_tasks, result.rankings, result.messages) == (3, 3, 3, 12)
    with session_scope(engine) as s:
        tasks = s.scalars(select(ComparisonTask).order_by(ComparisonTask.id)).all()
        first = tasks[0]
        assert (first.status, first.overlap, first.source) == ("done", 1, "my-rankings")
        assert first.context_message.role == "user" and first.context_message.conversation.kind == "imported"
        assert first.context_message.conversation.source == "my-rankings"
        assert [c.index for c in first.candidates] == [0, 1, 2, 3]
        assert [c.message.content for c in first.candidates][2] == "CATS PURR WHEN HAPPY."
        assert {c.message.id for c in first.candidates} == {m.id for m in children(s, first.context_message)}
        assert all(c.message.role == "assistant" and not c.is_original for c in first.candidates)
        (ranking,) = first.rankings
        assert (ranking.order, ranking.ties, ranking.all_bad, ranking.trainer_id) == (
            [2, 0, 1, 3],
            [[2, 0]],
            False,
            None,
        )
        assert tasks[2].rankings[0].all_bad and tasks[2].rankings[0].order == []
    # an imported preference is no conversation for SFT: its candidates are alternatives
    with session_scope(engine) as s:
        assert chat_examples_from_store(s, kinds=("imported",)) == []


def test_oasst_trees_keep_their_shape_and_ranks_become_rankings(engine: Engine) -> None:
    result = _import(engine, DATA / "oasst.jsonl", "oasst")
    assert (result.conversations, result.messages, result.comparison_tasks) == (2, 11, 2)
    with session_scope(engine) as s:
        tasks = s.scalars(select(ComparisonTask).order_by(ComparisonTask.id)).all()
        best_first = [[t.candidates[i].message.content for i in t.rankings[0].order] for t in tasks]
        assert best_first == [
            ["Mittens, because cats have paws.", "Whiskers.", "I don't know."],
            ["Quasar.", "Bob."],
        ]
        assert all(c.is_original for t in tasks for c in t.candidates)
        spanish = s.scalars(select(Message).where(Message.content == "Son las tres.")).one()
        assert spanish.extra["oasst"]["lang"] == "es" and spanish.extra["oasst"]["rank"] == 0
        chats = chat_examples_from_store(s, kinds=("imported",))
        assert len(chats) == 6  # every root-to-leaf path that ends with an assistant reply


def test_messages_import_as_demonstrations_when_told(engine: Engine) -> None:
    _import(engine, DATA / "messages.jsonl", "messages", kind="demonstration")
    with session_scope(engine) as s:
        kinds = set(s.scalars(select(Conversation.kind)))
        assert kinds == {"demonstration"}
        examples = chat_examples_from_store(s)
        assert len(examples) == 5 and examples[1].messages[0]["role"] == "system"
        assert len(chat_examples_from_store(s, status="accepted")) == 5
        assert chat_examples_from_store(s, status=("draft", "submitted")) == []
    with session_scope(engine) as s, pytest.raises(ValueError, match="always of kind 'imported'"):
        import_file(s, DATA / "pairs.jsonl", "pairs", kind="demonstration")


# --------------------------------------------------------------------- data made in Dialoop


def _native_store(engine: Engine) -> dict[str, int]:
    """Trainers' demonstration and chat with a K=4 comparison ranked three times (ties, all-bad, skipped),
    a user's chat with thumbs and an A/B choice."""
    with session_scope(engine) as s:
        alice, bob, carol = (
            User(name=n, role=r, password_hash="x")
            for n, r in [("alice", "trainer"), ("bob", "admin"), ("carol", "user")]
        )
        s.add_all([alice, bob, carol])
        demo = Conversation(kind="demonstration", owner=alice, status="submitted", system_prompt="Be brief.")
        s.add(demo)
        u = add_message(s, demo, None, "user", "Describe the ocean in 5 words.")
        add_message(s, demo, u, "assistant", "Vast, salty, deep, blue, alive.", author_user_id=alice.id)

        chat = Conversation(kind="chat", owner=bob)
        s.add(chat)
        u1 = add_message(s, chat, None, "user", "What is 2 plus 2?")
        original = add_message(s, chat, u1, "assistant", "4")
        u2 = add_message(s, chat, original, "user", "Thanks!")
        add_message(s, chat, u2, "assistant", "You're welcome.")
        alternatives = [add_message(s, chat, u1, "assistant", t) for t in ("5", "Four.", "I can't.")]
        task = ComparisonTask(context_message=u1, overlap=3, status="done")
        task.candidates = [Candidate(index=0, message=original, is_original=True)] + [
            Candidate(index=i + 1, message=m) for i, m in enumerate(alternatives)
        ]
        task.rankings = [
            Ranking(trainer_id=alice.id, order=[0, 2, 1, 3], ties=[[0, 2]]),
            Ranking(trainer_id=bob.id, order=[], all_bad=True),
            Ranking(trainer_id=carol.id, skip_reason="unsure"),
        ]
        s.add(task)

        user_chat = Conversation(kind="chat", owner=carol)
        s.add(user_chat)
        q = add_message(s, user_chat, None, "user", "Tell me a joke.")
        r1, r2, r3 = (add_message(s, user_chat, q, "assistant", t) for t in ("Knock knock.", "No.", "A pun."))
        s.add_all(
            [
                Feedback(message_id=r3.id, other_message_id=r1.id, user_id=carol.id, kind="ab", value=1),
                Feedback(message_id=r1.id, user_id=carol.id, kind="thumbs", value=1),
                Feedback(message_id=r3.id, user_id=carol.id, kind="thumbs", value=1),
                Feedback(message_id=r2.id, user_id=carol.id, kind="thumbs", value=-1),
                Feedback(message_id=r2.id, user_id=alice.id, kind="thumbs", value=-1),
            ]
        )
        s.flush()
        return {"task": task.id}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_trainer_rankings_export_as_pairs_and_rankings(engine: Engine, tmp_path: Path) -> None:
    _native_store(engine)
    assert _export(engine, tmp_path / "p.jsonl", "pairs", "trainers").lines == 5  # 6 pairs of K=4, one tie
    pairs = _lines(tmp_path / "p.jsonl")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("4", "5"),  # "4" and "Four." are tied: no pair between them
        ("4", "I can't."),
        ("Four.", "5"),
        ("Four.", "I can't."),
        ("5", "I can't."),
    ]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2 plus 2?"}]
    _export(engine, tmp_path / "r.jsonl", "rankings", "trainers")
    rankings = _lines(tmp_path / "r.jsonl")  # the skipped ranking is left out, the all-bad one kept
    assert [(r["ranking"], r["ties"], r.get("all_bad", False)) for r in rankings] == [
        ([0, 2, 1, 3], [[0, 2]], False),
        ([], [], True),
    ]
    assert _export(engine, tmp_path / "i.jsonl", "pairs", "imported").lines == 0


def test_feedback_exports_as_preference_pairs(engine: Engine, tmp_path: Path) -> None:
    _native_store(engine)
    assert _export(engine, tmp_path / "f.jsonl", "pairs", "feedback").lines == 3
    pairs = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in _lines(tmp_path / "f.jsonl")]
    # the A/B choice first, then every thumbed-up reply over every thumbed-down sibling
    assert pairs == [("A pun.", "Knock knock."), ("Knock knock.", "No."), ("A pun.", "No.")]
    assert _lines(tmp_path / "f.jsonl")[0]["prompt"] == [{"role": "user", "content": "Tell me a joke."}]
    assert _export(engine, tmp_path / "all.jsonl", "pairs").lines == 5 + 3
    with pytest.raises(ValueError, match="holds preferences"):
        _export(engine, tmp_path / "m.jsonl", "messages", "feedback")


def test_messages_export_leaves_out_sampled_alternatives(engine: Engine, tmp_path: Path) -> None:
    _native_store(engine)
    _export(engine, tmp_path / "t.jsonl", "messages", "trainers")
    chats = [[m["content"] for m in line["messages"]] for line in _lines(tmp_path / "t.jsonl")]
    assert chats == [
        ["Be brief.", "Describe the ocean in 5 words.", "Vast, salty, deep, blue, alive."],
        ["What is 2 plus 2?", "4", "Thanks!", "You're welcome."],
    ]
    assert _export(engine, tmp_path / "a.jsonl", "messages").lines == 2 + 3  # carol's chat has 3 branches


def test_datasets_from_the_store(engine: Engine) -> None:
    ids = _native_store(engine)
    with session_scope(engine) as s:
        demos = chat_examples_from_store(s)
        assert [d.messages[-1]["content"] for d in demos] == ["Vast, salty, deep, blue, alive."]
        assert chat_examples_from_store(s, status="accepted") == []
        examples = ranking_examples_from_store(s)  # three rankings of one task, one skipped
        assert [(e.ranking, e.ties, e.all_bad) for e in examples] == [
            ([0, 2, 1, 3], [(0, 2)], False),
            ([], [], True),
        ]
        assert examples[0].completions == ["4", "5", "Four.", "I can't."]
        assert examples[0].prompt == [{"role": "user", "content": "What is 2 plus 2?"}]
        assert len(ranking_examples_from_store(s, task_ids=[ids["task"]])) == 2
        assert ranking_examples_from_store(s, task_ids=[ids["task"] + 1]) == []


def test_oasst_export_derives_ranks_from_rankings(engine: Engine, tmp_path: Path) -> None:
    _native_store(engine)
    with session_scope(engine) as s:  # a system message has no place in an OASST tree
        alice = s.scalars(select(User).where(User.name == "alice")).one()
        odd = Conversation(kind="chat", owner=alice)
        s.add(odd)
        add_message(s, odd, add_message(s, odd, None, "system", "You are a pirate."), "user", "Ahoy")
    result = _export(engine, tmp_path / "o.jsonl", "oasst", "trainers")
    assert (result.lines, result.skipped) == (2, 1)
    demo, chat = _lines(tmp_path / "o.jsonl")
    assert demo["system_prompt"] == "Be brief."  # Dialoop's extension of the OASST tree
    replies = chat["prompt"]["replies"]
    # alice's order [0, 2, 1, 3] with 0 and 2 tied, bob's all-bad one places nothing
    assert [(r["text"], r["rank"]) for r in replies] == [("4", 0), ("5", 2), ("Four.", 0), ("I can't.", 3)]
    assert chat["prompt"]["role"] == "prompter" and replies[0]["replies"][0]["role"] == "prompter"
    assert chat["prompt"]["message_id"] == chat["message_tree_id"] == replies[0]["parent_id"]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.slow
def test_native_data_round_trips_byte_identical(
    engine: Engine, fresh_engine: Engine, tmp_path: Path, fmt: str
) -> None:
    _native_store(engine)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert _export(engine, first, fmt).lines > 0
    _import(fresh_engine, first, fmt)
    _export(fresh_engine, second, fmt)
    assert first.read_bytes() == second.read_bytes()


def test_edits_of_model_suggestions_become_preference_pairs(engine: Engine) -> None:
    """An edited suggestion gives (edit > suggestion as written); one taken as it was, or a turn written
    from scratch, gives nothing."""
    suggestion = {"model_version_id": 1, "sampling": {}}
    with session_scope(engine) as s:
        ann = User(name="ann", role="trainer", password_hash="x")
        s.add(ann)
        s.flush()
        demo = create_demonstration(s, ann, system_prompt="Be brief.")
        add_turn(s, demo, ann, "user", "Name a colour in capitals.")
        cut = Suggestion("Blue is a colour that", finished=False, **suggestion)
        add_turn(s, demo, ann, "assistant", "BLUE.", suggestion=cut)
        add_turn(s, demo, ann, "user", "Another one?")
        kept = Suggestion("RED.", finished=True, **suggestion)
        add_turn(s, demo, ann, "assistant", "RED.", suggestion=kept)
        add_turn(s, demo, ann, "user", "And one more?")
        add_turn(s, demo, ann, "assistant", "Green, with no suggestion.", suggestion=None)
        add_turn(s, demo, ann, "user", "Thanks?")
        add_turn(
            s, demo, ann, "assistant", "You are welcome.", suggestion=Suggestion("Sure!", True, **suggestion)
        )
        scratch = create_demonstration(s, ann)
        add_turn(s, scratch, ann, "user", "Hi")
        add_turn(s, scratch, ann, "assistant", "Hello.")
        ids = [demo.id, scratch.id]
    with session_scope(engine) as s:
        pairs = list(edit_records(s, ids))
        assert [(p.completions, p.ranking, p.truncated) for p in pairs] == [
            (["BLUE.", "Blue is a colour that"], [0, 1], [1]),
            (["You are welcome.", "Sure!"], [0, 1], []),
        ]
        assert pairs[0].prompt == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour in capitals."},
        ]
        assert [m["content"] for m in pairs[1].prompt][-2:] == ["Green, with no suggestion.", "Thanks?"]
        assert list(edit_records(s, [scratch.id])) == []

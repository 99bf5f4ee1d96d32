"""`import_file` and `export_file`: every format to and from the store.

Mapping: a `messages` line is a Conversation holding one path of Messages. A preference line (`pairs`,
`rankings`, `hh-rlhf`) is a Conversation holding the context path, its K candidates as sibling assistant
Messages under the context's last message, a done ComparisonTask (overlap 1) and one Ranking without a
trainer. An `oasst` tree is a Conversation tree; two or more ranked assistant replies to one prompter
message become a ComparisonTask whose Ranking follows their ranks.

An import is all-or-nothing: the whole file is parsed and checked before the store is touched, and
everything is added in the caller's transaction. Each record carries a content hash (the n-th repeat of
a record within one file hashes differently), so importing a file again adds nothing. Export is
deterministic (store order, one JSON serialisation), so export -> import -> export gives the same bytes.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session, selectinload

from dialoop.formats import oasst
from dialoop.formats.jsonl import content_hash, write_lines
from dialoop.formats.oasst import OasstNode, OasstTree
from dialoop.formats.registry import ChatFormat, RankingFormat, get_format
from dialoop.formats.sources import parse_source
from dialoop.records import ChatExample, ChatMessage, RankingExample
from dialoop.store.feedback import ab_choices, net_thumbs
from dialoop.store.models import (
    CONVERSATION_KINDS,
    TRAINER_ROLES,
    Candidate,
    ComparisonTask,
    Conversation,
    Message,
    Ranking,
    User,
)
from dialoop.store.trees import as_chat, leaf_paths, path_to_root

log = logging.getLogger(__name__)

R = TypeVar("R")
Record = ChatExample | RankingExample | OasstTree

SOURCES = ("all", "imported", "trainers", "feedback")
CHUNK = 500  # ids per IN (...) query, records per bulk INSERT
# OASST ids for messages that did not come from OASST: stable within a store, kept by a re-import
MESSAGE_ID_NAMESPACE = uuid.UUID("6c0f3f5e-4a59-4f4e-9a86-5b1f0d7f3a21")


@dataclass
class ImportResult:
    path: str
    format: str
    records: int = 0  # records read from the file
    imported: int = 0  # records added to the store
    duplicates: int = 0  # records the store already held (same content hash)
    conversations: int = 0
    messages: int = 0
    comparison_tasks: int = 0
    rankings: int = 0


@dataclass
class ExportResult:
    path: str
    format: str
    source: str
    records: int = 0  # conversations, trees or rankings read from the store
    lines: int = 0
    skipped: int = 0  # records the format cannot express (the reasons are logged)


def _chunks(items: Sequence[R], size: int = CHUNK) -> Iterator[Sequence[R]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------------ import


def read_records(path: str | Path, fmt: str) -> list[Record]:
    """Every record of a source (JSONL, Parquet, a saved dataset: `dialoop.formats.sources`), parsed and
    checked; `FormatError` (FILE:LINE: reason) on the first bad line."""
    parse: Callable[[Any], Record] = get_format(fmt).parse
    return [record for _, record in parse_source(path, parse)]


def _canonical(record: Record) -> Any:
    if isinstance(record, ChatExample):
        return {"chat": record.messages}
    if isinstance(record, RankingExample):
        return {"ranking": asdict(record)}
    return {"oasst": oasst.dump(record)[0]}


def record_hashes(records: Sequence[Record]) -> list[str]:
    """One content hash per record; the n-th repeat of a record in one file gets its own hash, so that
    importing a file again adds nothing while a file's repeated lines all arrive once."""
    seen: Counter[str] = Counter()
    hashes = []
    for record in records:
        base = content_hash(_canonical(record))
        hashes.append(base if seen[base] == 0 else content_hash([base, seen[base]]))
        seen[base] += 1
    return hashes


def _title(chat: list[ChatMessage]) -> str:
    text = " ".join(next((m["content"] for m in chat if m["role"] == "user"), "").split())
    return text if len(text) <= 80 else text[:79] + "…"


@dataclass
class _PlannedTask:
    context: int  # index into the plan's messages
    candidates: list[int]
    ranking: RankingExample  # only its ranking, ties and all_bad are used
    original: bool
    content_hash: str | None


@dataclass
class _Plan:
    """The rows one record becomes: a conversation, its messages (parents before children, each
    parent given by index), and comparison tasks over them."""

    conversation: dict[str, Any]
    messages: list[tuple[int | None, str, str, dict[str, Any]]]  # (parent, role, content, extra)
    tasks: list[_PlannedTask]
    unfinished: frozenset[int] = frozenset()  # messages (by index) cut off before their end-of-turn token


def _plan(record: Record, content_hash: str, source: str, kind: str) -> _Plan:
    def conversation(chat: list[ChatMessage], kind: str, system_prompt: str = "") -> dict[str, Any]:
        return {
            "kind": kind,
            "source": source,
            "content_hash": content_hash,
            "title": _title(chat),
            "system_prompt": system_prompt,
            # imported demonstrations were reviewed where they came from
            "status": "accepted" if kind == "demonstration" else "active",
        }

    if isinstance(record, ChatExample):
        chain: list[tuple[int | None, str, str, dict[str, Any]]] = [
            (i - 1 if i else None, m["role"], m["content"], {}) for i, m in enumerate(record.messages)
        ]
        return _Plan(conversation(record.messages, kind), chain, [])
    if isinstance(record, RankingExample):
        n = len(record.prompt)
        messages: list[tuple[int | None, str, str, dict[str, Any]]] = [
            (i - 1 if i else None, m["role"], m["content"], {}) for i, m in enumerate(record.prompt)
        ]
        messages += [(n - 1, "assistant", c, {}) for c in record.completions]
        # imported candidates are alternatives to compare, not turns of a conversation
        task = _PlannedTask(n - 1, list(range(n, len(messages))), record, False, content_hash)
        unfinished = frozenset(n + k for k in record.truncated)
        return _Plan(conversation(record.prompt, "imported"), messages, [task], unfinished)
    tree = record
    messages = []
    index_of: dict[int, int] = {}  # id(node) -> index of its message
    ranked_nodes: list[tuple[OasstNode, tuple[list[OasstNode], list[int], list[tuple[int, int]]]]] = []
    in_tasks: set[int] = set()  # id(node) of replies whose rank becomes a ranking
    stack: list[tuple[int | None, OasstNode]] = [(None, tree.root)]
    while stack:  # depth first, older replies first
        parent, node = stack.pop()
        fields: dict[str, Any] = {"message_id": node.message_id, **node.extra}
        if node.rank is not None and id(node) not in in_tasks:
            fields["rank"] = node.rank
        extra: dict[str, Any] = {"oasst": fields}
        if parent is None:
            extra["oasst_tree"] = {
                "message_tree_id": tree.tree_id,
                "tree_state": tree.tree_state,
                **tree.extra,
            }
        index_of[id(node)] = len(messages)
        messages.append((parent, node.role, node.text, extra))
        ranked = oasst.ranked_replies(node)
        if ranked is not None:
            in_tasks.update(id(r) for r in ranked[0])
            ranked_nodes.append((node, ranked))
        stack.extend((index_of[id(node)], r) for r in reversed(node.replies))
    # OASST replies are turns of the tree: each candidate is an original message
    tasks = [
        _PlannedTask(
            context=index_of[id(node)],
            candidates=[index_of[id(r)] for r in replies],
            ranking=RankingExample(prompt=[], completions=[], ranking=order, ties=ties),
            original=True,
            content_hash=None,
        )
        for node, (replies, order, ties) in ranked_nodes
    ]
    title_chat: list[ChatMessage] = [{"role": "user", "content": tree.root.text}]
    return _Plan(conversation(title_chat, kind, tree.system_prompt), messages, tasks)


def _write_plans(session: Session, plans: list[_Plan], result: ImportResult) -> None:
    """INSERT the plans' rows in bulk, level by level so that parents exist first. RETURNING with
    `sort_by_parameter_order` gives ids in row order: siblings' ids follow their order in the file."""

    def insert_ids(model: Any, rows: list[dict[str, Any]]) -> list[int]:
        if not rows:
            return []
        statement = insert(model).returning(model.id, sort_by_parameter_order=True)
        return list(session.scalars(statement, rows))

    conversation_ids = insert_ids(Conversation, [p.conversation for p in plans])
    message_ids: list[list[int]] = [[0] * len(p.messages) for p in plans]
    depth: list[list[int]] = []
    for plan in plans:
        levels: list[int] = []
        for parent, *_ in plan.messages:
            levels.append(0 if parent is None else levels[parent] + 1)
        depth.append(levels)
    for level in range(max((max(d, default=-1) for d in depth), default=-1) + 1):
        where = [
            (p, i) for p, plan in enumerate(plans) for i in range(len(plan.messages)) if depth[p][i] == level
        ]
        rows: list[dict[str, Any]] = []
        for p, i in where:
            parent, role, content, extra = plans[p].messages[i]
            rows.append(
                {
                    "conversation_id": conversation_ids[p],
                    "parent_id": None if parent is None else message_ids[p][parent],
                    "role": role,
                    "content": content,
                    "extra": extra,
                    "finished": False if i in plans[p].unfinished else None,
                }
            )
        for (p, i), new_id in zip(where, insert_ids(Message, rows), strict=True):
            message_ids[p][i] = new_id
    tasks = [(p, t) for p, plan in enumerate(plans) for t in plan.tasks]
    task_rows = [
        {
            "context_message_id": message_ids[p][t.context],
            "overlap": 1,
            "status": "done",
            "source": plans[p].conversation["source"],
            "content_hash": t.content_hash,
        }
        for p, t in tasks
    ]
    task_ids = insert_ids(ComparisonTask, task_rows)
    candidates: list[dict[str, Any]] = [
        {"task_id": task_id, "index": k, "message_id": message_ids[p][m], "is_original": t.original}
        for task_id, (p, t) in zip(task_ids, tasks, strict=True)
        for k, m in enumerate(t.candidates)
    ]
    rankings: list[dict[str, Any]] = [
        {
            "task_id": task_id,
            "order": list(t.ranking.ranking),
            "ties": [list(tie) for tie in t.ranking.ties],
            "all_bad": t.ranking.all_bad,
        }
        for task_id, (_, t) in zip(task_ids, tasks, strict=True)
    ]
    for model, rows in ((Candidate, candidates), (Ranking, rankings)):
        if rows:
            session.execute(insert(model), rows)
    result.conversations += len(plans)
    result.messages += sum(len(p.messages) for p in plans)
    result.comparison_tasks += len(tasks)
    result.rankings += len(rankings)


def import_file(
    session: Session,
    path: str | Path,
    fmt: str,
    *,
    source_name: str | None = None,
    kind: str = "imported",
) -> ImportResult:
    """Import a file of format `fmt` in the session's transaction; records already in the store are
    skipped. `source_name` (default: the format) labels the conversations and tasks; `kind` is the kind
    of the conversations of `messages` and `oasst` files. Raises `FormatError` before adding anything."""
    format_ = get_format(fmt)
    source = source_name if source_name is not None else format_.name
    if not source or len(source) > 32:
        raise ValueError("a source name is 1-32 characters")
    if kind not in CONVERSATION_KINDS:
        raise ValueError(f"invalid conversation kind {kind!r}: choose one of {', '.join(CONVERSATION_KINDS)}")
    if kind != "imported" and isinstance(format_, RankingFormat):
        raise ValueError(f"{format_.name} holds comparisons: its conversations are always of kind 'imported'")
    records = read_records(path, fmt)
    hashes = record_hashes(records)
    result = ImportResult(path=str(path), format=format_.name, records=len(records))
    existing: set[str] = set()
    for chunk in _chunks(hashes):
        query = select(Conversation.content_hash).where(Conversation.content_hash.in_(chunk))
        existing.update(h for h in session.scalars(query) if h is not None)
    new = [(r, h) for r, h in zip(records, hashes, strict=True) if h not in existing]
    result.duplicates = len(records) - len(new)
    result.imported = len(new)
    for chunk_of_new in _chunks(new):
        _write_plans(session, [_plan(r, h, source, kind) for r, h in chunk_of_new], result)
    log.info(
        "imported %d of %d %s records from %s (%d already in the store)",
        result.imported,
        result.records,
        result.format,
        path,
        result.duplicates,
    )
    return result


# ------------------------------------------------------------------------------------------ export


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")


def _conversation_chunks(session: Session, query: Select[Conversation]) -> Iterator[list[Conversation]]:
    """The conversations of `query` by id with their messages, a chunk at a time (bounded memory)."""
    ids = list(session.scalars(query.with_only_columns(Conversation.id).order_by(Conversation.id)))
    for chunk in _chunks(ids):
        yield list(
            session.scalars(
                select(Conversation)
                .where(Conversation.id.in_(chunk))
                .options(selectinload(Conversation.messages))
                .order_by(Conversation.id)
            )
        )


def _in_conversations(conversations: list[Conversation]) -> Select[int]:
    """The ids of every message of `conversations`, as a subquery."""
    return select(Message.id).where(Message.conversation_id.in_([c.id for c in conversations]))


def _conversation_query(source: str) -> Select[Conversation]:
    query = select(Conversation)
    if source == "imported":
        return query.where(Conversation.source != "")
    if source == "trainers":
        owner = select(User.id).where(User.role.in_(TRAINER_ROLES))
        return query.where(Conversation.source == "", Conversation.owner_id.in_(owner))
    if source == "feedback":
        raise ValueError("source 'feedback' holds preferences: export it as pairs, rankings or hh-rlhf")
    return query


def conversation_chats(session: Session, query: Select[Conversation]) -> Iterator[list[ChatMessage]]:
    """Every root-to-leaf path of the conversations of `query` as a chat (system prompt first), except
    paths through alternatives sampled for a comparison (non-original candidates): those are not turns
    of the conversation, so an imported preference record yields no chat."""
    for conversations in _conversation_chunks(session, query):
        alternatives = set(
            session.scalars(
                select(Candidate.message_id).where(
                    Candidate.message_id.in_(_in_conversations(conversations)),
                    Candidate.is_original.is_(False),
                )
            )
        )
        for conversation in conversations:
            for path in leaf_paths(session, conversation):
                if not any(m.id in alternatives for m in path):
                    yield as_chat(path, conversation.system_prompt)


def _candidate_ranks(session: Session, conversations: list[Conversation]) -> dict[int, int]:
    """OASST rank of every candidate message of the conversations' tasks, from their rankings."""
    tasks = session.scalars(
        select(ComparisonTask)
        .where(ComparisonTask.context_message_id.in_(_in_conversations(conversations)))
        .options(selectinload(ComparisonTask.candidates), selectinload(ComparisonTask.rankings))
        .order_by(ComparisonTask.id)
    )
    ranks: dict[int, int] = {}
    for task in tasks:
        parts = [_ranking_record_parts(task, r) for r in task.rankings if r.skip_reason is None]
        candidate_ranks = oasst.ranks_from_rankings([p for p in parts if p is not None], len(task.candidates))
        for candidate, rank in zip(task.candidates, candidate_ranks, strict=True):
            if rank is not None:
                ranks.setdefault(candidate.message_id, rank)  # the oldest task that ranks a message wins
    return ranks


def tree_records(session: Session, source: str = "all") -> Iterator[OasstTree]:
    """The conversations of `source` as OASST trees, one per root message."""
    for conversations in _conversation_chunks(session, _conversation_query(source)):
        ranks = _candidate_ranks(session, conversations)
        for conversation in conversations:
            yield from _conversation_trees(conversation, ranks)


def _message_id(message: Message) -> str:
    stored = message.extra.get("oasst", {}).get("message_id")
    return (
        stored
        if isinstance(stored, str) and stored
        else str(uuid.uuid5(MESSAGE_ID_NAMESPACE, str(message.id)))
    )


def _conversation_trees(conversation: Conversation, ranks: dict[int, int]) -> list[OasstTree]:
    """One OASST tree per root message of the conversation; `ranks` holds the candidates' ranks."""
    messages = sorted(conversation.messages, key=lambda m: m.id)
    children: dict[int | None, list[Message]] = {}
    for m in messages:
        children.setdefault(m.parent_id, []).append(m)

    def node(message: Message) -> OasstNode:
        fields = dict(message.extra.get("oasst", {}))
        fields.pop("message_id", None)
        stored_rank = fields.pop("rank", None)
        return OasstNode(
            message_id=_message_id(message),
            role=message.role,
            text=message.content,
            rank=ranks.get(message.id, stored_rank),
            extra=fields,
            replies=[node(c) for c in children.get(message.id, [])],
        )

    trees = []
    for root in children.get(None, []):
        tree_fields = dict(root.extra.get("oasst_tree", {}))
        tree_root = node(root)
        trees.append(
            OasstTree(
                root=tree_root,
                tree_id=tree_fields.pop("message_tree_id", tree_root.message_id),
                tree_state=tree_fields.pop("tree_state", oasst.DEFAULT_TREE_STATE),
                system_prompt=conversation.system_prompt,
                extra=tree_fields,
            )
        )
    return trees


def _ranking_record_parts(task: ComparisonTask, ranking: Ranking) -> RankingExample | None:
    """The order, ties and all-bad of a ranking as candidate positions (prompt and texts left empty)."""
    position = {c.index: p for p, c in enumerate(task.candidates)}
    try:
        order = [position[i] for i in ranking.order]
        ties = [(position[a], position[b]) for a, b in ranking.ties]
    except (KeyError, TypeError, ValueError):
        log.warning("ranking %d names candidates that task %d does not have: left out", ranking.id, task.id)
        return None
    return RankingExample(prompt=[], completions=[], ranking=order, ties=ties, all_bad=ranking.all_bad)


def _ranking_query(source: str, task_ids: Sequence[int] | None = None) -> Select[int]:
    query = select(Ranking.id).where(Ranking.skip_reason.is_(None))
    if task_ids is not None:
        query = query.where(Ranking.task_id.in_(list(task_ids)))
    if source == "imported":
        imported = (
            select(ComparisonTask.id)
            .join(Message, ComparisonTask.context_message_id == Message.id)
            .join(Conversation, Message.conversation_id == Conversation.id)
            .where(Conversation.source != "")
        )
        query = query.where(Ranking.task_id.in_(imported))
    elif source == "trainers":
        query = query.where(Ranking.trainer_id.is_not(None))
    return query.order_by(Ranking.task_id, Ranking.id)


def ranking_records(
    session: Session, source: str = "all", task_ids: Sequence[int] | None = None
) -> Iterator[RankingExample]:
    """The rankings of `source` (skipped ones left out) in task order, each as a `RankingExample`."""
    if source == "feedback":
        return
    ranking_ids = list(session.scalars(_ranking_query(source, task_ids)))
    for chunk in _chunks(ranking_ids):
        rankings = session.scalars(
            select(Ranking).where(Ranking.id.in_(chunk)).order_by(Ranking.task_id, Ranking.id)
        ).all()
        tasks = {
            t.id: t
            for t in session.scalars(
                select(ComparisonTask)
                .where(ComparisonTask.id.in_({r.task_id for r in rankings}))
                .options(selectinload(ComparisonTask.candidates).selectinload(Candidate.message))
            )
        }
        # every message of the contexts' conversations, so that walking to the root needs no query
        context_ids = {t.context_message_id for t in tasks.values()}
        conversation_ids = set(
            session.scalars(select(Message.conversation_id).where(Message.id.in_(context_ids)))
        )
        conversations = {
            c.id: c
            for c in session.scalars(
                select(Conversation)
                .where(Conversation.id.in_(conversation_ids))
                .options(selectinload(Conversation.messages))
            )
        }
        for ranking in rankings:
            task = tasks[ranking.task_id]
            parts = _ranking_record_parts(task, ranking)
            if parts is None:
                continue
            context = session.get(Message, task.context_message_id)
            assert context is not None
            prompt = as_chat(
                path_to_root(session, context), conversations[context.conversation_id].system_prompt
            )
            yield RankingExample(
                prompt=prompt,
                completions=[c.message.content for c in task.candidates],
                ranking=parts.ranking,
                ties=parts.ties,
                all_bad=parts.all_bad,
                truncated=[k for k, c in enumerate(task.candidates) if c.message.finished is False],
            )


def edit_records(session: Session, conversation_ids: Sequence[int]) -> Iterator[RankingExample]:
    """Trainers' edits of model suggestions as preference pairs, in message order: each assistant turn of
    the demonstrations `conversation_ids` that started from a suggestion and was changed, over the
    suggestion as the model wrote it (marked cut off when it was). A suggestion taken as it was says nothing
    about what is better, and a turn written from scratch has nothing to compare with: both are left out."""
    for chunk in _chunks(sorted(conversation_ids)):
        conversations = session.scalars(
            select(Conversation)
            .where(Conversation.id.in_(chunk), Conversation.kind == "demonstration")
            .options(selectinload(Conversation.messages))
            .order_by(Conversation.id)
        )
        for conversation in conversations:
            for message in sorted(conversation.messages, key=lambda m: m.id):
                suggestion = (message.extra or {}).get("suggestion")
                if message.role != "assistant" or not suggestion or message.parent is None:
                    continue
                if str(suggestion.get("text", "")).strip() == message.content.strip():
                    continue
                yield RankingExample(
                    prompt=as_chat(path_to_root(session, message.parent), conversation.system_prompt),
                    completions=[message.content, str(suggestion["text"])],
                    ranking=[0, 1],
                    truncated=[] if suggestion.get("finished", True) else [1],
                )


def _sibling_pair(session: Session, better: Message, worse: Message) -> RankingExample | None:
    if better.parent_id is None or better.parent_id != worse.parent_id or better.id == worse.id:
        return None
    parent = better.parent
    assert parent is not None
    prompt = as_chat(path_to_root(session, parent), better.conversation.system_prompt)
    return RankingExample(prompt=prompt, completions=[better.content, worse.content], ranking=[0, 1])


def ab_records(session: Session, ids: Sequence[int] | None = None) -> Iterator[RankingExample]:
    """Each A/B choice (of the feedback `ids`, when given) as a pair, preferred > the other sibling, oldest
    first; a choice that does not compare two sibling replies is left out."""
    for feedback in ab_choices(session, ids):
        other = session.get(Message, feedback.other_message_id) if feedback.other_message_id else None
        chosen = session.get(Message, feedback.message_id)
        pair = _sibling_pair(session, chosen, other) if chosen and other else None
        if pair is None:
            log.warning("A/B feedback %d does not compare two sibling replies: left out", feedback.id)
            continue
        yield pair


def thumbs_records(session: Session, ids: Sequence[int] | None = None) -> Iterator[RankingExample]:
    """Thumbs (of the feedback `ids`, when given) as pairs: per parent message, every reply with a net
    thumb up over every sibling with a net thumb down. A thumbed reply without a rated sibling says nothing
    about what is better: it gives no pair."""
    votes = net_thumbs(session, ids)
    if not votes:
        return
    rated = session.scalars(
        select(Message)
        .where(Message.id.in_(list(votes)), Message.parent_id.is_not(None))
        .order_by(Message.id)
    ).all()
    by_parent: dict[int, list[Message]] = {}
    for message in rated:
        assert message.parent_id is not None
        by_parent.setdefault(message.parent_id, []).append(message)
    for parent_id in sorted(by_parent):
        replies = by_parent[parent_id]
        for up in (m for m in replies if votes[m.id] > 0):
            for down in (m for m in replies if votes[m.id] < 0):
                pair = _sibling_pair(session, up, down)
                if pair is not None:
                    yield pair


def feedback_records(session: Session) -> Iterator[RankingExample]:
    """Users' feedback as preference pairs: every A/B choice, then the thumbs (`ab_records`,
    `thumbs_records`)."""
    yield from ab_records(session)
    yield from thumbs_records(session)


def _dump_all(
    records: Iterable[R],
    dump: Callable[[R], list[dict[str, Any]]],
    parse: Callable[[Any], Any],
    result: ExportResult,
) -> Iterator[dict[str, Any]]:
    """The lines of every record; a record the format cannot express, or whose lines would not import
    again, is skipped and logged."""
    for record in records:
        result.records += 1
        try:
            lines = dump(record)
            for line in lines:
                parse(line)  # what cannot be imported again is not written
        except ValueError as exc:
            result.skipped += 1
            log.warning("%s export: record %d skipped: %s", result.format, result.records, exc)
            continue
        yield from lines


def export_file(session: Session, path: str | Path, fmt: str, *, source: str = "all") -> ExportResult:
    """Write the store's records of `source` in format `fmt` to `path` (`.gz`: gzipped), atomically.

    Sources: `imported` (from `dialoop import`), `trainers` (conversations of trainers and admins,
    rankings with a trainer), `feedback` (users' thumbs and A/B choices, preference formats only), `all`
    (everything: for preference formats every ranking, then feedback)."""
    format_ = get_format(fmt)
    _check_source(source)
    if source == "feedback" and not isinstance(format_, RankingFormat):
        raise ValueError("source 'feedback' holds preferences: export it as pairs, rankings or hh-rlhf")
    result = ExportResult(path=str(path), format=format_.name, source=source)
    lines: Iterator[dict[str, Any]]
    if isinstance(format_, ChatFormat):
        chats = (
            ChatExample(messages=chat) for chat in conversation_chats(session, _conversation_query(source))
        )
        lines = _dump_all(chats, format_.dump, format_.parse, result)
    elif isinstance(format_, RankingFormat):

        def preferences() -> Iterator[RankingExample]:
            yield from ranking_records(session, source)
            if source in ("all", "feedback"):
                yield from feedback_records(session)

        lines = _dump_all(preferences(), format_.dump, format_.parse, result)
    else:
        lines = _dump_all(tree_records(session, source), format_.dump, format_.parse, result)
    result.lines = write_lines(path, lines)
    log.info(
        "exported %d %s lines (%d records skipped) to %s", result.lines, result.format, result.skipped, path
    )
    return result

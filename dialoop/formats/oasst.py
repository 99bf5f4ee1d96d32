"""`oasst`: Open-Assistant message trees, one per line, in the shape of oasst1's tree export:
`{"message_tree_id", "tree_state", "prompt": {"message_id", "text", "role": "prompter"|"assistant",
"lang", "rank", ..., "replies": [...]}}`.

Fields Dialoop has no column for (lang, review counts, labels, ...) are kept and written back. `rank`
orders sibling replies (0 = best); two or more ranked assistant replies to a prompter message make one
comparison with its ranking, and export derives `rank` back from the rankings of those comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dialoop.formats.jsonl import NotRepresentable
from dialoop.formats.messages import require_object
from dialoop.records import ChatMessage, RankingExample

ROLE_FROM_OASST = {"prompter": "user", "assistant": "assistant"}
ROLE_TO_OASST = {role: name for name, role in ROLE_FROM_OASST.items()}
NODE_FIELDS = ("message_id", "parent_id", "text", "role", "rank", "replies")
TREE_FIELDS = ("message_tree_id", "tree_state", "system_prompt", "prompt")
DEFAULT_TREE_STATE = "ready_for_export"


@dataclass
class OasstNode:
    """One message of a tree; `role` is Dialoop's (`user` or `assistant`)."""

    message_id: str
    role: str
    text: str
    rank: int | None = None
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # the source's other fields, written back as they were
    replies: list[OasstNode] = field(default_factory=list)


@dataclass
class OasstTree:
    root: OasstNode
    tree_id: str
    tree_state: str = DEFAULT_TREE_STATE
    system_prompt: str = ""  # Dialoop's extension: a conversation's system prompt, written only when set
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_node(value: Any, where: str) -> OasstNode:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a message object")
    message_id, text, role = value.get("message_id"), value.get("text"), value.get("role")
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"{where}.message_id must be a non-empty string")
    if not isinstance(text, str):
        raise ValueError(f"{where}.text must be a string")
    if role not in ROLE_FROM_OASST:
        raise ValueError(f"{where}.role must be 'prompter' or 'assistant', not {role!r}")
    rank = value.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise ValueError(f"{where}.rank must be an integer or null")
    replies = value.get("replies", [])
    if not isinstance(replies, list):
        raise ValueError(f"{where}.replies must be a list")
    return OasstNode(
        message_id=message_id,
        role=ROLE_FROM_OASST[role],
        text=text,
        rank=rank,
        extra={k: v for k, v in value.items() if k not in NODE_FIELDS},
        replies=[_parse_node(r, f"{where}.replies[{i}]") for i, r in enumerate(replies)],
    )


def parse(value: Any) -> OasstTree:
    obj = require_object(value, ("prompt",))
    try:
        root = _parse_node(obj["prompt"], "prompt")
    except RecursionError as exc:
        raise ValueError("message tree nested too deeply") from exc
    if root.role != "user":
        raise ValueError("prompt.role must be 'prompter': a tree starts with a prompt")
    tree_id, state = obj.get("message_tree_id", root.message_id), obj.get("tree_state", DEFAULT_TREE_STATE)
    system_prompt = obj.get("system_prompt", "")
    if not all(isinstance(v, str) for v in (tree_id, state, system_prompt)):
        raise ValueError("message_tree_id, tree_state and system_prompt must be strings")
    extra = {k: v for k, v in obj.items() if k not in TREE_FIELDS}
    return OasstTree(root=root, tree_id=tree_id, tree_state=state, system_prompt=system_prompt, extra=extra)


def _dump_node(node: OasstNode, parent_id: str | None) -> dict[str, Any]:
    if node.role not in ROLE_TO_OASST:
        raise NotRepresentable(f"OASST trees hold prompter and assistant messages, not {node.role!r} ones")
    line: dict[str, Any] = {
        "message_id": node.message_id,
        "parent_id": parent_id,
        "text": node.text,
        "role": ROLE_TO_OASST[node.role],
        "rank": node.rank,
    }
    line.update(sorted((k, v) for k, v in node.extra.items() if k not in NODE_FIELDS))
    line["replies"] = [_dump_node(r, node.message_id) for r in node.replies]
    return line


def dump(tree: OasstTree) -> list[dict[str, Any]]:
    if tree.root.role != "user":
        raise NotRepresentable("an OASST tree starts with a prompter message")
    line: dict[str, Any] = {"message_tree_id": tree.tree_id, "tree_state": tree.tree_state}
    if tree.system_prompt:
        line["system_prompt"] = tree.system_prompt
    line.update(sorted((k, v) for k, v in tree.extra.items() if k not in TREE_FIELDS))
    line["prompt"] = _dump_node(tree.root, None)
    return [line]


def ranked_replies(node: OasstNode) -> tuple[list[OasstNode], list[int], list[tuple[int, int]]] | None:
    """The ranked assistant replies to a prompter message, their order best first and tied pairs (equal
    ranks); None unless at least two are ranked."""
    if node.role != "user":
        return None
    ranked = [r for r in node.replies if r.role == "assistant" and r.rank is not None]
    if len(ranked) < 2:
        return None
    rank = [r.rank for r in ranked]
    order = sorted(range(len(ranked)), key=lambda i: (rank[i], i))
    ties = [
        (order[a], order[b])
        for a in range(len(order))
        for b in range(a + 1, len(order))
        if rank[order[a]] == rank[order[b]]
    ]
    return ranked, order, ties


def ranks_from_rankings(rankings: list[RankingExample], k: int) -> list[int | None]:
    """OASST ranks (0 = best, tied replies share the better rank) of K candidates from rankings of them:
    ordered by the mean rank over the rankings that place a candidate (all-bad ones place none); None
    where none does."""
    totals: list[list[int]] = [[] for _ in range(k)]
    for example in rankings:
        if example.all_bad:
            continue
        tied = {frozenset(t) for t in example.ties}
        previous: tuple[int, int] | None = None  # (candidate, rank) of the one ranked just above
        for position, candidate in enumerate(example.ranking):
            same = previous is not None and frozenset((previous[0], candidate)) in tied
            rank = previous[1] if same and previous is not None else position
            totals[candidate].append(rank)
            previous = (candidate, rank)
    means = [sum(t) / len(t) if t else None for t in totals]
    placed = sorted(m for m in means if m is not None)
    # competition ranking of the means: equal means share the rank of the first of them
    return [None if m is None else placed.index(m) for m in means]


def _walk(tree: OasstTree) -> list[tuple[list[OasstNode], OasstNode]]:
    """Every node with the path of nodes above it, depth first."""
    out: list[tuple[list[OasstNode], OasstNode]] = []
    stack: list[tuple[list[OasstNode], OasstNode]] = [([], tree.root)]
    while stack:
        above, node = stack.pop()
        out.append((above, node))
        stack.extend(([*above, node], r) for r in reversed(node.replies))
    return out


def _chat(tree: OasstTree, nodes: list[OasstNode]) -> list[ChatMessage]:
    system: list[ChatMessage] = (
        [{"role": "system", "content": tree.system_prompt}] if tree.system_prompt else []
    )
    return system + [{"role": n.role, "content": n.text} for n in nodes]


def tree_chats(tree: OasstTree) -> list[list[ChatMessage]]:
    """Every root-to-leaf conversation of the tree that ends with an assistant reply."""
    return [
        _chat(tree, [*above, node])
        for above, node in _walk(tree)
        if not node.replies and node.role == "assistant"
    ]


def tree_rankings(tree: OasstTree) -> list[RankingExample]:
    """One ranking per prompter message with at least two ranked assistant replies."""
    examples = []
    for above, node in _walk(tree):
        ranked = ranked_replies(node)
        if ranked is not None:
            replies, order, ties = ranked
            examples.append(
                RankingExample(
                    prompt=_chat(tree, [*above, node]),
                    completions=[r.text for r in replies],
                    ranking=order,
                    ties=ties,
                )
            )
    return examples

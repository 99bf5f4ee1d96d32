"""Message-tree helpers, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from dialoop.store import Conversation, Message, session_scope
from dialoop.store.trees import add_message, as_chat, children, leaf_paths, path_to_root, siblings


def _tree(engine: Engine) -> dict[str, int]:
    """u1 -> a1 -> u2 -> a3, a2 a regeneration beside a1, root r2 an edit beside u1."""
    with session_scope(engine) as s:
        conv = Conversation(kind="chat", system_prompt="Be brief.")
        s.add(conv)
        u1 = add_message(s, conv, None, "user", "hi")
        a1 = add_message(s, conv, u1, "assistant", "hello", finished=True, sampling={"temperature": 0.7})
        a2 = add_message(s, conv, u1, "assistant", "hey")
        u2 = add_message(s, conv, a1, "user", "how are you?")
        a3 = add_message(s, conv, u2, "assistant", "fine")
        r2 = add_message(s, conv, None, "user", "hi there")
        return {"conv": conv.id, "u1": u1.id, "a1": a1.id, "a2": a2.id, "u2": u2.id, "a3": a3.id, "r2": r2.id}


def test_add_message_links_parent_and_author_fields(engine: Engine) -> None:
    ids = _tree(engine)
    with session_scope(engine) as s:
        a1 = s.get(Message, ids["a1"])
        assert a1 is not None and a1.parent_id == ids["u1"] and a1.conversation_id == ids["conv"]
        assert a1.finished is True and a1.sampling == {"temperature": 0.7}


def test_add_message_rejects_bad_role_and_foreign_parent(engine: Engine) -> None:
    ids = _tree(engine)
    with session_scope(engine) as s:
        other = Conversation(kind="chat")
        s.add(other)
        parent = s.get(Message, ids["u1"])
        with pytest.raises(ValueError, match="another conversation"):
            add_message(s, other, parent, "assistant", "x")
        with pytest.raises(ValueError, match="invalid message role"):
            add_message(s, other, None, "tool", "x")


def test_path_children_siblings(engine: Engine) -> None:
    ids = _tree(engine)
    with session_scope(engine) as s:
        a3 = s.get(Message, ids["a3"])
        u1 = s.get(Message, ids["u1"])
        a2 = s.get(Message, ids["a2"])
        assert a3 is not None and u1 is not None and a2 is not None
        assert [m.id for m in path_to_root(s, a3)] == [ids["u1"], ids["a1"], ids["u2"], ids["a3"]]
        assert [m.id for m in children(s, u1)] == [ids["a1"], ids["a2"]]
        assert [m.id for m in siblings(s, a2)] == [ids["a1"], ids["a2"]]  # itself included: `< 2/2 >`
        assert [m.id for m in siblings(s, u1)] == [ids["u1"], ids["r2"]]  # roots are siblings too
        assert children(s, a2) == []


def test_as_chat_and_leaf_paths(engine: Engine) -> None:
    ids = _tree(engine)
    with session_scope(engine) as s:
        conv = s.get(Conversation, ids["conv"])
        assert conv is not None
        paths = leaf_paths(s, conv)
        assert [[m.id for m in p] for p in paths] == [
            [ids["u1"], ids["a1"], ids["u2"], ids["a3"]],
            [ids["u1"], ids["a2"]],
            [ids["r2"]],
        ]
        assert as_chat(paths[1], conv.system_prompt) == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hey"},
        ]
        assert as_chat(paths[1]) == [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hey"},
        ]

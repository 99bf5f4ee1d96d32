"""`messages`: one conversation per line, `{"messages": [{"role": ..., "content": ...}, ...]}`.

Also the checks every format shares for chat messages, prompts and single assistant replies."""

from __future__ import annotations

from typing import Any

from dialoop.records import ChatExample, ChatMessage
from dialoop.store.models import MESSAGE_ROLES


def require_object(value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """`value` as a JSON object holding `keys` (other keys are ignored)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object with {', '.join(repr(k) for k in keys)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"missing key {', '.join(repr(k) for k in missing)}")
    return value


def parse_chat(value: Any, what: str) -> list[ChatMessage]:
    """A non-empty list of `{"role", "content"}` messages with known roles and string contents."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of messages")
    chat: list[ChatMessage] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"{what}[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"{what}[{i}].role must be one of {', '.join(MESSAGE_ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}].content must be a string")
        chat.append({"role": role, "content": content})
    return chat


def parse_prompt(value: Any, what: str = "prompt") -> list[ChatMessage]:
    """A chat that ends with a user turn: the context of a comparison."""
    chat = parse_chat(value, what)
    if chat[-1]["role"] != "user":
        raise ValueError(f"{what} must end with a user message")
    return chat


def parse_reply(value: Any, what: str) -> str:
    """The content of a one-message list `[{"role": "assistant", "content": ...}]`."""
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"{what} must be a list holding exactly one assistant message")
    (message,) = parse_chat(value, what)
    if message["role"] != "assistant":
        raise ValueError(f"{what}[0].role must be 'assistant'")
    return message["content"]


def assistant_turn(content: str) -> list[ChatMessage]:
    return [{"role": "assistant", "content": content}]


def parse(value: Any) -> ChatExample:
    return ChatExample(messages=parse_chat(require_object(value, ("messages",))["messages"], "messages"))


def dump(example: ChatExample) -> list[dict[str, Any]]:
    return [{"messages": example.messages}]

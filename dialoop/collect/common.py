"""What every trainer workflow shares: the policy handle, role checks, contexts, sampling records."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from dialoop.engine import SamplingParams
from dialoop.engine.chat import generate_replies
from dialoop.modeling.chat import Reply
from dialoop.records import ChatMessage
from dialoop.store.models import Conversation, Message, User
from dialoop.store.trees import as_chat, path_to_root


@dataclass
class PolicyHandle:
    """A loaded policy: the model, its tokenizer and the `ModelVersion` id its replies are credited to."""

    model: Any
    tokenizer: Any
    version_id: int


def check_role(user: User, roles: Sequence[str], action: str) -> None:
    """PermissionError unless `user` has one of `roles`."""
    if user.role not in roles:
        raise PermissionError(
            f"user {user.name!r} ({user.role}) may not {action}: needs {' or '.join(roles)}"
        )


def require_owner(user: User, conversation: Conversation, action: str) -> None:
    """PermissionError unless `user` owns `conversation`."""
    if conversation.owner_id != user.id:
        raise PermissionError(
            f"user {user.name!r} may not {action}: conversation {conversation.id} is not theirs"
        )


def context_of(session: Session, message: Message) -> list[ChatMessage]:
    """The chat from the root down to `message`, with the conversation's system prompt first."""
    return as_chat(path_to_root(session, message), message.conversation.system_prompt)


def sampling_record(params: SamplingParams) -> dict[str, Any]:
    """The sampling parameters as stored on a model-written message."""
    return dataclasses.asdict(params)


def params_from_record(record: dict[str, Any]) -> SamplingParams:
    """Sampling parameters back from `sampling_record` (unknown keys ignored, missing ones default; records
    written before the engine say `max_new_tokens`)."""
    record = dict(record)
    if "max_new_tokens" in record:
        record.setdefault("max_tokens", record.pop("max_new_tokens"))
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    # JSON stores the tuples (stop strings, stop ids) as lists
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in fields
    }
    return SamplingParams(**values)


def sample_for(
    handle: PolicyHandle, contexts: list[list[ChatMessage]], params: Sequence[SamplingParams]
) -> list[Reply]:
    """One reply per context from `handle`'s model, each with its own sampling parameters."""
    for p in params:
        p.validate()
    if not contexts:
        return []
    # wide batches: a decoding step's matmuls use the CPU better with more rows (64 rows took about 30%
    # less time per reply than 16 on a 2-core CPU), and the rows of one context share its prefill
    return generate_replies(handle.model, handle.tokenizer, contexts, list(params), batch_size=64)

"""What the trainer routes share: the router, the role, settings, per-app state, refusals, JSON helpers."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.orm import Session

from dialoop.collect import Suggestion, demonstration_turns
from dialoop.collect.demonstrations import EDITABLE
from dialoop.serve.auth import require_role
from dialoop.serve.sessions import csrf_protect
from dialoop.settings import TrainerSettings, settings
from dialoop.store.models import Conversation, Message, User, utc_iso

TRAINER = require_role("trainer", "admin")
Trainer = Annotated[User, Depends(TRAINER)]

# every trainer route is on this router; the role check comes first, so that other roles get 403 for
# the role whatever their CSRF token
router = APIRouter(include_in_schema=False, dependencies=[Depends(TRAINER), Depends(csrf_protect)])


def configure_trainer(app: Any, config: TrainerSettings) -> None:
    """Use `config` for `app` instead of the settings' trainer knobs (tests, embedding)."""
    app.state.trainer_settings = config


def trainer_settings(request: Request) -> TrainerSettings:
    config: TrainerSettings | None = getattr(request.app.state, "trainer_settings", None)
    if config is None:
        config = request.app.state.trainer_settings = settings().trainer
    return config


@dataclass
class SuggestionSet:
    """The suggestions of one request, kept until one is inserted (or they age out)."""

    user_id: int
    demonstration_id: int
    context_id: int  # the user turn they answer
    suggestions: list[Suggestion]


@dataclass
class TrainerState:
    """Per-app state: finished suggestion sets (by generation id), the task-making lock."""

    sets: OrderedDict[str, SuggestionSet] = field(default_factory=OrderedDict)
    # a thread lock: the state is used from the event loop and from route threads, and outlives a loop
    making: threading.Lock = field(default_factory=threading.Lock)


_STATE_LOCK = threading.Lock()


def trainer_state(request: Request) -> TrainerState:
    with _STATE_LOCK:
        state: TrainerState | None = getattr(request.app.state, "trainer", None)
        if state is None:
            state = request.app.state.trainer = TrainerState()
        return state


@contextmanager
def collect_errors() -> Iterator[None]:
    """The collect workflows' refusals as HTTP answers with their message."""
    try:
        yield
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from exc
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


def own_demonstration(session: Session, trainer: User, demonstration_id: int) -> Conversation:
    """The trainer's demonstration `demonstration_id`; 404 when it does not exist or is someone else's."""
    conv = session.get(Conversation, demonstration_id)
    if conv is None or conv.kind != "demonstration" or conv.owner_id != trainer.id:
        raise HTTPException(404, f"no demonstration {demonstration_id}")
    return conv


def turn_json(message: Message) -> dict[str, Any]:
    suggestion = (message.extra or {}).get("suggestion")
    return {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "from_suggestion": suggestion is not None,
        "suggestion_edited": suggestion is not None and suggestion.get("text") != message.content,
    }


def demonstration_json(session: Session, conv: Conversation, *, turns: bool = False) -> dict[str, Any]:
    messages = demonstration_turns(session, conv)
    first_user = next((m.content for m in messages if m.role == "user" and m.content.strip()), "")
    out: dict[str, Any] = {
        "id": conv.id,
        "title": conv.title or first_user.strip().split("\n")[0][:80],
        "system_prompt": conv.system_prompt,
        "status": conv.status,
        "editable": conv.status in EDITABLE,
        "turn_count": len(messages),
        "created_at": utc_iso(conv.created_at),
        "updated_at": utc_iso(conv.updated_at),
    }
    if turns:
        out["turns"] = [turn_json(m) for m in messages]
    return out

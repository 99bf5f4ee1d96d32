"""Demonstrations: a trainer writes both sides of a conversation, from scratch or from suggestions."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from dialoop.collect import (
    Suggestion,
    add_turn,
    create_demonstration,
    delete_demonstration,
    demonstration_turns,
    edit_turn,
    remove_last_turn,
    submit_demonstration,
)
from dialoop.collect.demonstrations import demonstrations_of
from dialoop.serve.deps import ServeSettingsDep, SessionDep
from dialoop.serve.limits import check_text
from dialoop.serve.trainer.common import (
    SuggestionSet,
    Trainer,
    collect_errors,
    demonstration_json,
    own_demonstration,
    router,
    trainer_state,
    turn_json,
)
from dialoop.serve.trainer.schemas import DemonstrationIn, SuggestionRef, TurnEdit, TurnIn
from dialoop.store.models import Conversation, Message, User, utcnow


@router.get("/api/trainer/demonstrations")
def list_demonstrations(trainer: Trainer, session: SessionDep) -> list[dict[str, Any]]:
    return [demonstration_json(session, c) for c in demonstrations_of(session, trainer)]


@router.post("/api/trainer/demonstrations", status_code=201)
def new_demonstration(
    body: DemonstrationIn, trainer: Trainer, session: SessionDep, limits: ServeSettingsDep
) -> dict[str, Any]:
    check_text(body.system_prompt, "system prompt", limits)
    with collect_errors():
        conv = create_demonstration(
            session, trainer, system_prompt=body.system_prompt, title=body.title.strip()
        )
    return demonstration_json(session, conv, turns=True)


@router.get("/api/trainer/demonstrations/{demonstration_id}")
def get_demonstration(demonstration_id: int, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    return demonstration_json(session, own_demonstration(session, trainer, demonstration_id), turns=True)


@router.delete("/api/trainer/demonstrations/{demonstration_id}", status_code=204)
def remove_demonstration(demonstration_id: int, trainer: Trainer, session: SessionDep) -> Response:
    conv = own_demonstration(session, trainer, demonstration_id)
    with collect_errors():
        delete_demonstration(session, conv, trainer)
    return Response(status_code=204)


def _suggestion_for(
    request: Request, ref: SuggestionRef, trainer: User, conv: Conversation
) -> tuple[SuggestionSet, Suggestion]:
    found = trainer_state(request).sets.get(ref.generation_id)
    if found is None or found.user_id != trainer.id or found.demonstration_id != conv.id:
        raise HTTPException(
            404,
            "these suggestions are no longer available (the server may have restarted): "
            "ask for new ones, or paste the text as your own",
        )
    if ref.index >= len(found.suggestions):
        raise HTTPException(422, f"there are {len(found.suggestions)} suggestions, not {ref.index + 1}")
    return found, found.suggestions[ref.index]


@router.post("/api/trainer/demonstrations/{demonstration_id}/turns", status_code=201)
def append_turn(
    request: Request,
    demonstration_id: int,
    body: TurnIn,
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
) -> dict[str, Any]:
    """Append a turn (or replace the last assistant turn), from scratch or from a suggestion."""
    conv = own_demonstration(session, trainer, demonstration_id)
    check_text(body.content, "turn", limits)
    found, suggestion = (
        _suggestion_for(request, body.suggestion, trainer, conv) if body.suggestion else (None, None)
    )
    with collect_errors():
        if body.replace_last:
            turns = demonstration_turns(session, conv)
            if not turns or turns[-1].role != "assistant":
                raise HTTPException(
                    422, "the last turn is not an assistant turn: there is nothing to replace"
                )
            remove_last_turn(session, conv, trainer)
        if found is not None:
            turns = demonstration_turns(session, conv)
            if not turns or turns[-1].id != found.context_id:
                raise HTTPException(
                    409, "the conversation changed since these suggestions were made: ask for new ones"
                )
        message = add_turn(session, conv, trainer, body.role, body.content, suggestion=suggestion)
    conv.updated_at = utcnow()
    return {"turn": turn_json(message), "demonstration": demonstration_json(session, conv)}


def _own_turn(session: Session, conv: Conversation, message_id: int) -> Message:
    message = session.get(Message, message_id)
    if message is None or message.conversation_id != conv.id:
        raise HTTPException(404, f"no turn {message_id} in demonstration {conv.id}")
    return message


@router.put("/api/trainer/demonstrations/{demonstration_id}/turns/{message_id}")
def save_turn(
    demonstration_id: int,
    message_id: int,
    body: TurnEdit,
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
) -> dict[str, Any]:
    """Save the text of a turn as the trainer types (the page calls it a moment after each change)."""
    conv = own_demonstration(session, trainer, demonstration_id)
    message = _own_turn(session, conv, message_id)
    check_text(body.content, "turn", limits)
    with collect_errors():
        edit_turn(session, message, trainer, body.content)
    conv.updated_at = utcnow()
    return {"turn": turn_json(message), "status": conv.status}


@router.delete("/api/trainer/demonstrations/{demonstration_id}/turns/{message_id}", status_code=204)
def delete_last_turn(
    demonstration_id: int, message_id: int, trainer: Trainer, session: SessionDep
) -> Response:
    """Delete the last turn; naming it makes sure a stale page never deletes another one."""
    conv = own_demonstration(session, trainer, demonstration_id)
    message = _own_turn(session, conv, message_id)
    turns = demonstration_turns(session, conv)
    if turns[-1].id != message.id:
        raise HTTPException(409, f"turn {message.id} is not the last turn: only the last one can be removed")
    with collect_errors():
        remove_last_turn(session, conv, trainer)
    conv.updated_at = utcnow()
    return Response(status_code=204)


@router.post("/api/trainer/demonstrations/{demonstration_id}/submit")
def submit(demonstration_id: int, trainer: Trainer, session: SessionDep) -> dict[str, Any]:
    conv = own_demonstration(session, trainer, demonstration_id)
    with collect_errors():
        submit_demonstration(session, conv, trainer)
    conv.updated_at = utcnow()
    return demonstration_json(session, conv)

"""The admin dashboard: collection counts, trainers' agreement, open flags, demonstrations to review."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dialoop.collect import collection_counts, pairwise_agreement, review_demonstration
from dialoop.collect.demonstrations import submitted_demonstrations
from dialoop.collect.flags import OUTCOMES, open_flags, resolve_flags
from dialoop.serve.admin.common import AdminUser, admin_router, redirect
from dialoop.serve.deps import SessionDep
from dialoop.serve.pages import render
from dialoop.store.accounts import list_users
from dialoop.store.models import Conversation
from dialoop.store.stats import store_stats


def _user_names(session: Session) -> dict[int, str]:
    return {u.id: u.name for u in list_users(session)}


@admin_router.get("")
def dashboard(request: Request, session: SessionDep) -> Response:
    """Collection counts, rankings per trainer with their agreement, open flags, demonstrations to review."""
    agreement = pairwise_agreement(session)
    trainers = sorted(agreement.trainers.values(), key=lambda t: t.name)
    context = {
        "counts": collection_counts(session),
        "store": store_stats(session),
        "agreement": agreement,
        "trainers": trainers,
        "flags": open_flags(session),
        "names": _user_names(session),
        "outcomes": OUTCOMES,
        "demonstrations": submitted_demonstrations(session),
    }
    return render(request, "admin/dashboard.html", context)


@admin_router.post("/demonstrations/{conversation_id}/review")
def review(
    conversation_id: int, admin: AdminUser, session: SessionDep, decision: Annotated[str, Form()]
) -> RedirectResponse:
    """Accept or reject a submitted demonstration."""
    if decision not in ("accept", "reject"):
        raise HTTPException(400, "decision must be accept or reject")
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.kind != "demonstration":
        raise HTTPException(404, f"no demonstration with id {conversation_id}")
    try:
        review_demonstration(session, conversation, admin, accept=decision == "accept")
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    return redirect("/admin#demonstrations")


@admin_router.post("/flags/{message_id}/resolve")
def resolve_flag(
    message_id: int,
    admin: AdminUser,
    session: SessionDep,
    outcome: Annotated[str, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
) -> RedirectResponse:
    """Close the open flags on one reply: upheld (the reply is bad) or dismissed."""
    try:
        resolve_flags(session, message_id, admin, outcome, note)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return redirect("/admin#flags")

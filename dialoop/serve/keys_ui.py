"""API keys in the web: a user lists, creates and revokes their own keys; a new key is shown once."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dialoop.serve.auth import CurrentUser
from dialoop.serve.deps import SessionDep
from dialoop.serve.pages import render
from dialoop.serve.sessions import csrf_protect
from dialoop.store.accounts import create_api_key, list_api_keys, revoke_api_key
from dialoop.store.models import User

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_protect)])


def _keys_page(request: Request, session: Session, user: User, **context: Any) -> Response:
    keys = list_api_keys(session, user)
    return render(request, "keys.html", {"keys": keys, "base_url": str(request.base_url) + "v1", **context})


@router.get("/keys")
def keys_page(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    return _keys_page(request, session, user)


@router.post("/keys")
def create_key(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    name: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Create a key and show its plaintext on this response only (only its hash is stored)."""
    key, plaintext = create_api_key(session, user, name.strip())
    return _keys_page(request, session, user, new_key=plaintext, new_key_id=key.id)


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: int, user: CurrentUser, session: SessionDep) -> RedirectResponse:
    """Revoke one of the user's own keys (someone else's key: 404)."""
    try:
        revoke_api_key(session, key_id, user=user)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    return RedirectResponse("/keys", status_code=303)

"""User accounts: create, change roles, reset passwords (one-time, shown once), delete."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Form, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from dialoop.collect import pairwise_agreement
from dialoop.serve.admin.common import AdminUser, admin_router
from dialoop.serve.deps import SessionDep
from dialoop.serve.pages import render
from dialoop.store.accounts import create_user, delete_user, list_users, set_password, set_role
from dialoop.store.models import ROLES, User


def _users_page(request: Request, session: Session, *, status_code: int = 200, **context: Any) -> Response:
    ranked = {t.trainer_id: t.rankings for t in pairwise_agreement(session).trainers.values()}
    return render(
        request,
        "admin/users.html",
        {"users": list_users(session), "roles": ROLES, "ranked": ranked, **context},
        status_code=status_code,
    )


def _one_time_password() -> str:
    return secrets.token_urlsafe(12)


def _target(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(404, f"no user with id {user_id}")
    return user


@admin_router.get("/users")
def users_page(request: Request, session: SessionDep) -> Response:
    return _users_page(request, session)


@admin_router.post("/users")
def add_user(
    request: Request,
    session: SessionDep,
    name: Annotated[str, Form(max_length=100)],
    role: Annotated[str, Form()],
    password: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Create an account; without a password, a one-time password is made and shown on this page only."""
    chosen = password or _one_time_password()
    try:
        user = create_user(session, name.strip(), role, chosen)
    except ValueError as exc:
        return _users_page(
            request, session, status_code=400, error=str(exc), form={"name": name, "role": role}
        )
    shown = None if password else {"name": user.name, "password": chosen}
    return _users_page(request, session, one_time=shown, message=f"Created {user.name} ({user.role}).")


@admin_router.post("/users/{user_id}/role")
def change_role(
    request: Request, user_id: int, admin: AdminUser, session: SessionDep, role: Annotated[str, Form()]
) -> Response:
    user = _target(session, user_id)
    if user.id == admin.id:
        return _users_page(request, session, status_code=400, error="You cannot change your own role.")
    try:
        set_role(session, user, role)
    except ValueError as exc:
        return _users_page(request, session, status_code=400, error=str(exc))
    return _users_page(request, session, message=f"{user.name} is now {role}.")


@admin_router.post("/users/{user_id}/password")
def reset_password(request: Request, user_id: int, session: SessionDep) -> Response:
    """Replace the password with a one-time one, shown once; the user's open sessions end."""
    user = _target(session, user_id)
    chosen = _one_time_password()
    set_password(session, user, chosen)
    return _users_page(
        request,
        session,
        one_time={"name": user.name, "password": chosen},
        message=f"Reset {user.name}'s password.",
    )


@admin_router.post("/users/{user_id}/delete")
def remove_user(request: Request, user_id: int, admin: AdminUser, session: SessionDep) -> Response:
    """Delete an account; its conversations and rankings stay, without an owner."""
    user = _target(session, user_id)
    if user.id == admin.id:
        return _users_page(request, session, status_code=400, error="You cannot delete your own account.")
    name = user.name
    try:
        delete_user(session, user)
    except ValueError as exc:
        return _users_page(request, session, status_code=400, error=str(exc))
    return _users_page(request, session, message=f"Deleted {name}.")

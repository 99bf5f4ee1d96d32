"""Route dependencies shared by every router: the server's settings, DB sessions, the worker, API-key users.

@router.get("/things")
def things(session: SessionDep, worker: WorkerDep) -> ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dialoop.serve.models import ModelRegistry
from dialoop.serve.openai_errors import OpenAIError
from dialoop.serve.overload import db_slot, run_with_db
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings
from dialoop.store.accounts import user_for_api_key
from dialoop.store.db import session_scope
from dialoop.store.models import User


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(
    request: Request, _slot: Annotated[None, Depends(db_slot, scope="function")]
) -> Iterator[Session]:
    """A session for this request: committed when the route returns, rolled back on an error.

    Use `SessionDep` so that the commit happens before the response is sent (a failed commit is a 500,
    never a success the client saw for data that was not saved). The request holds a database slot
    while it has the session (`dialoop.serve.overload`: 503 when none frees in time).
    """
    with session_scope(request.app.state.engine) as session:
        yield session


def get_worker(request: Request) -> GenerationWorker:
    worker: GenerationWorker = request.app.state.worker
    return worker


def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_serve_settings(request: Request) -> ServeSettings:
    serve_settings: ServeSettings = request.app.state.serve_settings
    return serve_settings


async def api_user(request: Request, authorization: Annotated[str | None, Header()] = None) -> User:
    """The owner of the request's `Authorization: Bearer <API key>`; 401 in OpenAI's shape otherwise.

    Uses its own short session (in a database slot), so that a long generation holds no connection.
    """
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise OpenAIError(
            401,
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`; "
            "create one with `dialoop keys create USER` or on your account page.",
        )
    maker = sessionmaker(request.app.state.engine, expire_on_commit=False)

    def lookup() -> User | None:
        with maker() as session:
            user = user_for_api_key(session, key.strip())
            if user is not None:
                session.expunge(user)
            return user

    user = await run_with_db(request, lookup)
    if user is None:
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return user


def api_admin(user: Annotated[User, Depends(api_user)]) -> User:
    """An API-key user with the admin role; 403 otherwise."""
    if user.role != "admin":
        raise OpenAIError(403, "This call needs an admin's API key.", type="permission_error")
    return user


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
EngineDep = Annotated[Engine, Depends(get_engine)]
WorkerDep = Annotated[GenerationWorker, Depends(get_worker)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ServeSettingsDep = Annotated[ServeSettings, Depends(get_serve_settings)]
ApiUserDep = Annotated[User, Depends(api_user)]
ApiAdminDep = Annotated[User, Depends(api_admin)]

"""What the admin routes share: their two routers, the role dependencies, the redirect after a form.

Every domain module adds its routes to `admin_router` (the admin role, `/admin/...`) or to `ab_router`
(trainers and admins); both check the role first and then the CSRF token of state-changing calls.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import RedirectResponse

from dialoop.serve.auth import require_role
from dialoop.serve.sessions import csrf_protect
from dialoop.store.models import User

AdminUser = Annotated[User, Depends(require_role("admin"))]
TrainerUser = Annotated[User, Depends(require_role("trainer", "admin"))]

admin_router = APIRouter(
    prefix="/admin",
    include_in_schema=False,
    dependencies=[Depends(require_role("admin")), Depends(csrf_protect)],
)
ab_router = APIRouter(
    include_in_schema=False, dependencies=[Depends(require_role("trainer", "admin")), Depends(csrf_protect)]
)


def redirect(path: str) -> RedirectResponse:
    """See `path` after a form was handled (303: the browser GETs it)."""
    return RedirectResponse(path, status_code=303)

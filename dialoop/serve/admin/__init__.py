"""Admin pages: users and roles, the collection dashboard, iterations, model versions, blind A/B tests.

Every `/admin` route needs the admin role and, when it changes something, the CSRF token (both are
router dependencies). `/ab` is where trainers judge A/B tests: two replies labelled A and B in their own
random order, never with the versions' names.

    GET  /admin                            counts, agreement, rankings per trainer, flags, demonstrations
    GET  /admin/users                      POST /admin/users, /admin/users/{id}/role|password|delete
    GET  /admin/iterations                 POST /admin/iterations (start), /admin/jobs/{id}/cancel
    GET  /admin/api/jobs[/{id}]            live progress (polled by the page)
    GET  /admin/versions                   report cards; POST /admin/versions/serve (hot swap)
    GET  /admin/ab, /admin/ab/{id}         POST /admin/ab (queue a test), /admin/ab/{id}/close
    GET  /ab                               POST /ab/{task_id} (a trainer's choice)
"""

from __future__ import annotations

from fastapi import APIRouter

from dialoop.serve.admin import abtests, dashboard, iterations, users, versions
from dialoop.serve.admin.common import ab_router, admin_router
from dialoop.serve.pages import add_nav_link

# the modules that put their routes on admin_router and ab_router when imported
DOMAINS = (dashboard, users, iterations, versions, abtests)

router = APIRouter()  # what app.py includes: both of the above
router.include_router(admin_router)
router.include_router(ab_router)

add_nav_link("Admin", "/admin", "admin")
add_nav_link("A/B", "/ab", "trainer", "admin")

__all__ = ["ab_router", "admin_router", "router"]

"""Model versions: lineage, report cards and their files, which policy is served (hot swap)."""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Annotated

from fastapi import Form, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from dialoop.serve.admin.common import admin_router, redirect
from dialoop.serve.deps import RegistryDep, SessionDep
from dialoop.serve.generation import http_error
from dialoop.serve.models import UnknownModel
from dialoop.serve.pages import render
from dialoop.store.models import ModelVersion
from dialoop.store.registry import list_model_versions

REPORT_FILE = re.compile(r"[\w.-]+\.(png|json|jsonl|html)")
# the report page may quote model replies: it is opened sandboxed with no script at all (its own origin
# kept, so that its plots load with the admin's cookie)
REPORT_HTML_CSP = (
    "sandbox allow-same-origin; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
)


def report_dir(version: ModelVersion) -> Path | None:
    """The report card written by the iteration that trained `version` (`iter-N/report`), if any."""
    if version.run_id is None:
        return None
    folder = Path(version.path).parent / "report"
    return folder if (folder / "report.json").is_file() else None


@admin_router.get("/versions")
def versions_page(request: Request, session: SessionDep, registry: RegistryDep) -> Response:
    """Every model version with its lineage, run and report card; which policy is served."""
    versions = list(reversed(list_model_versions(session)))
    reports: dict[int, list[str]] = {}  # the newest version of an iteration shows its report's files
    report_of: dict[int, str] = {}  # the iteration's other versions name that version
    shown: dict[Path, str] = {}
    for v in versions:
        folder = report_dir(v)
        if folder is None:
            continue
        if folder in shown:
            report_of[v.id] = shown[folder]
        else:
            shown[folder] = v.name
            reports[v.id] = sorted(p.name for p in folder.iterdir() if REPORT_FILE.fullmatch(p.name))
    context = {
        "versions": versions,
        "reports": reports,
        "report_of": report_of,
        "servable": registry.entries(),
        "served": registry.served,
        "loaded": registry.loaded(),
    }
    return render(request, "admin/versions.html", context)


@admin_router.post("/versions/serve")
async def serve_version(
    registry: RegistryDep, name: Annotated[str, Form(max_length=200)]
) -> RedirectResponse:
    """Serve `name` from now on: it is loaded first; requests in flight finish on their model."""
    try:
        await registry.set_served(name)
    except UnknownModel as exc:
        raise http_error(exc) from exc
    return redirect("/admin/versions")


@admin_router.get("/versions/{version_id}/report/{filename}")
def report_file(version_id: int, filename: str, session: SessionDep) -> FileResponse:
    """A file of a version's report card (plots, report.json, report.html)."""
    version = session.get(ModelVersion, version_id)
    folder = report_dir(version) if version is not None else None
    if folder is None or not REPORT_FILE.fullmatch(filename) or not (folder / filename).is_file():
        raise HTTPException(404, "no such report file")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if filename.endswith(".html"):
        headers["Content-Security-Policy"] = REPORT_HTML_CSP
    media_type = "application/x-ndjson" if filename.endswith(".jsonl") else mimetypes.guess_type(filename)[0]
    return FileResponse(folder / filename, media_type=media_type, headers=headers)

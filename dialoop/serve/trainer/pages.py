"""The trainer workspace's pages and the labeling guide."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

import nh3
from fastapi import Form, Request
from fastapi.responses import RedirectResponse, Response
from markdown_it import MarkdownIt
from markupsafe import Markup

from dialoop.collect import FLAG_KINDS, create_demonstration
from dialoop.collect.agreement import trainer_counts
from dialoop.collect.demonstrations import demonstrations_of
from dialoop.collect.tasks import answers_of
from dialoop.serve.deps import RegistryDep, ServeSettingsDep, SessionDep
from dialoop.serve.limits import check_text
from dialoop.serve.pages import WEB_DIR, render
from dialoop.serve.trainer.common import (
    Trainer,
    collect_errors,
    demonstration_json,
    own_demonstration,
    router,
    trainer_settings,
)
from dialoop.serve.trainer.tasks import answer_json, task_for

GUIDE_FILE = WEB_DIR / "labeling_guide.md"
SKIP_REASONS = (
    "I don't know enough about this topic",
    "The conversation is unclear or broken",
    "The replies are too long to judge well",
    "I'd rather not read this content",
)


@router.get("/trainer")
def home(request: Request, trainer: Trainer, session: SessionDep, registry: RegistryDep) -> Response:
    served = registry.resolve(None)
    return render(
        request,
        "trainer/home.html",
        {
            "counts": trainer_counts(session, trainer),
            "served": served.name,
            "config": trainer_settings(request),
        },
    )


@router.get("/trainer/demonstrations")
def demonstrations_page(request: Request, trainer: Trainer, session: SessionDep) -> Response:
    demos = [demonstration_json(session, c) for c in demonstrations_of(session, trainer)]
    return render(request, "trainer/demonstrations.html", {"demonstrations": demos})


@router.post("/trainer/demonstrations")
def new_demonstration_form(
    trainer: Trainer,
    session: SessionDep,
    limits: ServeSettingsDep,
    title: Annotated[str, Form(max_length=300)] = "",
    system_prompt: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """The "New demonstration" button: a new draft, then its editor."""
    check_text(system_prompt, "system prompt", limits)
    with collect_errors():
        conv = create_demonstration(session, trainer, system_prompt=system_prompt, title=title.strip())
    return RedirectResponse(f"/trainer/demonstrations/{conv.id}", status_code=303)


@router.get("/trainer/demonstrations/{demonstration_id}")
def demonstration_page(
    request: Request, demonstration_id: int, trainer: Trainer, session: SessionDep
) -> Response:
    conv = own_demonstration(session, trainer, demonstration_id)
    config = trainer_settings(request)
    return render(
        request,
        "trainer/demonstration.html",
        {"demonstration": demonstration_json(session, conv), "max_suggestions": config.max_suggestions},
    )


@router.get("/trainer/rank")
def rank_page(request: Request, trainer: Trainer) -> Response:
    return render(
        request, "trainer/rank.html", {"task_id": None, "skip_reasons": SKIP_REASONS, "flags": FLAG_KINDS}
    )


@router.get("/trainer/rank/{task_id}")
def rank_task_page(request: Request, task_id: int, trainer: Trainer, session: SessionDep) -> Response:
    task_for(session, trainer, task_id)
    return render(
        request, "trainer/rank.html", {"task_id": task_id, "skip_reasons": SKIP_REASONS, "flags": FLAG_KINDS}
    )


@router.get("/trainer/rankings")
def rankings_page(request: Request, trainer: Trainer, session: SessionDep) -> Response:
    answers = [answer_json(r) for r in answers_of(session, trainer)]
    return render(request, "trainer/rankings.html", {"answers": answers})


@cache
def guide_html(path: Path = GUIDE_FILE) -> Markup:
    """The labeling guide as HTML: raw HTML in the markdown is escaped, then the result is sanitised."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return Markup(nh3.clean(md.render(path.read_text(encoding="utf-8"))))


@router.get("/guide")
def guide(request: Request, trainer: Trainer) -> Response:
    """The labeling guide: what trainers prefer when they write and rank."""
    return render(request, "trainer/guide.html", {"guide": guide_html()})

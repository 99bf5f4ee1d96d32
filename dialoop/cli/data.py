"""Data commands: `dialoop import` and `dialoop export` in any format of `dialoop.formats`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from sqlalchemy import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dialoop.cli._app import app
from dialoop.formats import FORMATS, SOURCES, FormatError, export_file, import_file
from dialoop.formats.sources import detect_format
from dialoop.settings import settings
from dialoop.store import session_scope
from dialoop.store.migrate import open_store
from dialoop.store.models import CONVERSATION_KINDS

console = Console()
err_console = Console(stderr=True)

BAD_INPUT = 2  # the exit code of a malformed file or bad arguments (as click's usage errors)


def _fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _store() -> Iterator[Session]:
    """One transaction on the configured store: committed when the command succeeds, else rolled back."""
    url = settings().db_url
    try:
        engine = open_store(url)
    except OperationalError as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        raise _fail(f"cannot open the store {shown}: {str(exc.orig).strip()}", 1) from exc
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


def _check_choice(what: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise _fail(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


@app.command("import")
def import_(
    file: Path = typer.Argument(
        ...,
        help="A JSONL file (or .jsonl.gz), a Parquet file, or a dataset saved with save_to_disk.",
        show_default=False,
    ),
    fmt: str | None = typer.Option(
        None,
        "--format",
        "-f",
        help=f"One of: {', '.join(FORMATS)} (default: told from the columns).",
        show_default=False,
    ),
    source_name: str | None = typer.Option(
        None,
        "--source-name",
        help="Label of the imported records (default: the format name).",
        show_default=False,
    ),
    kind: str = typer.Option(
        "imported",
        "--kind",
        help="Kind of the conversations of messages and oasst files: imported or demonstration.",
    ),
) -> None:
    """Import a file into the store, all or nothing; records already there are skipped."""
    if fmt is None:
        try:
            fmt = detect_format(file)
        except FormatError as exc:
            raise _fail(str(exc)) from exc
    _check_choice("format", fmt, list(FORMATS))
    _check_choice("kind", kind, CONVERSATION_KINDS)
    try:
        with _store() as session:
            result = import_file(session, file, fmt, source_name=source_name, kind=kind)
    except (FormatError, ValueError) as exc:
        raise _fail(f"{exc} (nothing imported)") from exc
    except IntegrityError as exc:  # another import added the same records meanwhile
        raise _fail(
            f"the store changed during the import, nothing imported: try again ({exc.orig})", 1
        ) from exc
    console.print(
        f"imported {result.imported} of {result.records} {result.format} records from {file} "
        f"({result.duplicates} already in the store): {result.conversations} conversations, "
        f"{result.messages} messages, {result.comparison_tasks} comparison tasks, {result.rankings} rankings",
        highlight=False,
        soft_wrap=True,
    )


@app.command("export")
def export(
    fmt: str = typer.Option(..., "--format", "-f", help=f"One of: {', '.join(FORMATS)}.", show_default=False),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The file to write (.gz: gzipped).", show_default=False
    ),
    source: str = typer.Option(
        "all",
        "--source",
        help="imported | trainers (their conversations and rankings) | feedback (users' thumbs and A/B "
        "choices, as preferences) | all.",
    ),
) -> None:
    """Export the store's records in a format (written atomically)."""
    _check_choice("format", fmt, list(FORMATS))
    _check_choice("source", source, SOURCES)
    try:
        with _store() as session:
            result = export_file(session, out, fmt, source=source)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    skipped = f" ({result.skipped} records the format cannot express skipped)" if result.skipped else ""
    console.print(
        f"wrote {result.lines} {result.format} lines to {out}{skipped}", highlight=False, soft_wrap=True
    )

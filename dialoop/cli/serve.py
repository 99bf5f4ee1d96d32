"""`dialoop serve`: the web chat and the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from dialoop.cli._app import app
from dialoop.settings import settings

console = Console(stderr=True)


@app.command()
def serve(
    model: str | None = typer.Option(
        None,
        "--model",
        help="Model to serve: an HF directory or a registered version name "
        "(default: the store's served version, else the embedded default).",
        show_default=False,
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Store URL (default: the global --database-url or settings).",
        show_default=False,
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: torch's choice).", show_default=False
    ),
) -> None:
    """Serve the web chat and the OpenAI-compatible API (/v1)."""
    import torch
    import uvicorn

    from dialoop.modeling.loading import ModelLoadError
    from dialoop.serve.app import create_app

    if threads is not None:
        torch.set_num_threads(threads)
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    logging.basicConfig(
        level=log_level.upper(), format="%(name)s: %(message)s", handlers=[RichHandler(console=console)]
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on every start
    try:
        server_app = create_app(database_url=database_url or settings().db_url, model=model)
    except (OSError, ValueError, LookupError, ModelLoadError) as exc:
        console.print(f"[red]error:[/red] cannot start the server: {exc}", highlight=False)
        raise typer.Exit(1) from exc
    console.print(f"Dialoop on http://{host}:{port}  (OpenAI API: http://{host}:{port}/v1)", highlight=False)
    uvicorn.run(server_app, host=host, port=port, log_level=log_level.lower(), log_config=None)

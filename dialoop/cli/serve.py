"""`dialoop serve`: the web chat and the OpenAI-compatible API on uvicorn, in one or more processes.

With `--workers N` uvicorn's supervisor runs N web processes on one port; they share the store (sessions,
login throttling, admin jobs) and, when set, Redis; each builds its app with `app_from_env` from the
options the parent put in `DIALOOP_SERVE_APP_ARGS`. SIGTERM (or Ctrl-C) drains: no new connections,
requests and streams in flight get `--drain-s` seconds to finish, then the rest is cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from dialoop.cli._app import app
from dialoop.settings import settings

console = Console(stderr=True)
APP_ARGS_ENV = "DIALOOP_SERVE_APP_ARGS"


def app_from_env() -> Any:
    """The server app of one worker process, from the options `serve` left in the environment."""
    from dialoop.serve.app import create_app
    from dialoop.serve.logs import configure_logging

    args = json.loads(os.environ[APP_ARGS_ENV])
    configure_logging(args.pop("log_level"), settings().serve.log_format, RichHandler(console=console))
    return create_app(**args)


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
    log_format: str | None = typer.Option(
        None,
        "--log-format",
        help="text, or json: one JSON line per log record and per request (default: the setting, text).",
        show_default=False,
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Web processes sharing the port and the store (default: the setting, 1). "
        "Each process loads the model it serves.",
        show_default=False,
    ),
    drain_s: float | None = typer.Option(
        None,
        "--drain-s",
        min=0,
        help="On SIGTERM, seconds that requests and streams in flight may take to finish (default: 30).",
        show_default=False,
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: torch's choice).", show_default=False
    ),
    inference_url: str | None = typer.Option(
        None,
        "--inference-url",
        help="Generate on this OpenAI-compatible server (vLLM, SGLang, another dialoop serve) "
        "instead of loading a model here.",
        show_default=False,
    ),
    inference_key: str | None = typer.Option(
        None, "--inference-key", help="The API key of --inference-url.", show_default=False
    ),
) -> None:
    """Serve the web chat and the OpenAI-compatible API (/v1)."""
    import uvicorn

    from dialoop.modeling.loading import ModelLoadError
    from dialoop.serve.logs import configure_logging

    serve_settings = settings().serve
    for knob, value in (("inference_url", inference_url), ("inference_key", inference_key)):
        if value is not None:  # the worker processes read it from the environment
            os.environ[f"DIALOOP_SERVE_{knob.upper()}"] = value
            serve_settings = serve_settings.model_copy(update={knob: value})
    log_format = log_format or serve_settings.log_format
    if log_format not in ("text", "json"):
        console.print(
            f"[red]error:[/red] --log-format must be text or json, not {log_format!r}", highlight=False
        )
        raise typer.Exit(2)
    workers = workers or serve_settings.workers
    drain_s = serve_settings.drain_s if drain_s is None else drain_s
    # the worker processes read these settings from the environment
    os.environ["DIALOOP_SERVE_LOG_FORMAT"] = log_format
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    configure_logging(log_level, log_format, RichHandler(console=console))
    # what create_app is given; the worker processes get the same through DIALOOP_SERVE_APP_ARGS
    app_args: dict[str, Any] = {"database_url": database_url or settings().db_url, "model": model}
    console.print(f"Dialoop on http://{host}:{port}  (OpenAI API: http://{host}:{port}/v1)", highlight=False)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level.lower(),
        "log_config": None,
        "access_log": log_format == "text",  # json: dialoop.access writes one line per request
        "timeout_graceful_shutdown": max(1, round(drain_s)),
        # longer than a proxy's (nginx: 60 s) and a browser's idle keep-alive, so that the server never
        # closes a connection just as the client sends its next request on it
        "timeout_keep_alive": 75,
    }
    if workers == 1:
        import torch

        from dialoop.serve.app import create_app

        if threads is not None:
            torch.set_num_threads(threads)
        try:
            server_app = create_app(
                **app_args, serve_settings=serve_settings.model_copy(update={"log_format": log_format})
            )
        except (OSError, ValueError, LookupError, ModelLoadError) as exc:
            console.print(f"[red]error:[/red] cannot start the server: {exc}", highlight=False)
            raise typer.Exit(1) from exc
        uvicorn.run(server_app, **common)
        return
    # several processes: each counts into one shared metrics directory (dialoop.serve.metrics)
    made_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if made_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dialoop-metrics-")
    os.environ[APP_ARGS_ENV] = json.dumps({**app_args, "log_level": log_level})
    logging.getLogger(__name__).info("starting %d web processes", workers)
    # a process loading its model (importing torch on a busy machine) may not answer the supervisor's ping
    # for a while
    try:
        uvicorn.run(
            "dialoop.cli.serve:app_from_env",
            factory=True,
            workers=workers,
            timeout_worker_healthcheck=180,
            **common,
        )
    finally:
        if made_metrics_dir:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

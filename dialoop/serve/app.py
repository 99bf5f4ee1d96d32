"""The FastAPI app: the store, the generation worker, and one router per domain.

    app = create_app(database_url="sqlite:///dialoop.db", model="path/to/hf-dir")
    uvicorn.run(app)                      # or: dialoop serve --model DIR

Adding a router: write `router = APIRouter(...)` in `dialoop/serve/<domain>.py` (or a package of
routers per domain, like `trainer/` and `admin/`), get what it needs
through the dependencies of `dialoop.serve.deps` (SessionDep, WorkerDep, RegistryDep, ...; access
control as a dependency on the route), and add one `app.include_router(...)` line in
`_include_routers` below. `app.state` holds `engine`, `registry`, `worker` and `serve_settings`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import Depends, FastAPI

from dialoop import __version__
from dialoop.modeling.device import pick_device
from dialoop.serve import (
    admin,
    auth,
    chat,
    health,
    keys_ui,
    metrics,
    openai_api,
    openai_errors,
    pages,
    trainer,
)
from dialoop.serve.body_limit import install_body_limits
from dialoop.serve.error_docs import install_error_docs
from dialoop.serve.models import ModelRegistry
from dialoop.serve.overload import install_overload
from dialoop.serve.remote import RemoteBackend
from dialoop.serve.text import install_value_errors, reject_unstorable_text
from dialoop.serve.worker import GenerationWorker
from dialoop.settings import ServeSettings, settings
from dialoop.store.accounts import has_users
from dialoop.store.db import make_engine, session_scope
from dialoop.store.migrate import upgrade

log = logging.getLogger(__name__)


def _include_routers(app: FastAPI) -> None:
    """Every router of the server; add yours here, one line each."""
    app.include_router(health.router)
    app.include_router(metrics.router)
    # bodies: /v1 up to ServeSettings.max_body_bytes, every other route the app's max_web_body_bytes
    app.include_router(openai_api.router, max_body_size=app.state.serve_settings.max_body_bytes)
    app.include_router(pages.router)
    app.include_router(auth.router)
    app.include_router(chat.router)
    app.include_router(keys_ui.router)
    app.include_router(trainer.router)
    app.include_router(admin.router)
    # keep last: answers unknown /v1 URLs in OpenAI's error shape
    app.include_router(openai_errors.fallback_router)


def _serving_dtype(name: str) -> torch.dtype | None:
    """The dtype models are served in; `auto` is bf16 on a GPU that has it, else fp32 (None)."""
    if name == "auto":
        device = pick_device()
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def create_app(
    *,
    database_url: str | None = None,
    model: str | Path | None = None,
    model_name: str | None = None,
    serve_settings: ServeSettings | None = None,
) -> FastAPI:
    """The server app on the store at `database_url` (upgraded first; default: the settings' store).

    `model` is a directory, a hub id or a registered version name to serve (default: the store's
    served policy version, else the embedded default); `model_name` names it in `/v1/models`.
    """
    serve_settings = serve_settings or settings().serve
    url = database_url or settings().db_url
    upgrade(url)
    # the pool and the request slots of dialoop.serve.overload are sized from one setting
    engine = make_engine(url, connections=serve_settings.db_connections, wait_s=serve_settings.db_wait_s)
    registry = ModelRegistry.open(
        engine,
        model,
        name=model_name,
        max_loaded=serve_settings.max_loaded_models,
        dtype=_serving_dtype(serve_settings.dtype),
    )
    worker: GenerationWorker | RemoteBackend
    if serve_settings.inference_url:  # generation on another server: no model is loaded here
        worker = RemoteBackend(
            serve_settings.inference_url,
            serve_settings.inference_key or None,
            max_queue=serve_settings.max_queue,
            max_batch=serve_settings.max_batch,
            default_max_tokens=serve_settings.default_max_tokens,
        )
    else:
        worker = GenerationWorker(
            registry,
            max_queue=serve_settings.max_queue,
            max_batch=serve_settings.max_batch,
            max_len=serve_settings.max_len,
            prefill_chunk=serve_settings.prefill_chunk,
            max_rows_per_owner=serve_settings.max_rows_per_owner,
            default_max_tokens=serve_settings.default_max_tokens,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with session_scope(engine) as session:
            no_users = not has_users(session)
        if no_users:
            log.warning(
                "The store has no users yet. Create the first admin with: dialoop users add NAME --role admin"
            )
        await worker.start(preload=serve_settings.preload)
        log.info("serving model %s (%s)", registry.served, registry.base.path)
        try:
            yield
        finally:
            jobs = getattr(app.state, "jobs", None)
            if jobs is not None:  # running admin jobs end as `interrupted`, to be resumed after a restart
                await asyncio.to_thread(jobs.shutdown)
            await worker.stop()
            engine.dispose()

    # every route refuses text the store cannot hold (dialoop.serve.text), the same way on every store
    app = FastAPI(
        title="Dialoop",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(reject_unstorable_text)],
        max_body_size=serve_settings.max_web_body_bytes,  # dialoop.serve.body_limit
    )
    app.state.engine = engine
    app.state.registry = registry
    app.state.worker = worker
    app.state.serve_settings = serve_settings
    openai_errors.install_error_handlers(app)
    install_overload(app, serve_settings)
    install_body_limits(app)
    install_value_errors(app)
    pages.install_error_pages(app)
    # outermost: counts, times and (with log_format json) logs every request, 413s and 503s included
    app.add_middleware(metrics.RequestObserver, access_log=serve_settings.log_format == "json")
    _include_routers(app)
    install_error_docs(app)
    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on uvicorn in a thread (tests, benchmarks, the demo); yields its base URL.

    Port 0 picks a free port. The server has started (model loaded) when the URL is yielded.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", log_config=None, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="dialoop-uvicorn", daemon=True
    )
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start (see the log)")
            time.sleep(0.02)
        bound = sock.getsockname()[1]
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()

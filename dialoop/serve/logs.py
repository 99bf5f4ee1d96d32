"""Server logging: text for a terminal, or one JSON object a line (`--log-format json`) for collectors.

    configure_logging("info", "json")      # every record as JSON on stderr
    log_request(method="GET", route="/chat", path="/chat", status=200, duration_s=0.012, request_id="…")

In JSON each request is one line from the logger `dialoop.access`:
`{"ts": ..., "level": "info", "logger": "dialoop.access", "message": "GET /chat 200", "method": "GET",
"route": "/chat", "path": "/chat", "status": 200, "duration_ms": 12.0, "request_id": "…", "client": "…"}`.
The request id is the request's `X-Request-ID` when it sends a sane one, else a new one; the response
carries it back in `X-Request-ID` (`dialoop.serve.metrics.RequestObserver`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

access_log = logging.getLogger("dialoop.access")

REQUEST_FIELDS = ("method", "route", "path", "status", "duration_ms", "request_id", "client")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(sent: str | None) -> str:
    """The client's request id when it is a plain token of at most 64 characters, else a new one."""
    return sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, request fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str, text_handler: logging.Handler | None = None) -> None:
    """The root logger at `level`, writing JSON lines to stderr (`json`) or through `text_handler`."""
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = text_handler or logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers go through the root's handler; its access log is replaced by dialoop.access
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on every start


def log_request(
    *, method: str, route: str, path: str, status: int, duration_s: float, request_id: str, client: str
) -> None:
    """One line for one request (level info; 5xx at warning)."""
    fields = {
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 1),
        "request_id": request_id,
        "client": client,
    }
    level = logging.WARNING if status >= 500 else logging.INFO
    access_log.log(level, "%s %s %d %.1f ms", method, path, status, duration_s * 1000, extra=fields)

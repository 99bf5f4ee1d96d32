"""Text the store cannot hold, refused at the edge: NUL characters and unpaired UTF-16 surrogates.

PostgreSQL rejects NUL in text columns (SQLite keeps it), and a lone surrogate (`"\\ud800"` in JSON) has
no UTF-8 form, so the tokenizer, the store and every JSON answer that echoes it fail. One app-wide
dependency, `reject_unstorable_text`, checks every string a request carries (JSON body, form fields,
query and path parameters) before a route runs, so both stores and every API behave alike: such a
request is a validation error (422 on the web routes, 400 in OpenAI's shape on /v1), which names where
the text is and never echoes it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

Loc = tuple[str | int, ...]

UNSTORABLE = "text must not contain NUL characters or unpaired surrogates"


def is_storable(text: str) -> bool:
    """False when `text` holds a NUL or a surrogate (only an unpaired one survives JSON decoding)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")  # strict UTF-8 refuses surrogates, in C: a scan per character is slow
    except UnicodeEncodeError:
        return False
    return True


def printable(value: Any) -> Any:
    """`value` with every string made UTF-8 encodable (unpaired surrogates become `?`), for error answers."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    return value


def _strings(value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    """Every string in a decoded JSON value (keys included), with where it is."""
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield loc, key
            yield from _strings(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*loc, i))


async def _request_strings(request: Request) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    for kind, params in (("path", request.path_params), ("query", request.query_params)):
        found += [((kind, str(k)), str(v)) for k, v in params.items()]
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        # the body is cached, and a route with a body parameter has decoded it already (else: 400/422);
        # one that is not JSON reaches a route that reads no body, which stores nothing from it
        with contextlib.suppress(ValueError):
            found += _strings(json.loads(await request.body()), ("body",))
    elif content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()  # cached: the route reads the same parsed form
        found += [(("body", k), v) for k, v in form.multi_items() if isinstance(v, str)]
    return found


async def reject_unstorable_text(request: Request) -> None:
    """A validation error when any string of the request is not storable (see the module's doc)."""
    errors = [
        {"type": "unstorable_text", "loc": loc, "msg": UNSTORABLE, "input": None}
        for loc, text in await _request_strings(request)
        if not is_storable(text)
    ]
    if errors:
        raise RequestValidationError(errors)

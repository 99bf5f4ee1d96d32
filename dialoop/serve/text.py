"""Values the store cannot hold, refused at the edge: NUL characters and unpaired UTF-16 surrogates in
text, integers outside 64 bits.

PostgreSQL rejects NUL in text columns (SQLite keeps it), and a lone surrogate (`"\\ud800"` in JSON) has
no UTF-8 form, so the tokenizer, the store and every JSON answer that echoes it fail. One app-wide
dependency, `reject_unstorable_text`, checks every string a request carries (JSON body, form fields,
query and path parameters) before a route runs, so both stores and every API behave alike: such a
request is a validation error (422 on the web routes, 400 in OpenAI's shape on /v1), which names where
the text is and never echoes it. Integers are the same: every column holds at most a signed 64-bit
integer (SQLite raises OverflowError past it, PostgreSQL an out-of-range error), so an integer of a JSON
body outside that range is refused alike; a path or query parameter a route takes as `int` is an id,
32 bits on PostgreSQL, and is refused past that range on both stores. `install_value_errors` answers
what still reaches the store out of a column's range (a 32-bit id in a JSON body on PostgreSQL) 422.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DataError

Loc = tuple[str | int, ...]

UNSTORABLE = "text must not contain NUL characters or unpaired surrogates"
INT64 = range(-(2**63), 2**63)  # any integer the store holds
INT32 = range(-(2**31), 2**31)  # an id (PostgreSQL's `integer` columns)


def out_of_range(allowed: range) -> str:
    return f"integer out of range ({allowed.start} to {allowed.stop - 1})"


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


def _values(value: Any, loc: Loc) -> Iterator[tuple[Loc, str | int]]:
    """Every string and integer in a decoded JSON value (keys included), with where it is."""
    if isinstance(value, str | int) and not isinstance(value, bool):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield loc, key
            yield from _values(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _values(item, (*loc, i))


class IntParam(int):
    """An integer path or query parameter: an id, held in a 32-bit column on PostgreSQL."""


def _range(value: int) -> range:
    # test membership with int(value): `in` scans a range item by item for a subclass of int
    return INT32 if isinstance(value, IntParam) else INT64


def _int_params(dependant: Any) -> Iterator[str]:
    """The names of the path and query parameters that the route (or a dependency of it) takes as `int`."""
    for param in [*dependant.path_params, *dependant.query_params]:
        annotation = param.field_info.annotation
        if annotation is int or int in getattr(annotation, "__args__", ()):
            yield param.alias
    for sub in dependant.dependencies:
        yield from _int_params(sub)


async def _request_values(request: Request) -> list[tuple[Loc, str | int]]:
    found: list[tuple[Loc, str | int]] = []
    for kind, params in (("path", request.path_params), ("query", request.query_params)):
        found += [((kind, str(k)), str(v)) for k, v in params.items()]
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for name in set(_int_params(dependant)) if dependant is not None else ():
        for kind, params in (("path", request.path_params), ("query", request.query_params)):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                found.append(((kind, name), IntParam(params[name])))
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        # the body is cached, and a route with a body parameter has decoded it already (else: 400/422);
        # one that is not JSON reaches a route that reads no body, which stores nothing from it
        with contextlib.suppress(ValueError):
            found += _values(json.loads(await request.body()), ("body",))
    elif content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()  # cached: the route reads the same parsed form
        found += [(("body", k), v) for k, v in form.multi_items() if isinstance(v, str)]
    return found


async def reject_unstorable_text(request: Request) -> None:
    """A validation error when any string of the request is not storable (see the module's doc)."""
    errors = [
        {"type": "unstorable_text", "loc": loc, "msg": UNSTORABLE, "input": None}
        if isinstance(value, str)
        else {"type": "int_out_of_range", "loc": loc, "msg": out_of_range(_range(value)), "input": None}
        for loc, value in await _request_values(request)
        if not (is_storable(value) if isinstance(value, str) else int(value) in _range(value))
    ]
    if errors:
        raise RequestValidationError(errors)


async def _store_range_error(request: Request, exc: Exception) -> Response:
    """A value the store's column cannot hold (PostgreSQL's out-of-range error, SQLite's OverflowError)."""
    message = "a value is out of the range the store holds"
    error = {"type": "out_of_range", "loc": ["body"], "msg": message, "input": None}
    handler = request.app.exception_handlers[RequestValidationError]
    answer: Response = await handler(request, RequestValidationError([error]))
    return answer


def install_value_errors(app: FastAPI) -> None:
    """422 (400 on /v1) instead of a 500 for an integer the store's column cannot hold."""
    app.add_exception_handler(DataError, _store_range_error)
    app.add_exception_handler(OverflowError, _store_range_error)

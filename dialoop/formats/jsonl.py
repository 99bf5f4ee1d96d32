"""JSON Lines, plain or gzipped: strict reading with `FILE:LINE: reason` errors, deterministic writing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")

GZIP_MAGIC = b"\x1f\x8b"


class FormatError(ValueError):
    """A file that does not hold what its format promises; `str()` is `FILE:LINE: reason`."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}")


class NotRepresentable(ValueError):
    """A stored record that a format cannot express (e.g. a system prompt in HH-RLHF); export skips it."""


def dumps(value: Any) -> str:
    """The one JSON serialisation of every file Dialoop writes (UTF-8 text, keys in the order given)."""
    return json.dumps(value, ensure_ascii=False)


def content_hash(value: Any) -> str:
    """SHA-256 of a canonical JSON form of `value` (sorted keys, no spaces)."""
    canonical = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_lines(path: str | Path, parse: Callable[[Any], R]) -> list[tuple[int, R]]:
    """Every non-blank line of `path` (gzip detected by its magic bytes) parsed by `parse`, with its line
    number; the first bad line raises `FormatError` naming it."""
    path = Path(path)
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
    except OSError as exc:
        raise FormatError(path, 0, f"cannot read: {exc.strerror or exc}") from exc
    records: list[tuple[int, R]] = []
    lineno = 0
    with gzip.open(path, "rb") if gzipped else path.open("rb") as stream:
        try:
            for lineno, raw_line in enumerate(stream, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise FormatError(path, lineno, f"not UTF-8 ({exc.reason})") from exc
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(path, lineno, f"invalid JSON: {exc.msg} at column {exc.colno}") from exc
                try:
                    records.append((lineno, parse(value)))
                except (ValueError, TypeError) as exc:
                    raise FormatError(path, lineno, str(exc)) from exc
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise FormatError(path, lineno + 1, f"corrupt gzip data: {exc}") from exc
    return records


def write_lines(path: str | Path, values: Iterable[Any]) -> int:
    """Write one JSON value per line, atomically (temp file + rename); a `.gz` path is gzipped with a fixed
    header so that equal contents give equal bytes. Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            # mtime=0 and no file name in the header: a gzip file's bytes depend on its contents only
            sink = (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.suffix == ".gz" else raw
            )
            with io.TextIOWrapper(sink, encoding="utf-8", newline="\n") as text:
                for value in values:
                    text.write(dumps(value))
                    text.write("\n")
                    count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count

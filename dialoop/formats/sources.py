"""Where a format's records come from: a JSON Lines file (plain or gzipped), a Parquet file, a dataset saved
with `datasets`' `save_to_disk`, or a Hugging Face hub dataset id (when online). Every source gives rows of
the same shape, so one format reads them all; `detect_format` tells the format from a source's columns.

Rows of a table keep only their non-null columns: Arrow fills a column one row lacks with null, and an
absent optional key (`ties`, `all_bad`) is what the formats expect then.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dialoop.formats.jsonl import GZIP_MAGIC, FormatError, parse_lines

R = TypeVar("R")

JSONL_SUFFIXES = (".jsonl", ".json", ".gz", ".ndjson")
PARQUET_SUFFIX = ".parquet"

# the format of a row, from the columns it has (the first match wins): ours, then TRL's and the hub's
FORMAT_COLUMNS: tuple[tuple[str, frozenset[str]], ...] = (
    ("messages", frozenset({"messages"})),
    ("rankings", frozenset({"prompt", "completions", "ranking"})),
    ("pairs", frozenset({"prompt", "chosen", "rejected"})),
    ("oasst", frozenset({"message_tree_id", "prompt"})),
    ("hh-rlhf", frozenset({"chosen", "rejected"})),
)


def _kind(source: Path) -> str:
    """jsonl, parquet, disk (a `save_to_disk` dir) or hub."""
    if source.is_dir():
        return "disk"
    if source.suffix == PARQUET_SUFFIX:
        return "parquet"
    if source.exists() or source.suffix in JSONL_SUFFIXES or source.is_absolute():
        return "jsonl"
    return "hub"


def _one_split(dataset: Any, source: Path) -> Any:
    """The `train` split of a dataset dict (or its only split); a plain dataset as it is."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    if "train" in dataset:
        return dataset["train"]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise FormatError(source, 0, f"several splits ({', '.join(dataset)}) and none is called 'train'")


def _table(source: Path, kind: str) -> Any:
    """A Parquet file, a saved dataset or a hub dataset, as a pyarrow table or a `datasets.Dataset` (both
    have `column_names`)."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(source)
        if kind == "disk":
            from datasets import load_from_disk

            return _one_split(load_from_disk(str(source)), source)
        from datasets import load_dataset

        return _one_split(load_dataset(str(source)), source)
    except FormatError:
        raise
    except Exception as exc:  # pyarrow's, datasets' and the hub's many errors: the source is unreadable
        where = {
            "parquet": "cannot read this Parquet file",
            "disk": "cannot read this directory as a dataset saved with `save_to_disk`",
            "hub": "no such file here, and the Hugging Face hub cannot load it as a dataset id",
        }[kind]
        raise FormatError(source, 0, f"{where}: {type(exc).__name__}: {exc}") from exc


def _table_rows(table: Any) -> list[dict[str, Any]]:
    """The rows of a table, null columns left out."""
    rows = table.to_pylist() if hasattr(table, "to_pylist") else table.to_list()
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def parse_source(source: str | Path, parse: Callable[[Any], R]) -> list[tuple[int, R]]:
    """Every row of `source` parsed by `parse`, with its line (JSONL) or row number (tables, from 1); the
    first bad one raises `FormatError` naming it."""
    source = Path(source)
    kind = _kind(source)
    if kind == "jsonl":
        return parse_lines(source, parse)
    records = []
    for number, row in enumerate(_table_rows(_table(source, kind)), start=1):
        try:
            records.append((number, parse(row)))
        except (ValueError, TypeError) as exc:
            raise FormatError(source, 0, f"row {number}: {exc}") from exc
    return records


def _first_jsonl_keys(source: Path) -> list[str]:
    import gzip

    try:
        with source.open("rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
        with gzip.open(source, "rt", encoding="utf-8") if gzipped else source.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise FormatError(source, lineno, f"invalid JSON: {exc.msg}") from exc
                    return list(value) if isinstance(value, dict) else []
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(source, 0, f"cannot read: {exc}") from exc
    return []


def detect_format(source: str | Path) -> str:
    """The format of `source`, told from the keys of its first line or the columns of its table."""
    source = Path(source)
    kind = _kind(source)
    keys = _first_jsonl_keys(source) if kind == "jsonl" else list(_table(source, kind).column_names)
    for name, columns in FORMAT_COLUMNS:
        if columns <= set(keys):
            return name
    shown = ", ".join(keys) if keys else "none"
    raise FormatError(
        source,
        0,
        f"cannot tell its format from its columns ({shown}): expected messages; prompt, chosen, rejected; "
        "prompt, completions, ranking; chosen, rejected (hh-rlhf); or an oasst tree. Pass --format",
    )

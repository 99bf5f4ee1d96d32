"""Import and export of conversations and preference data, and the datasets training reads."""

from dialoop.formats.datasets import (
    chat_examples_from_store,
    ranking_examples_from_store,
    read_chat_examples,
    read_ranking_examples,
    snapshot_hash,
)
from dialoop.formats.jsonl import FormatError
from dialoop.formats.registry import FORMATS, get_format
from dialoop.formats.store_io import SOURCES, ExportResult, ImportResult, export_file, import_file

__all__ = [
    "FORMATS",
    "SOURCES",
    "ExportResult",
    "FormatError",
    "ImportResult",
    "chat_examples_from_store",
    "export_file",
    "get_format",
    "import_file",
    "ranking_examples_from_store",
    "read_chat_examples",
    "read_ranking_examples",
    "snapshot_hash",
]

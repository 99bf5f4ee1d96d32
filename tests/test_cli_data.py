"""`dialoop import` and `dialoop export`: counts, FILE:LINE errors with exit code 2, nothing half-done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner, Result

from dialoop.cli import app
from dialoop.store import Conversation, make_engine, session_scope

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def dialoop(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def store(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DIALOOP_DATABASE_URL", sqlite_url)
    return sqlite_url


def stats() -> dict[str, int]:
    result = dialoop("stats", "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_import_prints_counts_and_export_writes_the_file(store: str, tmp_path: Path) -> None:
    result = dialoop("import", "--format", "pairs", DATA / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    assert "imported 8 of 8 pairs records" in result.stdout
    assert "8 comparison tasks, 8 rankings" in result.stdout
    again = dialoop("import", "--format", "pairs", DATA / "pairs.jsonl")
    assert (
        again.exit_code == 0
        and "imported 0 of 8 pairs records" in again.stdout
        and "(8 already" in again.stdout
    )
    out = tmp_path / "out" / "pairs.jsonl.gz"
    result = dialoop("export", "--format", "pairs", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote 8 pairs lines to {out}" in result.stdout
    assert stats()["comparison_tasks"] == 8


def test_a_malformed_seventh_line_names_it_exits_2_and_changes_nothing(store: str, tmp_path: Path) -> None:
    assert dialoop("import", "--format", "rankings", DATA / "rankings.jsonl").exit_code == 0
    before = stats()
    lines = (DATA / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][:-1]  # the JSON object of line 7 is never closed
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = dialoop("import", "--format", "pairs", bad)
    assert result.exit_code == 2
    assert f"{bad}:7: invalid JSON" in result.stderr
    assert stats() == before


def test_parquet_and_saved_datasets_import_with_the_format_told_from_their_columns(
    store: str, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    demos = [json.loads(line) for line in (DATA / "messages.jsonl").read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(demos), tmp_path / "demos.parquet")
    result = dialoop("import", "--kind", "demonstration", tmp_path / "demos.parquet")
    assert result.exit_code == 0, result.output
    assert f"imported {len(demos)} of {len(demos)} messages records" in result.stdout
    plain = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "No."} for w in ("amber", "teal")]
    Dataset.from_list(plain).save_to_disk(str(tmp_path / "prefs"))
    result = dialoop("import", tmp_path / "prefs")
    assert result.exit_code == 0, result.output
    assert "imported 2 of 2 pairs records" in result.stdout and "2 rankings" in result.stdout
    pq.write_table(pa.Table.from_pylist([{"question": "Q?"}]), tmp_path / "qa.parquet")
    result = dialoop("import", tmp_path / "qa.parquet")
    assert result.exit_code == 2 and "cannot tell its format from its columns (question)" in result.stderr


def test_source_name_and_kind(store: str) -> None:
    args = ("import", "--format", "messages", "--kind", "demonstration", "--source-name", "seed-demos")
    assert dialoop(*args, DATA / "messages.jsonl").exit_code == 0
    engine = make_engine(store)
    with session_scope(engine) as s:
        assert set(s.execute(select(Conversation.kind, Conversation.source)).all()) == {
            ("demonstration", "seed-demos")
        }
    engine.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("import", "--format", "csv", DATA / "pairs.jsonl"), "unknown format 'csv'"),
        (("import", "--format", "pairs", DATA / "missing.jsonl"), "missing.jsonl: cannot read"),
        (("import", "--format", "pairs", "--kind", "robot", DATA / "pairs.jsonl"), "unknown kind 'robot'"),
        (("import", "--format", "pairs", "--kind", "demonstration", DATA / "pairs.jsonl"), "always of kind"),
        (("import", "--format", "pairs", "--source-name", "x" * 40, DATA / "pairs.jsonl"), "1-32 characters"),
        (("export", "--format", "messages", "--out", "m.jsonl", "--source", "feedback"), "holds preferences"),
        (
            ("export", "--format", "pairs", "--out", "p.jsonl", "--source", "robots"),
            "unknown source 'robots'",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message(store: str, args: tuple[str | Path, ...], message: str) -> None:
    result = dialoop(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert stats()["conversations"] == 0

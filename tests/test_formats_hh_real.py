"""The real HH-RLHF harmless-base dev split through `dialoop import` / `stats` / `export` (SQLite only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.formats.hh_rlhf import REPLY_PREFIX, render, split_turns
from dialoop.store import Candidate, Ranking, make_engine, session_scope

HH_DEV = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"
runner = CliRunner()


@pytest.mark.slow
@pytest.mark.skipif(not HH_DEV.exists(), reason=f"the HH-RLHF data is not at {HH_DEV}")
def test_hh_rlhf_dev_imports_as_1600_pairs_and_exports_them_back(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIALOOP_DATABASE_URL", sqlite_url)
    result = runner.invoke(app, ["import", "--format", "hh-rlhf", str(HH_DEV)])
    assert result.exit_code == 0, result.output
    counts = json.loads(runner.invoke(app, ["stats", "--json"]).stdout)
    assert (counts["comparison_tasks"], counts["rankings"], counts["conversations"]) == (1600, 1600, 1600)
    engine = make_engine(sqlite_url)
    with session_scope(engine) as s:
        for row, expected in ((Candidate, 2), (Ranking, 1)):
            per_task = s.scalars(select(func.count()).select_from(row).group_by(row.task_id)).all()
            assert len(per_task) == 1600 and set(per_task) == {expected}
        assert set(map(tuple, s.scalars(select(Ranking.order)))) == {(0, 1)}
    engine.dispose()

    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["export", "--format", "pairs", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pairs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    source = [json.loads(x) for x in gzip.decompress(HH_DEV.read_bytes()).decode().splitlines()]
    assert len(pairs) == len(source) == 1600
    last_turn = 0
    for pair, line in zip(pairs, source, strict=True):
        context = render(pair["prompt"])
        assert context + REPLY_PREFIX + pair["chosen"][0]["content"] == line["chosen"]
        assert context + REPLY_PREFIX + pair["rejected"][0]["content"] == line["rejected"]
        chosen_last, rejected_last = (
            split_turns(line["chosen"], "c")[-1],
            split_turns(line["rejected"], "r")[-1],
        )
        if (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == (
            chosen_last["content"],
            rejected_last["content"],
        ):
            last_turn += 1
    assert last_turn == 1595  # the other 5 differ before the last turn: their replies hold 2 turns

    back = tmp_path / "hh.jsonl"
    assert runner.invoke(app, ["export", "--format", "hh-rlhf", "--out", str(back)]).exit_code == 0
    assert back.read_bytes() == gzip.decompress(HH_DEV.read_bytes())  # the source, byte for byte

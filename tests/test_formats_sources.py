"""`--data` sources beyond JSON Lines: Parquet files and `datasets` saved with `save_to_disk`, in TRL's
conversational and standard formats and ours; the format told from the columns; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from dialoop.formats import FormatError, read_chat_examples, read_ranking_examples
from dialoop.formats.sources import detect_format
from dialoop.records import ChatExample, RankingExample

DATA = Path(__file__).parent / "data"
Q = {"role": "user", "content": "Name a colour."}
SYSTEM = {"role": "system", "content": "Be brief."}

MESSAGES = [
    {"messages": [Q, {"role": "assistant", "content": "Amber."}]},
    {"messages": [SYSTEM, Q, {"role": "assistant", "content": "Teal."}]},
]
PAIRS = [  # TRL's conversational preference format
    {
        "prompt": [Q],
        "chosen": [{"role": "assistant", "content": "Amber."}],
        "rejected": [{"role": "assistant", "content": "I like cars."}],
    }
]
PLAIN_PAIRS = [  # TRL's standard (plain text) preference format
    {"prompt": "Name a colour.", "chosen": "Amber.", "rejected": "I like cars."},
    {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "Blue."},
]
RANKINGS = [  # ours: K-way, optional keys absent on one row
    {
        "prompt": [Q],
        "completions": [[{"role": "assistant", "content": c}] for c in ("Amber.", "Red, I think.", "Cars.")],
        "ranking": [0, 1, 2],
        "ties": [[1, 2]],
        "all_bad": False,
    },
    {
        "prompt": [Q],
        "completions": [[{"role": "assistant", "content": c}] for c in ("Blue.", "Dogs.")],
        "ranking": [0, 1],
    },
]


def parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def saved(rows: list[dict], path: Path, split: str | None = None) -> Path:
    dataset = Dataset.from_list(rows)
    (DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(path))
    return path


def jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(params=["parquet", "save_to_disk", "jsonl"])
def write(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    def writer(rows: list[dict], name: str) -> Path:
        if request.param == "parquet":
            return parquet(rows, tmp_path / f"{name}.parquet")
        if request.param == "save_to_disk":
            return saved(rows, tmp_path / name)
        return jsonl(rows, tmp_path / f"{name}.jsonl")

    return writer


def test_messages_are_read_and_told_from_their_column(write) -> None:  # type: ignore[no-untyped-def]
    source = write(MESSAGES, "sft")
    assert detect_format(source) == "messages"
    assert read_chat_examples(source) == [ChatExample(messages=r["messages"]) for r in MESSAGES]


def test_trl_pairs_as_messages_and_as_plain_text_are_the_same_rankings(write) -> None:  # type: ignore[no-untyped-def]
    conversational, plain = write(PAIRS, "pairs"), write(PLAIN_PAIRS, "plain")
    assert detect_format(conversational) == detect_format(plain) == "pairs"
    expected = RankingExample(prompt=[Q], completions=["Amber.", "I like cars."], ranking=[0, 1])
    assert read_ranking_examples(conversational) == [expected]
    first, second = read_ranking_examples(plain)
    assert first == expected
    assert second.prompt == [{"role": "user", "content": "Name a fruit."}]
    assert second.completions == ["A pear.", "Blue."]
    # SFT on a preference source: each prompt with its chosen reply
    assert read_chat_examples(plain)[1].messages[-1] == {"role": "assistant", "content": "A pear."}


def test_k_way_rankings_keep_ties_and_absent_optional_columns(write) -> None:  # type: ignore[no-untyped-def]
    source = write(RANKINGS, "rankings")
    assert detect_format(source) == "rankings"
    first, second = read_ranking_examples(source)
    assert first.completions == ["Amber.", "Red, I think.", "Cars."] and first.ties == [(1, 2)]
    assert second.ranking == [0, 1] and second.ties == [] and not second.all_bad


def test_the_repository_fixtures_are_told_apart() -> None:
    for name, fmt in [
        ("messages", "messages"),
        ("pairs", "pairs"),
        ("rankings", "rankings"),
        ("hh_rlhf", "hh-rlhf"),
        ("oasst", "oasst"),
    ]:
        assert detect_format(DATA / f"{name}.jsonl") == fmt


def test_a_saved_dataset_dict_gives_its_train_split_or_its_only_one(tmp_path: Path) -> None:
    source = saved(MESSAGES, tmp_path / "only", split="validation")
    assert len(read_chat_examples(source)) == 2
    both = DatasetDict({"test": Dataset.from_list(MESSAGES[:1]), "train": Dataset.from_list(MESSAGES)})
    both.save_to_disk(str(tmp_path / "both"))
    assert len(read_chat_examples(tmp_path / "both", "messages")) == 2
    several = DatasetDict({"a": Dataset.from_list(MESSAGES), "b": Dataset.from_list(MESSAGES)})
    several.save_to_disk(str(tmp_path / "several"))
    with pytest.raises(FormatError, match=r"several splits \(a, b\) and none is called 'train'"):
        read_chat_examples(tmp_path / "several", "messages")


def test_a_bad_row_names_the_source_and_row(tmp_path: Path) -> None:
    two_replies = [{"role": "assistant", "content": "A."}, {"role": "assistant", "content": "B."}]
    rows = [*PAIRS, {**PAIRS[0], "rejected": two_replies}]
    source = parquet(rows, tmp_path / "bad.parquet")
    with pytest.raises(FormatError) as caught:
        read_ranking_examples(source, "pairs")
    assert (
        str(caught.value) == f"{source}: row 2: rejected must be a list holding exactly one assistant message"
    )


def test_unknown_columns_ask_for_a_format(tmp_path: Path) -> None:
    source = parquet([{"question": "Q?", "answer": "A."}], tmp_path / "qa.parquet")
    with pytest.raises(FormatError, match=r"qa.parquet: cannot tell its format from its columns \(question"):
        detect_format(source)
    with pytest.raises(FormatError, match="cannot read this Parquet file"):
        read_chat_examples(jsonl(MESSAGES, tmp_path / "not.parquet"), "messages")


def test_a_hub_id_goes_to_datasets_and_its_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # no network here: offline, datasets answers at once (the flags are read when the packages load)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FormatError) as caught:
        read_chat_examples("no-such-org/no-such-dataset", "messages")
    message = str(caught.value)
    assert message.startswith("no-such-org/no-such-dataset: no such file here, and the Hugging Face hub")


@pytest.mark.slow
def test_train_reads_a_saved_dataset_and_a_parquet_file_without_a_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from dialoop.cli import app

    tiny = ["--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--precision", "fp32"]
    tiny += ["--no-progress", "--checkpoint-every", "0"]
    prefs = saved(PLAIN_PAIRS * 4, tmp_path / "prefs")  # TRL's plain-text pairs, as save_to_disk writes them
    args = ["train", "rm", "--data", prefs, "--sft", tiny_model_dir, "--out", tmp_path / "rm", *tiny]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["steps"] == 1

    demos = parquet(MESSAGES, tmp_path / "demos.parquet")
    args = ["train", "sft", "--data", demos, "--model", tiny_model_dir, "--out", tmp_path / "sft", *tiny]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["rows"] == 2

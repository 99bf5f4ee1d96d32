"""`--report-to`: the run's metrics go to accelerate's trackers (TensorBoard, W&B offline, MLflow on a local
file store) as well as to `metrics.jsonl`, and a resumed run logs to the same W&B and MLflow run."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dialoop.cli import app
from dialoop.run_metrics import read_metrics
from dialoop.train.common import CONFIG_FILE
from dialoop.train.metrics import TRACKER_IDS_FILE, MetricsLogger

LOSSES = [2.5, 2.0, 1.25]


def log_run(run_dir: Path, steps: range) -> None:
    with MetricsLogger(run_dir, total_steps=3, start_step=steps.start, progress=False) as log:
        for step in steps:
            log.log(step + 1, {"loss": LOSSES[step], "lr": 1e-3, "note": "text is not a scalar"})
        log.log(steps.stop, {"accuracy": 0.75}, kind="eval")


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` file (W&B keeps no summary file offline): a 7-byte header, then
    LevelDB-style chunks (crc, length, type: 1 whole, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """The logged rows by step, and the config, of every offline W&B run in `run_dir`."""
    rows: dict[int, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                rows[row["_step"]] = row
            elif kind in ("config", "run"):  # wandb.init's config comes with the run record
                updates = record.config.update if kind == "config" else record.run.config.update
                for update in updates:
                    value = json.loads(update.value_json)
                    config[update.key] = value.get("value", value) if isinstance(value, dict) else value
    return rows, config


def tensorboard_losses(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_tensorboard_is_the_default_and_none_writes_only_the_jsonl(tmp_path: Path) -> None:
    default = tmp_path / "default"
    log_run(default, range(3))
    assert tensorboard_losses(default) == [(1, 2.5), (2, 2.0), (3, 1.25)]
    assert [r["loss"] for r in read_metrics(default) if r["kind"] == "train"] == LOSSES

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    (quiet / CONFIG_FILE).write_text(json.dumps({"report_to": "none"}))
    log_run(quiet, range(3))
    assert not (quiet / "tensorboard").exists()
    assert [r["loss"] for r in read_metrics(quiet) if r["kind"] == "train"] == LOSSES


@pytest.mark.slow
def test_wandb_offline_gets_the_metrics_and_a_resumed_run_keeps_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps({"report_to": "wandb,tensorboard", "lr": 1e-3}))
    log_run(run_dir, range(2))  # killed after step 2...
    run_id = json.loads((run_dir / TRACKER_IDS_FILE).read_text())["wandb"]
    log_run(run_dir, range(2, 3))  # ...and resumed
    assert json.loads((run_dir / TRACKER_IDS_FILE).read_text())["wandb"] == run_id
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # both parts of the run, under one id, for `wandb sync`
    # W&B's service writes the offline files in the background: wait (up to a minute) for the last row
    deadline = time.monotonic() + 60
    while 3 not in (rows := wandb_history(run_dir)[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    rows, config = wandb_history(run_dir)
    assert {step: row["train/loss"] for step, row in rows.items()} == {1: 2.5, 2: 2.0, 3: 1.25}
    assert rows[3]["eval/accuracy"] == 0.75 and rows[3]["train/lr"] == 1e-3
    assert not any("train/note" in row for row in rows.values())
    assert config["report_to"] == "wandb,tensorboard" and config["lr"] == 1e-3
    assert tensorboard_losses(run_dir) == [(1, 2.5), (2, 2.0), (3, 1.25)]


@pytest.mark.slow
def test_mlflow_on_a_local_file_store_gets_every_step_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database; a folder is simpler
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps({"report_to": "mlflow", "seed": 3}))
    log_run(run_dir, range(2))
    log_run(run_dir, range(2, 3))
    run_id = json.loads((run_dir / TRACKER_IDS_FILE).read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0), (3, 1.25)]
    run = client.get_run(run_id)
    assert run.data.params["seed"] == "3" and run.info.run_name == "run"
    assert not (run_dir / "tensorboard").exists()


def test_an_unknown_tracker_is_refused_before_training(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "sft", "--report-to", "tensorboard,comet", "--out", tmp_path])
    assert result.exit_code == 2
    assert "unknown tracker 'comet'" in result.output

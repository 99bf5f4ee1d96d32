"""The README's "Everyday commands" run as written, in order, on a tiny model in a fresh DIALOOP_HOME.

Each command is the README's line with tiny-budget flags appended (the tiny model where a command would
load the embedded default, a step or two of training, a free port); `dialoop serve` runs as a subprocess
until it answers /v1/models.
"""

from __future__ import annotations

import gzip
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dialoop.cli import app

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[1] / "README.md"
DATA = Path(__file__).parent / "data"
VENV_BIN = Path(sys.executable).parent


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Everyday commands" block, as argument lists without `dialoop`."""
    text = README.read_text()
    section = text.split("## Everyday commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert all(c[0] == "dialoop" for c in commands), commands
    return [c[1:] for c in commands]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_budget(command: list[str], tiny_model: Path, port: int) -> list[str]:
    """The flags appended to a README command so that it runs in seconds."""
    fast = ["--no-progress", "--precision", "fp32", "--checkpoint-every", "0"]
    match command[:2]:
        case ["train", "sft"]:
            return ["--model", str(tiny_model), "--max-steps", "2", "--batch-size", "2", *fast]
        case ["train", "rm"]:
            return ["--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", *fast]
        case ["train", "ppo"]:
            tiny = ["--max-steps", "1", "--batch-size", "2", "--mini-batch-size", "2"]
            return [*tiny, "--max-new-tokens", "4", *fast]
        case ["serve", *_]:
            return ["--port", str(port), "--threads", "1", "--log-level", "warning"]
        case ["bench", "ppo"]:
            tiny = ["--model", str(tiny_model), "--warmup", "0", "--steps", "1", "--batch", "2"]
            return [*tiny, "--mini-batch", "2", "--new-tokens", "4", "--threads", "1", "--precision", "fp32"]
    return []


def _serve_until_it_answers(command: list[str], api_key: str, port: int) -> list[dict]:
    """Start `dialoop serve ...`, wait for /v1/models, stop it; returns the models it lists."""
    proc = subprocess.Popen(
        [str(VENV_BIN / "dialoop"), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "dialoop serve did not answer within 120 s"
            try:
                reply = httpx.get(
                    f"http://127.0.0.1:{port}/v1/models",
                    headers={"Authorization": f"Bearer {api_key}"},
                    timeout=5,
                )
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            assert reply.status_code == 200, reply.text
            return list(reply.json()["data"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.timeout(900)
def test_the_everyday_commands_run_as_written(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(DATA / "messages.jsonl", "demos.jsonl")
    with gzip.open("data.jsonl.gz", "wb") as f:
        f.write((DATA / "hh_rlhf.jsonl").read_bytes())
    runner = CliRunner()
    port = _free_port()
    commands = readme_commands()
    assert [c[:2] for c in commands] == [
        ["users", "add"],
        ["import", "--format"],
        ["import", "--format"],
        ["export", "--format"],
        ["stats", "--json"],
        ["train", "sft"],
        ["train", "rm"],
        ["train", "ppo"],
        ["serve", "--model"],
        ["bench", "ppo"],
    ]
    api_key = ""
    for command in commands:
        args = [*command, *_tiny_budget(command, tiny_model_dir, port)]
        if command[0] == "serve":
            models = _serve_until_it_answers(args, api_key, port)
            assert any(m["served"] for m in models), models
            continue
        result = runner.invoke(app, args, input="a password\n")
        assert result.exit_code == 0, (args, result.output)
        if command[:2] == ["users", "add"]:  # the API key `dialoop serve` is asked with
            created = runner.invoke(app, ["keys", "create", command[2]])
            assert created.exit_code == 0, created.output
            api_key = created.stdout.strip().splitlines()[-1]
        if command[:2] == ["stats", "--json"]:
            stats = json.loads(result.stdout)
            assert stats, result.stdout

    for run in ("runs/sft", "runs/rm", "runs/policy"):
        assert (tmp_path / run / "config.json").exists(), run
    assert (tmp_path / "pairs.jsonl").read_text().strip()

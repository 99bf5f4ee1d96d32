"""Atomic checkpoints with exact resume: model, optimizer, registered objects, per-process RNG, counters.

Layout: `RUN/checkpoints/step-000050/` (accelerate's `save_state` files + `trainer_state.json`; under FSDP a
sharded `pytorch_model_fsdp_0/`, under DeepSpeed the engine's checkpoint in `pytorch_model/`, one optimizer
partition per process, and one weight partition under ZeRO-3).
A checkpoint is written to `RUN/checkpoints/.tmp-step-000050`, fsynced, then renamed, so a directory
named `step-*` is always complete; a crash mid-write leaves only a `.tmp-*` that the next run deletes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from dialoop.train.common import TrainState, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and restores the whole training state under `run_dir/checkpoints`; call on every process.

    Objects that are not prepared by accelerate (e.g. the LR scheduler) must be registered once with
    `accelerator.register_for_checkpointing(obj)` before the first save or load.
    """

    def __init__(self, run_dir: Path, accelerator: Accelerator, *, keep: int = 1) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = max(1, keep)
        if accelerator.is_main_process and self.root.exists():
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of `state.step` atomically and drop the oldest beyond `keep`."""
        acc = self.accelerator
        final = self.root / f"step-{state.step:06d}"
        tmp = self.root / f".tmp-step-{state.step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(tmp / STATE_FILE, state.to_json())
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint written: %s", final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> TrainState:
        """Restore everything saved in `path` and return its counters."""
        self.accelerator.load_state(str(path))
        state = TrainState.from_json(json.loads((path / STATE_FILE).read_text()))
        logger.info("resumed from %s (step %d)", path, state.step)
        return state

    def load_latest(self) -> TrainState | None:
        """Restore the latest checkpoint, or return None when there is none."""
        path = self.latest()
        return None if path is None else self.load(path)

    def remove_all(self) -> None:
        """Delete every checkpoint (the run finished and wrote its model)."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
        self.accelerator.wait_for_everyone()

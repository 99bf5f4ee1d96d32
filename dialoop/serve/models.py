"""The server's model versions: which ones it knows, which one it serves, which ones sit in memory.

The known models are the policy `ModelVersion`s of the store plus the base model the server was started
with. `default` always means the served one. At most `max_loaded` models stay in memory; a model that an
in-flight generation holds is never evicted, so swapping the served version never drops a request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dialoop.modeling.chat import eos_token_ids, pad_token_id
from dialoop.modeling.loading import load_model_and_tokenizer, resolve_model
from dialoop.store.db import session_scope
from dialoop.store.registry import (
    ensure_base_version_id,
    list_model_versions,
    model_version_by_name,
    served_model,
    set_served,
)

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "default"


class UnknownModel(LookupError):
    """No model version of that name is known to the server."""


@dataclass(frozen=True)
class ModelEntry:
    """A model the server can serve: its name, its HF directory (or hub id), its store row if any."""

    name: str
    path: str
    version_id: int | None = None
    created: datetime | None = None


@dataclass
class LoadedModel:
    """A model and tokenizer in memory, with the token ids generation needs."""

    entry: ModelEntry
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]
    pad_token_id: int
    context_length: int | None
    users: int = 0  # in-flight generations holding it
    last_used: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.entry.name


def _load(entry: ModelEntry, dtype: torch.dtype | None) -> LoadedModel:
    """Load `entry` (blocking: run it in a thread)."""
    started = time.monotonic()
    model, tokenizer = load_model_and_tokenizer(entry.path, dtype=dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    log.info("loaded model %s from %s in %.1fs", entry.name, entry.path, time.monotonic() - started)
    return LoadedModel(
        entry=entry,
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(model, tokenizer),
        pad_token_id=pad_token_id(tokenizer),
        context_length=int(context) if context else None,
    )


class ModelRegistry:
    """Known versions (store + base model), the served one, and an LRU of loaded ones."""

    def __init__(
        self,
        engine: Engine,
        base: ModelEntry,
        *,
        served: str | None = None,
        max_loaded: int = 2,
        dtype: torch.dtype | None = None,
    ):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.engine = engine
        self.base = base
        self.max_loaded = max_loaded
        self.dtype = dtype
        self._served = served or base.name
        self._loaded: dict[str, LoadedModel] = {}
        # thread locks, not asyncio ones: the registry outlives event loops (an app started twice)
        self._load_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        engine: Engine,
        model: str | Path | None = None,
        *,
        name: str | None = None,
        max_loaded: int = 2,
        dtype: torch.dtype | None = None,
    ) -> ModelRegistry:
        """The registry for a server started with `model` (a directory, a hub id or a version name).

        With no `model`, the store's served policy version is served, else the embedded default.
        """
        with session_scope(engine) as session:
            version = model_version_by_name(session, str(model)) if model is not None else None
            if model is None:
                version = served_model(session)
            if version is not None and version.kind == "policy":
                base = ModelEntry(version.name, version.path, version.id, version.created_at)
                return cls(engine, base, max_loaded=max_loaded, dtype=dtype)
            path = str(resolve_model(str(model) if model is not None else None))
            known = {v.path: v for v in list_model_versions(session, "policy")}
            if name is None and path in known:
                v = known[path]
                base = ModelEntry(v.name, v.path, v.id, v.created_at)
            else:
                base = ModelEntry(name or Path(path).name or path, path)
        return cls(engine, base, max_loaded=max_loaded, dtype=dtype)

    @property
    def served(self) -> str:
        """The name of the version that requests without an explicit model get."""
        return self._served

    def entries(self) -> list[ModelEntry]:
        """Every servable model: the base model first, then the store's policy versions (oldest first)."""
        with session_scope(self.engine) as session:
            versions = [
                ModelEntry(v.name, v.path, v.id, v.created_at) for v in list_model_versions(session, "policy")
            ]
        return [self.base, *[v for v in versions if v.name != self.base.name]]

    def resolve(self, name: str | None) -> ModelEntry:
        """The entry called `name`; None or `default` is the served one. UnknownModel otherwise."""
        if name is None or name == DEFAULT_ALIAS:
            name = self._served
        if name == self.base.name:
            return self.base
        with session_scope(self.engine) as session:
            v = model_version_by_name(session, name)
            if v is not None and v.kind == "policy":
                return ModelEntry(v.name, v.path, v.id, v.created_at)
        raise UnknownModel(f"The model `{name}` does not exist")

    def is_loaded(self, lm: LoadedModel) -> bool:
        """Whether `lm` is still the registry's copy of its model (not evicted or replaced)."""
        return self._loaded.get(lm.name) is lm

    def loaded(self) -> list[str]:
        """Names of the models in memory now."""
        return list(self._loaded)

    async def acquire(self, name: str | None) -> LoadedModel:
        """The model called `name` in memory (loading it if needed), held until `release`."""
        entry = await asyncio.to_thread(self.resolve, name)
        lm = await asyncio.to_thread(self._get_or_load, entry)
        # an eviction may have run while this coroutine waited: the model is in use now, keep it listed
        lm = self._loaded.setdefault(entry.name, lm)
        lm.users += 1
        lm.last_used = time.monotonic()
        self._evict()
        return lm

    def _get_or_load(self, entry: ModelEntry) -> LoadedModel:
        """The loaded model of `entry`, loading it once however many requests ask at the same time."""
        with self._locks_lock:
            lock = self._load_locks.setdefault(entry.name, threading.Lock())
        with lock:
            lm = self._loaded.get(entry.name)
            if lm is None:
                lm = _load(entry, self.dtype)
                self._loaded[entry.name] = lm
            return lm

    def release(self, lm: LoadedModel) -> None:
        """Give back a model taken with `acquire`."""
        lm.users -= 1
        lm.last_used = time.monotonic()
        self._evict()

    def _evict(self) -> None:
        idle = sorted(
            (lm for lm in list(self._loaded.values()) if lm.users == 0 and lm.name != self._served),
            key=lambda lm: lm.last_used,
        )
        while len(self._loaded) > self.max_loaded and idle:
            lm = idle.pop(0)
            del self._loaded[lm.name]
            log.info("unloaded model %s", lm.name)

    async def set_served(self, name: str) -> ModelEntry:
        """Serve `name` from now on: it is loaded first, so new requests never wait for it.

        In-flight generations keep the model they started with. A store version is also marked served
        in the store, so that the next start serves it too.
        """
        entry = await asyncio.to_thread(self.resolve, name)
        lm = await self.acquire(entry.name)
        try:
            if entry.version_id is not None:
                version_id = entry.version_id

                def persist() -> None:
                    with session_scope(self.engine) as session:
                        set_served(session, version_id)

                await asyncio.to_thread(persist)
            previous, self._served = self._served, entry.name
        finally:
            self.release(lm)
        if previous != entry.name:
            log.info("served model: %s -> %s", previous, entry.name)
        return entry


def version_id_of(session: Session, entry: ModelEntry) -> int:
    """The store id of a served model; a base model that is no version yet is registered first, under the
    name it is served as (so that it is listed once), and what it writes (chat replies, suggestions,
    alternatives) is credited to that version."""
    if entry.version_id is not None:
        return entry.version_id
    bind = session.get_bind()  # registered in a session of its own: other server processes may race for it
    return ensure_base_version_id(bind if isinstance(bind, Engine) else bind.engine, entry.path, entry.name)

"""One settings object for the whole project: env vars `DIALOOP_*`, CLI flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIALOOP_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".dialoop")
    database_url: str | None = None

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to SQLite inside `home`."""
        return self.database_url or f"sqlite:///{self.home / 'dialoop.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


_current: Settings | None = None


def settings() -> Settings:
    """The settings in force: the environment, with any CLI overrides applied by `configure`."""
    global _current
    if _current is None:
        _current = Settings()
    return _current


def configure(**overrides: Any) -> Settings:
    """Re-read the environment and apply CLI flag overrides (None means 'not given')."""
    global _current
    _current = Settings(**{k: v for k, v in overrides.items() if v is not None})
    return _current

"""One settings tree for the whole project: env vars `DIALOOP_*`, CLI flags override.

    settings().db_url                 DIALOOP_HOME, DIALOOP_DATABASE_URL
    settings().serve.max_queue        DIALOOP_SERVE_MAX_QUEUE=128
    settings().trainer.k              DIALOOP_TRAINER_K=6
    settings().web.trusted_proxies    DIALOOP_TRUSTED_PROXIES=10.0.0.5 (also DIALOOP_WEB_TRUSTED_PROXIES)

An area's env vars are `DIALOOP_<AREA>_<KNOB>` (pydantic-settings' nested delimiter, split once); the web
knobs kept their older names without the area.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict


class WebSettings(BaseModel):
    """Web login: cookies, proxies, sessions, login throttling; env vars `DIALOOP_<KNOB>`."""

    secret_key: str | None = None  # signs cookies; default: a random key kept in $DIALOOP_HOME/secret_key
    trusted_proxies: str = ""  # comma-separated client IPs whose X-Forwarded-Proto is believed ("*": any)
    session_hours: float = 24 * 14  # a login lasts this long
    login_attempts: int = 5  # failed logins per name and client address ...
    login_window_s: float = 300.0  # ... within this window, before further tries get 429


class ServeSettings(BaseModel):
    """Server limits and batching knobs; env vars `DIALOOP_SERVE_<KNOB>`."""

    max_queue: int = 64  # replies waiting to decode; beyond it requests get 429
    max_batch: int = 16  # rows decoded together
    batch_window_ms: float = 10.0  # how long the worker waits for more requests to batch together
    max_loaded_models: int = 2  # model versions kept in memory at once
    default_max_tokens: int = 512  # when a request gives no max_tokens (capped by the context)
    max_tokens_limit: int = 4096  # a larger max_tokens is refused (422)
    max_n: int = 8  # choices per request (422 beyond)
    max_messages: int = 256  # messages per request (413 beyond)
    max_message_chars: int = 32_000  # characters in one message (413 beyond)
    max_stop: int = 4  # stop strings per request, as in OpenAI's API (422 beyond)
    max_body_bytes: int = 2_000_000  # request body of /v1 calls (413 beyond)
    preload: bool = True  # load the served model at startup rather than on the first request
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, else fp32


class TrainerSettings(BaseModel):
    """Comparison tasks and suggestions in the trainer workspace; env vars `DIALOOP_TRAINER_<KNOB>`."""

    # replies per task: the model-written original and k-1 alternatives sampled for the same context
    k: int = Field(default=4, ge=2, le=16)
    overlap: int = Field(default=2, ge=1)  # rankings each task wants, from different trainers
    tasks_per_refill: int = Field(default=4, ge=1)  # tasks made at once when a trainer finds none open
    alt_models: str = ""  # comma-separated version names that write alternatives too (besides the served)
    max_suggestions: int = Field(default=8, ge=1)  # suggestions per request
    suggestion_max_tokens: int = Field(default=256, ge=1)  # when the request gives none


class _WebEnvSource(EnvSettingsSource):
    """The web knobs under their older names, `DIALOOP_<KNOB>` (e.g. DIALOOP_SECRET_KEY)."""

    def __call__(self) -> dict[str, Any]:
        prefix = self.env_prefix if self.case_sensitive else self.env_prefix.lower()
        found = {}
        for name in WebSettings.model_fields:
            value = self.env_vars.get(f"{prefix}{name}")
            if value is not None:
                found[name] = value
        return {"web": found} if found else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DIALOOP_", env_nested_delimiter="_", env_nested_max_split=1, extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".dialoop")
    database_url: str | None = None
    web: WebSettings = Field(default_factory=WebSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _WebEnvSource(settings_cls), dotenv_settings, file_secret_settings

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

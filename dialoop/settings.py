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
    login_attempts: int = 5  # failed logins per name and client (device cookie, else address) ...
    login_window_s: float = 300.0  # ... within this window, before that pair's tries get 429
    login_ip_attempts: int = 20  # failed logins from one address, any names, within the window (429 after)
    login_name_attempts: int = 10  # failed logins of one name from anywhere before its tries are spaced out
    login_max_delay_s: float = 60.0  # the longest such spacing (doubling from 1 s): never a lock-out


class ServeSettings(BaseModel):
    """Server limits and batching knobs; env vars `DIALOOP_SERVE_<KNOB>`."""

    max_queue: int = 64  # replies waiting for a KV-cache slot; beyond it requests get 429 with Retry-After
    max_batch: int = 16  # KV-cache slots of each loaded model's engine: replies decoding at once
    max_len: int = 2048  # positions per slot (prompt + reply), capped by the model's context
    prefill_chunk: int = 256  # prompt tokens one request prefills per engine step
    max_rows_per_owner: int = 0  # slots one user may hold at once (0: no cap; admission is fair anyway)
    inference_url: str = ""  # an OpenAI-compatible server to generate on instead of a local model
    inference_key: str = ""  # its API key, if it needs one
    max_loaded_models: int = 2  # model versions kept in memory at once
    default_max_tokens: int = 512  # when a request gives no max_tokens (capped by the context)
    max_tokens_limit: int = 4096  # a larger max_tokens is refused (422)
    max_n: int = 8  # choices per request (422 beyond)
    max_messages: int = 256  # messages per request (413 beyond)
    max_message_chars: int = 32_000  # characters in one message (413 beyond)
    max_stop: int = 4  # stop strings per request, as in OpenAI's API (422 beyond)
    max_body_bytes: int = 2_000_000  # request body of /v1 calls, bytes received (413 beyond)
    max_web_body_bytes: int = 256_000  # request body of the web routes (pages, forms, /api JSON; 413 beyond)
    # requests doing database work at once: the connection pool holds as many (plus as many again for
    # work outside requests) and the thread pool has room for them all; more wait up to db_wait_s, then 503
    db_connections: int = Field(default=20, ge=1)  # x 2 x --workers 2 stays under PostgreSQL's 100
    db_wait_s: float = Field(default=5.0, gt=0)
    preload: bool = True  # load the served model at startup rather than on the first request
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, else fp32
    workers: int = Field(default=1, ge=1)  # web processes (`dialoop serve --workers`)
    drain_s: float = Field(default=30.0, ge=0)  # on SIGTERM, how long requests and streams may still run
    log_format: Literal["text", "json"] = "text"  # json: one JSON line per log record and per request
    metrics_public: bool = False  # /metrics without an admin API key (only behind a private network)


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
    redis_url: str | None = None  # DIALOOP_REDIS_URL: sessions and login throttling in Redis, not the store
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

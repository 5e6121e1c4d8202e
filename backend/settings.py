"""One settings object for every process (API, worker, CLI), read from MAILSYNC_* variables."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105 (refused outside development)
# Values people paste from examples; refusing them outside development keeps a
# copied config from signing production tokens with a public key.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "please-change", "xxx", DEV_SECRET_KEY}
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILSYNC_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    database_url: str = f"sqlite+aiosqlite:///{Path.cwd() / 'mailsync.db'}"
    redis_url: str = "redis://127.0.0.1:6379/0"
    secret_key: SecretStr | None = None
    public_url: str = "http://127.0.0.1:8000"
    log_level: str = "INFO"

    token_ttl_seconds: int = 30 * 24 * 3600
    max_query_depth: int = 12
    max_aliases: int = 30
    max_page_size: int = 100
    sync_interval_seconds: int = 300
    # Scheduled passes start spread over this many seconds rather than all at once.
    sync_spread_seconds: int = 60
    # A pass whose lock outlives this is taken to be dead (worker killed).
    sync_lock_seconds: int = 600
    capture_domain: str = "capture.mailsync.local"

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        key = self.secret_key.get_secret_value() if self.secret_key else None
        if self.env != "development" and (
            key is None or key.strip().lower() in PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                "MAILSYNC_SECRET_KEY must be set to a long random value outside development "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if key is not None and self.env != "development" and len(key) < 32:
            raise ValueError("MAILSYNC_SECRET_KEY must be at least 32 characters")
        return self

    @property
    def secret(self) -> bytes:
        key = self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET_KEY
        return key.encode()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@functools.cache
def get_settings() -> Settings:
    return Settings()


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )

"""One settings object for every process (API, worker, CLI), read from MAILSYNC_* variables."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105 (refused outside development)
# Values people paste from examples; refusing them outside development keeps a
# copied config from signing production tokens with a public key.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "please-change", "xxx", DEV_SECRET_KEY}
)
# The development OAuth clients: fine against the sandbox, refused in production.
DEV_GOOGLE_CLIENT_ID = "mailsync-development.apps.googleusercontent.com"
DEV_MICROSOFT_CLIENT_ID = "00000000-0000-0000-0000-000000000000"
DEV_CLIENT_SECRET = "mailsync-development-secret"  # noqa: S105 (refused in production)


class GoogleEndpoints(NamedTuple):
    oauth_url: str
    token_url: str
    revoke_url: str
    api_url: str


class MicrosoftEndpoints(NamedTuple):
    authorize_url: str
    token_url: str
    graph_url: str


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
    # A GraphQL document longer (characters) or with more tokens is refused before it is parsed.
    max_query_length: int = Field(default=50_000, ge=1000)
    max_query_tokens: int = Field(default=5_000, ge=100)
    # Request bodies larger than this (bytes) are answered 413; webhooks take less.
    max_request_bytes: int = Field(default=12 * 1024 * 1024, ge=64 * 1024)
    max_webhook_bytes: int = Field(default=1024 * 1024, ge=16 * 1024)
    max_page_size: int = 100
    # GraphiQL at /graphql and schema introspection: on in development and test, off in
    # production unless set.
    graphiql: bool | None = None
    introspection: bool | None = None
    # Origins of single-page apps served elsewhere that may call the API: CORS on HTTP and the
    # Origin check of websocket handshakes. Comma-separated, e.g.
    # `https://app.example.com,http://localhost:5173`; `*` allows any. Empty: same origin only.
    cors_origins: str = ""
    # Per-message deflate on websockets: about 42 KB more per connection for frames that are
    # mostly small JSON; off unless a deployment pays for bandwidth more than memory.
    ws_per_message_deflate: bool = False
    # Frames a websocket may have waiting to be written; a client that lets more pile up is
    # closed with code 1013 (try again later) instead of holding memory.
    ws_send_queue: int = Field(default=256, ge=1)
    sync_interval_seconds: int = 300
    # Scheduled passes start spread over this many seconds rather than all at once.
    sync_spread_seconds: int = 60
    # A pass running longer is cancelled (and recorded, then retried after its backoff).
    sync_pass_timeout_seconds: int = 300
    # A running job's claim (arq's in-progress key) lasts this long and its worker renews it
    # while the job runs: the job of a killed worker is retried by another this soon.
    job_lease_seconds: int = Field(default=30, ge=3)
    # Processes a worker parses fetched mail in while it stores the previous batch; 0 parses
    # in a thread of the worker (parsing and storing then share one core).
    parse_processes: int = Field(default=1, ge=0, le=32)
    # A send (one provider call, or a look-up and a call) running longer is cancelled.
    send_timeout_seconds: int = 120
    # A send whose answer was lost is looked up in the mailbox no sooner than this after it
    # started (providers file what they accepted with a delay); only then is it sent again.
    # It must exceed the send timeout plus the job lease: an attempt whose worker lost its
    # claim (Redis was unreachable for a lease) may still be sending until its timeout.
    send_confirm_seconds: float = 180
    # Jobs and events committed but not released to Redis at once (Redis was down) are
    # relayed by the worker from the outbox: rows at least this old, checked this often.
    outbox_relay_seconds: float = Field(default=5, gt=0)
    capture_domain: str = "capture.mailsync.local"
    # R16: the largest message the capture receiver (SMTP and POST /inbound/mime) accepts.
    capture_max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    # Shared secret of POST /inbound/mime (`Authorization: Bearer ...`). Derived from
    # SECRET_KEY when unset, except in production, where the endpoint stays off without it.
    inbound_token: SecretStr | None = None
    # Where the browser lands after an OAuth connect, with ?mailboxId= or ?error= appended.
    oauth_return_url: str | None = None

    # Google: the real endpoints by default; MAILSYNC_GOOGLE_BASE_URL points all of them at
    # one server (`mailsync sandbox`).
    google_base_url: str | None = None
    google_oauth_url: str = "https://accounts.google.com/o/oauth2/v2/auth"
    google_token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
    google_revoke_url: str = "https://oauth2.googleapis.com/revoke"
    google_api_url: str = "https://gmail.googleapis.com/"
    google_client_id: str = DEV_GOOGLE_CLIENT_ID
    google_client_secret: SecretStr = SecretStr(DEV_CLIENT_SECRET)
    # The Pub/Sub topic Gmail publishes to; its push subscription targets /webhooks/google.
    google_pubsub_topic: str = "projects/mailsync/topics/gmail"
    # Shared secret in the push URL (?token=); derived from SECRET_KEY when unset, except in
    # production, which requires it.
    google_push_token: SecretStr | None = None
    # Microsoft: the real endpoints by default; MAILSYNC_MICROSOFT_BASE_URL points login and
    # Graph at one server (`mailsync sandbox`).
    microsoft_base_url: str | None = None
    microsoft_login_url: str = "https://login.microsoftonline.com"
    microsoft_graph_url: str = "https://graph.microsoft.com/v1.0"
    microsoft_tenant: str = "common"
    microsoft_client_id: str = DEV_MICROSOFT_CLIENT_ID
    microsoft_client_secret: SecretStr = SecretStr(DEV_CLIENT_SECRET)
    # Lifetime asked for Graph subscriptions; they are renewed daily, so it must outlast a day
    # with room for a late pass. Under the documented maximum for Outlook messages (4,230
    # minutes in older docs, 10,080 in newer ones).
    microsoft_subscription_minutes: int = Field(default=4200, ge=1500, le=10080)
    # A rate limit asking for at most this many seconds is waited out inside the pass.
    provider_inline_wait_seconds: float = 5.0
    # IMAP/SMTP: a PEM file of CA certificates trusted besides the system's, for private mail
    # servers; certificates are always verified.
    imap_ca_file: str | None = None
    # connectImapMailbox refuses hosts that resolve to private, loopback or link-local
    # addresses in production (the API must not probe the operator's network) unless set.
    imap_allow_private_hosts: bool = False
    # The IDLE supervisor: IDLE is re-issued this often (RFC 2177: servers may drop an IDLE
    # after 30 minutes), and servers without IDLE are polled this often instead.
    # Whether this worker process may hold the IMAP IDLE connections. Of the workers where it
    # is set, only the holder of a Redis lease does (servers cap connections per user); the
    # others take over within imap_idle_lease_seconds of the holder stopping.
    imap_idle: bool = True
    imap_idle_lease_seconds: int = Field(default=60, ge=3, le=3600)
    imap_idle_seconds: int = Field(default=25 * 60, ge=10, le=29 * 60)
    imap_poll_seconds: int = Field(default=60, ge=5)

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

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = [
            *_development_client("MAILSYNC_GOOGLE", self.google_client_id, DEV_GOOGLE_CLIENT_ID),
            *_development_secret("MAILSYNC_GOOGLE", self.google_client_secret),
            *_development_client(
                "MAILSYNC_MICROSOFT", self.microsoft_client_id, DEV_MICROSOFT_CLIENT_ID
            ),
            *_development_secret("MAILSYNC_MICROSOFT", self.microsoft_client_secret),
            *_unsafe_public_url(self.public_url),
        ]
        push = self.google_push_token.get_secret_value() if self.google_push_token else None
        if push is None or push.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append(
                "MAILSYNC_GOOGLE_PUSH_TOKEN must be set in production (a random value; the "
                "Pub/Sub push subscription's URL carries it as ?token=)"
            )
        inbound = self.inbound_token.get_secret_value() if self.inbound_token else None
        if inbound is not None and (
            inbound.strip().lower() in PLACEHOLDER_SECRETS or len(inbound.strip()) < 32
        ):
            problems.append(
                "MAILSYNC_INBOUND_TOKEN must be a random value of 32+ characters in production "
                "(or unset, which turns POST /inbound/mime off)"
            )
        if problems:
            raise ValueError("unsafe for production:\n- " + "\n- ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_send_confirm(self) -> Settings:
        # Tests are exempt: the sandboxes file a sent message at once, and a test retrying a
        # send should not wait minutes for the window below.
        if self.env == "test":
            return self
        floor = self.send_timeout_seconds + self.job_lease_seconds
        if self.send_confirm_seconds <= floor:
            raise ValueError(
                f"MAILSYNC_SEND_CONFIRM_SECONDS ({self.send_confirm_seconds:g}) must exceed "
                "MAILSYNC_SEND_TIMEOUT_SECONDS plus MAILSYNC_JOB_LEASE_SECONDS "
                f"({floor}): an attempt may still be sending until then, and a retry that "
                "looks for its mail too early sends it twice"
            )
        return self

    @model_validator(mode="after")
    def _check_cors_origins(self) -> Settings:
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            if origin != "*" and (
                parts.scheme not in {"http", "https"}
                or not parts.hostname
                or parts.path not in {"", "/"}
                or parts.query
                or parts.fragment
            ):
                raise ValueError(
                    f"MAILSYNC_CORS_ORIGINS: {origin!r} is not an origin "
                    "(scheme://host[:port], no path) or `*`"
                )
        return self

    @property
    def allowed_origins(self) -> list[str]:
        """MAILSYNC_CORS_ORIGINS as a list, each without a trailing slash."""
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def graphiql_enabled(self) -> bool:
        return self.graphiql if self.graphiql is not None else self.env != "production"

    @property
    def introspection_enabled(self) -> bool:
        if self.introspection is not None:
            return self.introspection
        return self.env != "production"

    @property
    def secret(self) -> bytes:
        key = self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET_KEY
        return key.encode()

    @property
    def google(self) -> GoogleEndpoints:
        base = self.google_base_url.rstrip("/") if self.google_base_url else None
        return GoogleEndpoints(
            oauth_url=f"{base}/o/oauth2/v2/auth" if base else self.google_oauth_url,
            token_url=f"{base}/token" if base else self.google_token_url,
            revoke_url=f"{base}/revoke" if base else self.google_revoke_url,
            api_url=f"{base}/" if base else self.google_api_url,
        )

    @property
    def microsoft(self) -> MicrosoftEndpoints:
        base = self.microsoft_base_url.rstrip("/") if self.microsoft_base_url else None
        login = base or self.microsoft_login_url.rstrip("/")
        return MicrosoftEndpoints(
            authorize_url=f"{login}/{self.microsoft_tenant}/oauth2/v2.0/authorize",
            token_url=f"{login}/{self.microsoft_tenant}/oauth2/v2.0/token",
            graph_url=f"{base}/v1.0" if base else self.microsoft_graph_url.rstrip("/"),
        )

    @property
    def push_token(self) -> str:
        if self.google_push_token is not None:
            return self.google_push_token.get_secret_value()
        return hmac.new(self.secret, b"google-push", hashlib.sha256).hexdigest()[:40]

    @property
    def inbound_secret(self) -> str | None:
        """The shared secret of POST /inbound/mime; None: the endpoint is off."""
        if self.inbound_token is not None:
            return self.inbound_token.get_secret_value()
        if self.env == "production":
            return None
        return hmac.new(self.secret, b"capture-inbound", hashlib.sha256).hexdigest()[:40]

    @property
    def return_url(self) -> str:
        return self.oauth_return_url or f"{self.public_url.rstrip('/')}/oauth/complete"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _development_client(prefix: str, client_id: str, development: str) -> list[str]:
    if client_id.strip() in {"", development}:
        return [f"{prefix}_CLIENT_ID must be set to your own OAuth client in production"]
    return []


def _development_secret(prefix: str, secret: SecretStr) -> list[str]:
    value = secret.get_secret_value().strip()
    if value == DEV_CLIENT_SECRET or value.lower() in PLACEHOLDER_SECRETS:
        return [f"{prefix}_CLIENT_SECRET must be set to your OAuth client's secret in production"]
    return []


def _unsafe_public_url(url: str) -> list[str]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host:
        return [f"MAILSYNC_PUBLIC_URL must be an https:// URL in production (got {url!r})"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        local = host == "localhost" or host.endswith(".localhost")
    else:
        local = address.is_loopback or address.is_unspecified
    if local:
        return [
            f"MAILSYNC_PUBLIC_URL must be the API's public address in production, "
            f"not a loopback one (got {url!r})"
        ]
    return []


@functools.cache
def get_settings() -> Settings:
    return Settings()


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # httpx logs every provider request at INFO, delta tokens in the URL included: a line
    # per Graph call drowns what a pass reports, so only its warnings go through.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))

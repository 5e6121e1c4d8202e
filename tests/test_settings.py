"""Production refuses unsafe settings: development OAuth clients, a public URL that is not
HTTPS or is loopback, a push secret left to be derived from the secret key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backend.settings import Settings
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION: dict[str, Any] = {
    "env": "production",
    "secret_key": SECRET,
    "public_url": "https://crm.example.com",
    "google_client_id": "1234-abcd.apps.googleusercontent.com",
    "google_client_secret": "GOCSPX-a-real-looking-secret",
    "microsoft_client_id": "6f1d2c3b-0a9e-4d8c-b7a6-5f4e3d2c1b0a",
    "microsoft_client_secret": "a-real-looking-microsoft-secret",
    "google_push_token": "push-token-that-is-random-enough-0123",
}


@pytest.fixture(autouse=True)
def _no_mailsync_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts: no MAILSYNC_* variable or .env file from outside."""
    for name in list(os.environ):
        if name.startswith("MAILSYNC_"):
            monkeypatch.delenv(name)


def production(**changes: Any) -> Settings:
    values = {**PRODUCTION, **changes}
    return Settings(_env_file=None, **{k: v for k, v in values.items() if v is not None})  # type: ignore[call-arg]


def test_valid_production_settings_are_accepted() -> None:
    settings = production()
    assert settings.env == "production"
    assert settings.push_token == PRODUCTION["google_push_token"]


def test_production_with_every_development_default_refuses_and_names_each_variable() -> None:
    with pytest.raises(ValueError) as refused:
        Settings(_env_file=None, env="production", secret_key=SECRET)  # type: ignore[call-arg]
    message = str(refused.value)
    for variable in (
        "MAILSYNC_GOOGLE_CLIENT_ID",
        "MAILSYNC_GOOGLE_CLIENT_SECRET",
        "MAILSYNC_MICROSOFT_CLIENT_ID",
        "MAILSYNC_MICROSOFT_CLIENT_SECRET",
        "MAILSYNC_PUBLIC_URL",
        "MAILSYNC_GOOGLE_PUSH_TOKEN",
    ):
        assert variable in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("google_client_id", "MAILSYNC_GOOGLE_CLIENT_ID"),
        ("google_client_secret", "MAILSYNC_GOOGLE_CLIENT_SECRET"),
        ("microsoft_client_id", "MAILSYNC_MICROSOFT_CLIENT_ID"),
        ("microsoft_client_secret", "MAILSYNC_MICROSOFT_CLIENT_SECRET"),
    ],
)
def test_a_development_oauth_client_is_refused(field: str, variable: str) -> None:
    development = Settings.model_fields[field].default
    value = (
        development.get_secret_value() if hasattr(development, "get_secret_value") else development
    )
    with pytest.raises(ValueError, match=variable):
        production(**{field: value})


@pytest.mark.parametrize(
    "url",
    [
        "http://crm.example.com",
        "https://localhost:8000",
        "https://api.localhost",
        "https://127.0.0.1",
        "https://127.8.0.1:8443/",
        "https://[::1]:8000",
        "https://0.0.0.0",
        "crm.example.com",
    ],
)
def test_a_public_url_that_is_not_https_or_is_loopback_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="MAILSYNC_PUBLIC_URL"):
        production(public_url=url)


@pytest.mark.parametrize("token", [None, "", "changeme"])
def test_the_push_secret_must_be_set_explicitly(token: str | None) -> None:
    with pytest.raises(ValueError, match="MAILSYNC_GOOGLE_PUSH_TOKEN"):
        production(google_push_token=token)


@pytest.mark.parametrize("token", ["changeme", "short-inbound-token"])
def test_r16_a_weak_inbound_token_is_refused_in_production(token: str) -> None:
    with pytest.raises(ValueError, match="MAILSYNC_INBOUND_TOKEN"):
        production(inbound_token=token)


def test_r16_the_inbound_endpoint_is_off_in_production_without_its_token() -> None:
    assert production().inbound_secret is None
    strong = "inbound-token-that-is-random-enough-0123"
    assert production(inbound_token=strong).inbound_secret == strong
    test = Settings(_env_file=None, env="test", secret_key=SECRET)  # type: ignore[call-arg]
    assert test.inbound_secret  # derived from the secret key outside production


def test_development_and_test_keep_their_defaults() -> None:
    development = Settings(_env_file=None)  # type: ignore[call-arg]
    assert development.public_url.startswith("http://127.0.0.1")
    assert development.push_token  # derived from the development secret
    test = Settings(_env_file=None, env="test", secret_key=SECRET)  # type: ignore[call-arg]
    assert test.google_push_token is None and test.push_token


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"]])
def test_a_process_in_production_with_development_secrets_exits_and_says_why(
    tmp_path: Path, command: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSYNC_")}
    env |= {
        "MAILSYNC_ENV": "production",
        "MAILSYNC_SECRET_KEY": SECRET,
        "MAILSYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
    }
    out = subprocess.run(
        ["uv", "run", "--frozen", "--project", str(ROOT), "mailsync", *command],
        cwd=tmp_path,  # no .env file of the checkout's
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "MAILSYNC_GOOGLE_CLIENT_ID must be set" in out.stderr
    assert "MAILSYNC_PUBLIC_URL must be an https:// URL" in out.stderr
    assert "MAILSYNC_GOOGLE_PUSH_TOKEN must be set" in out.stderr
    assert SECRET not in out.stderr


def test_cors_origins_are_a_comma_separated_list_of_origins() -> None:
    settings = Settings(cors_origins=" https://app.example.com, http://localhost:5173/ ")
    assert settings.allowed_origins == ["https://app.example.com", "http://localhost:5173"]
    assert Settings().allowed_origins == []
    assert Settings(cors_origins="*").allowed_origins == ["*"]
    for wrong in ("app.example.com", "https://app.example.com/spa", "ftp://x.test"):
        with pytest.raises(ValueError, match="MAILSYNC_CORS_ORIGINS"):
            Settings(cors_origins=wrong)

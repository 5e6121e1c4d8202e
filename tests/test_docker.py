"""The compose file is valid for Docker Compose (no engine needed to check that)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e  # runs docker compose


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, (
        "neither `docker compose` nor `docker-compose` is installed (scripts/test installs it)"
    )
    return [legacy]


PRODUCTION = {
    "MAILSYNC_SECRET_KEY": "x" * 48,
    "MAILSYNC_PUBLIC_URL": "https://crm.example.com",
    "MAILSYNC_GOOGLE_CLIENT_ID": "id.apps.googleusercontent.com",
    "MAILSYNC_GOOGLE_CLIENT_SECRET": "google-secret",
    "MAILSYNC_GOOGLE_PUSH_TOKEN": "p" * 40,
    "MAILSYNC_MICROSOFT_CLIENT_ID": "6f1d2c3b-0a9e-4d8c-b7a6-5f4e3d2c1b0a",
    "MAILSYNC_MICROSOFT_CLIENT_SECRET": "microsoft-secret",
}


def test_compose_file_validates() -> None:
    env = {**os.environ, **PRODUCTION}
    out = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert set(config["services"]) == {"api", "worker", "capture", "postgres", "redis"}
    assert "mailsync migrate" in " ".join(config["services"]["api"]["command"])
    capture = config["services"]["capture"]
    assert "mailsync capture" in " ".join(capture["command"])
    assert capture["environment"]["MAILSYNC_ENV"] == "production"


@pytest.mark.parametrize("missing", sorted(PRODUCTION))
def test_compose_refuses_to_run_without_a_production_setting(missing: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in PRODUCTION}
    env |= {k: v for k, v in PRODUCTION.items() if k != missing}
    out = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode != 0
    assert missing in out.stderr

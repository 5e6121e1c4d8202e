"""The compose file is valid for Docker Compose (no engine needed to check that)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


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


def test_compose_file_validates() -> None:
    env = {**os.environ, "MAILSYNC_SECRET_KEY": "x" * 48}
    out = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert set(config["services"]) == {"api", "worker", "postgres", "redis"}
    assert "mailsync migrate" in " ".join(config["services"]["api"]["command"])


def test_compose_refuses_to_run_without_a_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAILSYNC_SECRET_KEY"}
    out = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode != 0
    assert "MAILSYNC_SECRET_KEY" in out.stderr

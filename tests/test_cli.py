"""The `mailsync` command on a fresh SQLite database, as an operator would use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.cli import app
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parent.parent


def mailsync(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.e2e  # runs `mailsync` processes
def test_operator_workflow(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MAILSYNC_ENV": "test",
        "MAILSYNC_SECRET_KEY": SECRET,
        "MAILSYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
    }
    assert mailsync("migrate", env=env).returncode == 0
    created = mailsync(
        "workspace",
        "create",
        "Acme",
        "--owner-email",
        "Olive@Acme.test",
        "--owner-name",
        "Olive",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    assert "owner olive@acme.test" in created.stdout
    added = mailsync(
        "user", "add", "--workspace", "Acme", "--email", "sam@acme.test", "--role", "admin", env=env
    )
    assert added.returncode == 0 and "ADMIN" in added.stdout
    duplicate = mailsync("user", "add", "--workspace", "Acme", "--email", "sam@acme.test", env=env)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    missing = mailsync("user", "add", "--workspace", "Nope", "--email", "x@acme.test", env=env)
    assert missing.returncode == 1 and "no workspace" in missing.stderr
    token = mailsync("token", "create", "--email", "sam@acme.test", env=env)
    assert token.returncode == 0 and token.stdout.startswith("ms1.")
    assert mailsync("token", "create", "--email", "who@acme.test", env=env).returncode == 1
    revoked = mailsync("token", "revoke", token.stdout.strip(), env=env)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert mailsync("token", "revoke", token.stdout.strip(), env=env).returncode == 1


def test_export_schema_prints_the_committed_schema() -> None:
    out = CliRunner().invoke(app, ["export-schema"])
    assert out.exit_code == 0
    assert out.stdout == (ROOT / "schema.graphql").read_text()


@pytest.mark.e2e  # runs `mailsync` processes
def test_refuses_to_start_without_a_secret_outside_development(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAILSYNC_SECRET_KEY"}
    env |= {
        "MAILSYNC_ENV": "production",
        "MAILSYNC_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
    }
    out = mailsync("migrate", env=env)
    assert out.returncode == 2
    assert "MAILSYNC_SECRET_KEY must be set" in out.stderr


def test_every_command_has_help() -> None:
    commands = (
        ["serve"],
        ["worker"],
        ["migrate"],
        ["workspace", "create"],
        ["user", "add"],
        ["token", "create"],
        ["token", "revoke"],
        ["export-schema"],
    )
    for command in commands:
        out = CliRunner().invoke(app, [*command, "--help"])
        assert out.exit_code == 0 and "Usage" in out.stdout, command
        assert len(out.stdout.split("Usage", 1)[1]) > 80, command  # says more than its name

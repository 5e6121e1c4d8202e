"""The repository stands on its own: a clone with nothing beside it passes the schema tests.

Clones the committed HEAD of the repository these tests run in (uncommitted changes are
not part of a clone) into a temporary folder that holds nothing else, then runs the schema
and API-contract tests inside the clone with the same environment. The clone gets its own
virtualenv from uv's cache (`uv run --frozen`), so nothing is downloaded again and the
running checkout's environment is left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Spelled in two pieces so that this file does not match its own check.
SIBLING_FOLDER = "../" + "shared"
UV_PYTEST = ["uv", "run", "--frozen", "--quiet", "pytest", "-q", "-p", "no:cacheprovider"]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # scripts/test installs uv; a missing tool must fail this test, not skip it.
    assert shutil.which("git") and shutil.which("uv"), "the fresh-clone check needs git and uv"
    top = Path(git("rev-parse", "--show-toplevel", cwd=ROOT))
    head = git("rev-parse", "HEAD", cwd=top)
    solo = tmp_path_factory.mktemp("solo")
    target = solo / "mailsync"
    git("clone", "--quiet", "--no-local", "--no-checkout", str(top), str(target), cwd=solo)
    # HEAD by name: also right when it is detached or a linked worktree's branch.
    git("fetch", "--quiet", "origin", "HEAD", cwd=target)
    git("checkout", "--quiet", "--detach", "FETCH_HEAD", cwd=target)
    assert git("rev-parse", "HEAD", cwd=target) == head
    assert [p.name for p in solo.iterdir()] == ["mailsync"]
    return target


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_fresh_clone_passes_the_schema_and_contract_tests(clone: Path) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        # The clone gets its own environment; the running one's must not leak in.
        if name not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTEST_CURRENT_TEST")
    }
    result = subprocess.run(
        [*UV_PYTEST, "tests/test_schema.py"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout


@pytest.mark.e2e
def test_no_tracked_file_points_outside_the_repository(clone: Path) -> None:
    offenders = [
        name
        for name in git("ls-files", cwd=clone).splitlines()
        if (clone / name).is_file() and SIBLING_FOLDER.encode() in (clone / name).read_bytes()
    ]
    assert offenders == []

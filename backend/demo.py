"""`mailsync demo`: one command from a fresh checkout to a live API with a seeded workspace.

It runs on SQLite, uses the Redis at MAILSYNC_REDIS_URL when one answers and otherwise
starts a private `redis-server`, migrates, seeds a workspace, prints a token and the
GraphiQL link, then runs the API and a worker until interrupted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from backend import migrations
from backend.auth.service import Viewer, issue_token
from backend.contacts import service as contacts_service
from backend.db import Database
from backend.settings import Settings
from backend.workspaces import queries as workspace_queries
from backend.workspaces import service as workspace_service
from backend.workspaces.tables import Role

DEMO_WORKSPACE = "Demo Co"
OWNER_EMAIL = "olivia@demo.mailsync.test"
TEAMMATE_EMAIL = "sam@demo.mailsync.test"
CONTACTS = [
    ("Ada Lovelace", "ada@analytical.example"),
    ("Grace Hopper", "grace@cobol.example"),
    ("Alan Turing", "alan@bletchley.example"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def ensure_redis(url: str, workdir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The configured Redis if it answers, else a private redis-server for this demo."""
    if _redis_answers(url):
        return url, None
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"No Redis answers at {url} and no redis-server is installed.\n"
            "Install one (Debian: apt-get install redis-server) or set MAILSYNC_REDIS_URL."
        )
    port = _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(  # noqa: S603 (our own fixed arguments)
        [binary, *args, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    private = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _redis_answers(private):
            return private, proc
        time.sleep(0.05)
    proc.terminate()
    raise SystemExit("redis-server did not start")


async def seed(settings: Settings) -> str:
    """Create the demo workspace once; return a fresh token for its owner."""
    db = Database(settings.database_url)
    try:
        async with db.transaction() as session:
            owner = await workspace_queries.user_by_email(session, OWNER_EMAIL)
            if owner is None:
                workspace, owner = await workspace_service.create_workspace(
                    session, DEMO_WORKSPACE, OWNER_EMAIL, "Olivia Owner"
                )
                await workspace_service.add_user(
                    session, workspace, TEAMMATE_EMAIL, Role.USER, "Sam Seller"
                )
                viewer = Viewer(user=owner, workspace=workspace)
                for name, email in CONTACTS:
                    await contacts_service.create_contact(session, viewer, email=email, name=name)
            return await issue_token(session, settings.secret, owner, timedelta(days=7))
    finally:
        await db.dispose()


def run(settings: Settings, host: str, port: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mailsync-demo-"))
    redis_url, redis_proc = ensure_redis(settings.redis_url, workdir)
    migrations.upgrade(settings.database_url)
    token = asyncio.run(seed(settings))
    env = {**os.environ, "MAILSYNC_REDIS_URL": redis_url}
    env["MAILSYNC_DATABASE_URL"] = settings.database_url
    cli = [sys.executable, "-m", "backend.cli"]
    children = [
        subprocess.Popen([*cli, "worker"], env=env),  # noqa: S603
        subprocess.Popen([*cli, "serve", "--host", host, "--port", str(port)], env=env),  # noqa: S603
    ]
    base = f"http://{host}:{port}"
    print(
        f"\nmailsync is starting on {base}\n"
        f"  GraphiQL (signed in as {OWNER_EMAIL}):\n    {base}/graphql?token={token}\n"
        f"  Bearer token:\n    {token}\n"
        f"  Database: {settings.database_url}\n  Redis: {redis_url}\n"
        "Press Ctrl+C to stop.\n",
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.3)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

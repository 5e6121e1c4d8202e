"""Test fixtures on real infrastructure.

The backend is chosen by MAILSYNC_TEST_DB (sqlite, the default, or postgresql): each run
gets a brand-new database migrated to head, and every test makes its own workspaces, so
tests never clean up by deleting rows and never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from redis.asyncio import Redis

from backend import migrations
from backend.app import create_app, websocket_options
from backend.kit import clock
from backend.runtime import Runtime
from backend.sandbox.google import GoogleSandbox
from backend.sending.queue import JobQueue
from backend.settings import Settings, get_settings
from tests.client import GQL, SubscriberCount
from tests.factories import Factory
from tests.sandbox import SandboxServer

POSTGRES_ADMIN_URL = os.environ.get(
    "MAILSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("MAILSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BACKEND = os.environ.get("MAILSYNC_TEST_DB", "sqlite")
SECRET = "test-secret-key-that-is-long-enough-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Chosen up front: the settings name both (OAuth redirect URI, Google endpoints).
API_PORT = free_port()
SANDBOX_PORT = free_port()


async def create_postgres_database() -> tuple[str, str]:
    name = f"mailsync_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return name, f"{base}/{name}"


async def drop_postgres_database(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    if BACKEND == "postgresql":
        name, url = await create_postgres_database()
        await asyncio.to_thread(migrations.upgrade, url)
        yield url
        await drop_postgres_database(name)
    else:
        path: Path = tmp_path_factory.mktemp("db") / "mailsync.db"
        url = f"sqlite+aiosqlite:///{path}"
        await asyncio.to_thread(migrations.upgrade, url)
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str) -> Iterator[Settings]:
    env = {
        "MAILSYNC_ENV": "test",
        "MAILSYNC_DATABASE_URL": database_url,
        "MAILSYNC_REDIS_URL": REDIS_URL,
        "MAILSYNC_SECRET_KEY": SECRET,
        "MAILSYNC_LOG_LEVEL": "WARNING",
        # Burst workers in tests should not wait for spread-out passes (tested on its own).
        "MAILSYNC_SYNC_SPREAD_SECONDS": "0",
        # The sandboxes file a sent message at once; a send retried in a test need not wait.
        "MAILSYNC_SEND_CONFIRM_SECONDS": "1",
        "MAILSYNC_PUBLIC_URL": f"http://127.0.0.1:{API_PORT}",
        "MAILSYNC_GOOGLE_BASE_URL": f"http://127.0.0.1:{SANDBOX_PORT}",
        "MAILSYNC_MICROSOFT_BASE_URL": f"http://127.0.0.1:{SANDBOX_PORT}",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    redis = Redis.from_url(REDIS_URL)
    await redis.flushdb()
    await redis.aclose()
    rt = await Runtime.create(settings, jobs=JobQueue)
    yield rt
    await rt.close()


class LiveServer:
    def __init__(self, settings: Settings, port: int | None = None, app: Any = None) -> None:
        self.port = port or free_port()
        self.app = app if app is not None else create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=2,
                **websocket_options(settings),
            )
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def subscribers(self, workspace_id: object) -> SubscriberCount:
        """Subscriptions of a workspace registered with this server's event hub."""

        async def count() -> int:
            return int(self.app.state.runtime.hub.subscribers_of(str(workspace_id)))

        return count

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@pytest.fixture(scope="session")
async def api(settings: Settings, runtime: Runtime) -> AsyncIterator[LiveServer]:
    server = LiveServer(settings, API_PORT)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def google_server(settings: Settings) -> AsyncIterator[SandboxServer]:
    # Pushes merged, not dropped, above one per 0.2 s: most tests wait for the push of each
    # change. Gmail's dropping (and the poll that makes up for it) has tests of its own.
    server = SandboxServer(GoogleSandbox(push_min_interval=0.2, merge_pushes=True), SANDBOX_PORT)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def google(
    google_server: SandboxServer, api: LiveServer, settings: Settings
) -> AsyncIterator[SandboxServer]:
    """The Google sandbox, pushing to the API's webhook, with no faults left from other tests."""
    google_server.google.push_endpoints["*"] = (
        f"{api.url}/webhooks/google?token={settings.push_token}"
    )
    yield google_server
    await google_server.google.drain_pushes()
    google_server.google.faults.clear()


@pytest.fixture
async def microsoft(google_server: SandboxServer, api: LiveServer) -> AsyncIterator[SandboxServer]:
    """The Microsoft sandbox (the same server as Google's), notifying the API's webhook."""
    yield google_server
    await google_server.microsoft.drain_notifications()
    await google_server.google.drain_pushes()
    google_server.google.faults.clear()


@pytest.fixture(scope="session")
def factory(runtime: Runtime) -> Factory:
    return Factory(runtime)


@pytest.fixture
def gql(api: LiveServer) -> GQL:
    return GQL(api.url)


@pytest.fixture(autouse=True)
def _reset_clock() -> Iterator[None]:
    yield
    clock.reset()


@pytest.fixture(autouse=True)
async def _empty_job_queue(request: pytest.FixtureRequest) -> None:
    if "runtime" in request.fixturenames:
        from tests.worker import clear_queue

        await clear_queue(request.getfixturevalue("runtime"))

"""A real single-page app on another origin: tests/spa (Apollo Client 4 with GraphQLWsLink,
bundled offline by esbuild) served from a second port, driven in headless Chromium."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import update
from sqlmodel import col
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from backend.auth.tables import Workspace
from backend.graphql.relay import to_global_id
from backend.kit.clock import now
from backend.settings import Settings
from tests.browser import chromium
from tests.client import WORK_TIMEOUT
from tests.conftest import LiveServer, free_port
from tests.factories import Factory, raw_message
from tests.sync_helpers import wait_until

pytestmark = pytest.mark.e2e  # bundles with node, starts two servers and Chromium

SPA_DIR = Path(__file__).parent / "spa"


@pytest.fixture(scope="module")
async def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """index.html and app.js, the example bundled with its pinned npm packages (no CDN)."""
    esbuild = SPA_DIR / "node_modules" / ".bin" / "esbuild"
    assert esbuild.exists(), "run `npm ci` in tests/spa (scripts/test does)"
    out = tmp_path_factory.mktemp("spa")
    proc = await asyncio.create_subprocess_exec(
        str(esbuild),
        "src/app.js",
        "--bundle",
        "--format=esm",
        f"--outfile={out / 'app.js'}",
        "--log-level=warning",
        cwd=SPA_DIR,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    shutil.copy(SPA_DIR / "index.html", out / "index.html")
    return out


@pytest.fixture
async def servers(settings: Settings, bundle: Path) -> AsyncIterator[tuple[LiveServer, str]]:
    """The API, allowing the SPA's origin, and a static server for the SPA on another port."""
    spa_port = free_port()
    spa_origin = f"http://127.0.0.1:{spa_port}"
    api = LiveServer(settings.model_copy(update={"cors_origins": spa_origin}))
    static = LiveServer(
        settings, spa_port, app=Starlette(routes=[Mount("/", StaticFiles(directory=bundle))])
    )
    await api.start()
    await static.start()
    try:
        yield api, spa_origin
    finally:
        await static.stop()
        await api.stop()


async def test_an_apollo_spa_on_another_origin_queries_pages_mutates_subscribes_and_reads_again(
    servers: tuple[LiveServer, str], factory: Factory
) -> None:
    api, spa_origin = servers
    owner = await factory.workspace()
    start = now() - timedelta(hours=1)
    mailbox = await factory.mailbox(owner, connected_at=start - timedelta(minutes=1))
    ann = await factory.contact(owner, "ann@spa.test", "Ann")
    for i in range(4):
        raw = raw_message(
            "Ann <ann@spa.test>", [owner.email], f"Mail {i}", date=start + timedelta(minutes=i)
        )
        assert (await factory.ingest(mailbox, raw)).email_id is not None
    query = urlencode(
        {"api": api.url, "token": owner.token, "contact": to_global_id("Contact", ann.id)}
    )
    subscribers = api.subscribers(owner.workspace.id)
    async with chromium(f"{spa_origin}/index.html?{query}") as page:
        await page.wait_for("window.spa && (window.spa.ready || window.spa.errors.length > 0)")
        assert await page.evaluate("window.spa.errors") == [], await page.evaluate("spa.steps")
        # The query's first page and fetchMore's second, merged into one cached list.
        assert await page.evaluate("window.spa.subjects") == [f"Mail {i}" for i in (3, 2, 1, 0)]
        # The mutation's Workspace (with its id) updated the watched query through the cache.
        await page.wait_for("window.spa.labelSyncedMail === true")

        async def subscribed() -> bool:
            return await subscribers() >= 2  # emailReceived and eventsMissed

        await wait_until(subscribed, WORK_TIMEOUT)
        await factory.ingest(
            mailbox, raw_message("Ann <ann@spa.test>", [owner.email], "Fresh", date=now())
        )
        # The event, with its cursor, was written into the cached timeline: on top.
        await page.wait_for("window.spa.subjects && window.spa.subjects[0] === 'Fresh'")
        assert await page.evaluate("window.spa.subjects") == [
            "Fresh",
            *(f"Mail {i}" for i in (3, 2, 1, 0)),
        ]
        assert await page.evaluate("window.spa.errors") == []

        # A change whose event was lost: the page reads again once told of the gap.
        async with factory.db.transaction() as session:
            await session.execute(
                update(Workspace)
                .where(col(Workspace.id) == owner.workspace.id)
                .values(name="Renamed unseen")
            )
        api.app.state.runtime.hub.notify_gap()
        await page.wait_for("window.spa.workspaceName === 'Renamed unseen'")
        await page.wait_for("window.spa.readAgain === 1")
        assert await page.evaluate("window.spa.subjects[0]") == "Fresh"
        assert await page.evaluate("window.spa.errors") == []

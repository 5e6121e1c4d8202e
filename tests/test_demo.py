"""The README's first command: `mailsync demo`, watched from GraphiQL in a real browser."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.browser import chromium
from tests.conftest import REDIS_URL, free_port

DEMO_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"


@pytest.fixture
async def demo_url() -> AsyncIterator[str]:
    redis = Redis.from_url(DEMO_REDIS_URL)
    await redis.flushdb()
    await redis.aclose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSYNC_")}
    env.update(
        {
            "MAILSYNC_REDIS_URL": DEMO_REDIS_URL,
            "MAILSYNC_DEMO_TRAFFIC_SECONDS": "1",
            "MAILSYNC_LOG_LEVEL": "WARNING",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backend.cli",
        "demo",
        "--port",
        str(free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        link = None
        async with asyncio.timeout(90):
            while link is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited before printing its GraphiQL link"
                if "/graphql?token=" in line:
                    link = line.strip()
        drain = asyncio.create_task(proc.stdout.read())
        yield link
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()


async def test_graphiql_from_the_demo_shows_email_received_events_offline(demo_url: str) -> None:
    async with chromium(demo_url) as page:
        await page.wait_for("!!document.querySelector('.graphiql-execute-button')", timeout=30)
        # Two operations in the editor: the run button opens (on pointerdown, as a Radix
        # menu does) a menu asking which one to run. Until GraphiQL has settled, the menu
        # may close again, so press until it stays open.
        await page.wait_for(
            "(() => { const live = [...document.querySelectorAll('[role=menuitem]')]"
            ".some(i => i.textContent.trim() === 'Live'); if (!live) document.querySelector("
            "'.graphiql-execute-button').dispatchEvent(new PointerEvent('pointerdown', "
            "{bubbles: true, button: 0, pointerType: 'mouse'})); return live; })()",
            timeout=20,
        )
        await page.evaluate(
            "[...document.querySelectorAll('[role=menuitem]')].find(i => i.textContent.trim() === 'Live').click()"
        )
        shown = await page.wait_for(
            "(() => { const r = document.querySelector('.graphiql-response');"
            " const t = r ? r.innerText : ''; return t.includes('emailReceived') ? t : ''; })()",
            timeout=45,
        )
    assert '"subject"' in shown and '"direction"' in shown

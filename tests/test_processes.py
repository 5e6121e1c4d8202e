"""Several API processes and a worker: one published event reaches subscribers on every API."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from backend.runtime import Runtime
from tests.client import WORK_TIMEOUT, SubscriberCount, subscribe
from tests.conftest import free_port
from tests.factories import Factory, raw_message
from tests.providers import fake_provider
from tests.worker import drain

pytestmark = pytest.mark.e2e  # starts two API processes

QUERY = "subscription { emailReceived { email { subject } contacts { name } } }"


def subscribers(ws_url: str) -> SubscriberCount:
    """Subscriptions the API process holds (it serves only this test), from /readyz."""
    url = ws_url.replace("ws://", "http://").replace("/graphql", "/readyz")

    async def count() -> int:
        async with httpx.AsyncClient(trust_env=False, timeout=WORK_TIMEOUT) as client:
            return int((await client.get(url)).json()["subscribers"])

    return count


@asynccontextmanager
async def api_process() -> AsyncIterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=WORK_TIMEOUT) as client:
            for _ in range(600):  # start-up imports take seconds on a loaded machine
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"API process exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                    )
                try:
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("API process did not become ready")
        yield f"ws://127.0.0.1:{port}/graphql"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_one_event_reaches_subscribers_on_two_api_processes(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "erin@five.test", "Erin")
    with fake_provider() as store:
        store.deliver(
            mailbox.email_address, raw_message("erin@five.test", [owner.email], "Both see me")
        )
        async with (
            api_process() as first,
            api_process() as second,
            subscribe(first, owner.token, QUERY, subscribers=subscribers(first)) as one,
            subscribe(second, owner.token, QUERY, subscribers=subscribers(second)) as two,
        ):
            await runtime.jobs.enqueue_sync(str(mailbox.id))
            assert await drain(runtime) == 1
            events = await asyncio.gather(one.next(), two.next())
            await one.nothing_within(0.5)  # published once, delivered once per subscriber
    for event in events:
        assert event["data"]["emailReceived"] == {
            "email": {"subject": "Both see me"},
            "contacts": [{"name": "Erin"}],
        }

"""Subscribers are told when they missed events: the hub's gap signal (`bus.GAP`) reaches
GraphQL clients as the `eventsMissed` subscription, over websockets (through the fan-out,
both protocols) and over multipart HTTP, for every workspace and with nothing of any; a
burst that outruns the websocket fan-out is dropped for a gap rather than held in memory."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import httpx
import pytest

from backend.api import fanout
from backend.api.subscriptions import EVENTS_MISSED_HINT
from backend.kit import clock
from backend.mailboxes.service import status_event
from backend.mailboxes.tables import MailboxStatus
from backend.runtime import Runtime
from tests.client import LEGACY_WS, WORK_TIMEOUT, subscribe
from tests.conftest import LiveServer
from tests.factories import Factory
from tests.sync_helpers import wait_until
from tests.test_graphql_over_http import MULTIPART, _more, _next_payload

EVENTS_MISSED = "subscription { eventsMissed { detectedAt hint } }"
STATUS_CHANGED = "subscription { mailboxStatusChanged { previousStatus } }"


def _recent(detected_at: str) -> bool:
    moment = datetime.fromisoformat(detected_at)
    return abs(clock.now() - moment) < timedelta(minutes=5)


async def test_websocket_subscribers_of_every_workspace_are_told_of_a_gap_and_of_nothing_else(
    api: LiveServer, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    stranger = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    hub = api.app.state.runtime.hub
    async with (
        subscribe(
            api.ws_url,
            owner.token,
            EVENTS_MISSED,
            subscribers=api.subscribers(owner.workspace.id),
        ) as mine,
        subscribe(
            api.ws_url,
            owner.token,
            STATUS_CHANGED,
            subscribers=api.subscribers(owner.workspace.id),
        ) as statuses,
        subscribe(
            api.ws_url,
            stranger.token,
            EVENTS_MISSED,
            LEGACY_WS,
            subscribers=api.subscribers(stranger.workspace.id),
        ) as theirs,
    ):
        # An ordinary event is no gap: once its own subscriber has it, the fan-out went past
        # it for every group of the workspace, so a gap is the first frame `mine` gets.
        await runtime.publish(str(owner.workspace.id), status_event(mailbox, MailboxStatus.ACTIVE))
        assert (await statuses.next())["data"]["mailboxStatusChanged"] == {
            "previousStatus": "ACTIVE"
        }
        gaps = hub.gaps
        hub.notify_gap()
        told = await mine.next()
        also_told = await theirs.next()
        await statuses.nothing_within(1.0)
    assert hub.gaps == gaps + 1
    event = told["data"]["eventsMissed"]
    assert set(event) == {"detectedAt", "hint"}
    assert event["hint"] == EVENTS_MISSED_HINT
    assert _recent(event["detectedAt"])
    # The same gap for every workspace, and nothing in it of any workspace.
    assert also_told == told


async def test_a_multipart_subscriber_is_told_of_a_gap(api: LiveServer, factory: Factory) -> None:
    owner = await factory.workspace()
    subscribers = api.subscribers(owner.workspace.id)
    before = await subscribers()
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=WORK_TIMEOUT) as client,
        client.stream(
            "POST",
            "/graphql",
            json={"query": EVENTS_MISSED},
            headers={"Accept": MULTIPART, "Authorization": f"Bearer {owner.token}"},
        ) as response,
    ):
        assert response.status_code == 200
        await wait_until(lambda: _more(subscribers, before), WORK_TIMEOUT)
        api.app.state.runtime.hub.notify_gap()
        async with asyncio.timeout(WORK_TIMEOUT):
            payload = await _next_payload(response)
    event = payload["data"]["eventsMissed"]
    assert event["hint"] == EVENTS_MISSED_HINT
    assert _recent(event["detectedAt"])


async def test_a_burst_beyond_the_fan_out_queue_becomes_a_gap_not_memory(
    api: LiveServer, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "PENDING_LIMIT", 5)
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    workspace_id = str(owner.workspace.id)
    runtime = api.app.state.runtime
    async with (
        subscribe(
            api.ws_url, owner.token, EVENTS_MISSED, subscribers=api.subscribers(owner.workspace.id)
        ) as missed,
        subscribe(
            api.ws_url, owner.token, STATUS_CHANGED, subscribers=api.subscribers(owner.workspace.id)
        ) as statuses,
    ):
        workspace = fanout.fanout_of(runtime).workspaces[workspace_id]
        previous = list(MailboxStatus)
        # Eight events in one go, before the fan-out's task gets to run (as a hub read of
        # hundreds of entries delivers them): the sixth finds five waiting.
        for n in range(8):
            runtime.hub._deliver(workspace_id, status_event(mailbox, previous[n % len(previous)]))
        assert len(workspace.pending) == 4 and workspace.gaps == 1
        told = await missed.next()
        kept = [(await statuses.next())["data"]["mailboxStatusChanged"] for _ in range(3)]
        await statuses.nothing_within(1.0)
    assert told["data"]["eventsMissed"]["hint"] == EVENTS_MISSED_HINT
    assert _recent(told["data"]["eventsMissed"]["detectedAt"])
    # What came after the drop is delivered, in order.
    assert kept == [{"previousStatus": previous[n % len(previous)].value} for n in (5, 6, 7)]

"""Websocket fan-out (api/fanout.py): one resolution per event and R17 class, no SQL per
subscriber, slow clients closed with a code while the others get every event."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import websockets
from graphql import parse
from sqlalchemy import update
from websockets.typing import Subprotocol

from backend.api import fanout
from backend.api.fanout import SLOW_CLIENT_CLOSE_CODE, class_safe
from backend.api.schema import build_schema
from backend.app import websocket_options
from backend.mail.service import email_received_event
from backend.mailboxes.tables import EmailVisibility, Mailbox
from backend.runtime import Runtime
from backend.settings import Settings
from tests.client import TRANSPORT_WS, Subscription, start, ws_connect
from tests.conftest import LiveServer
from tests.factories import Factory, Member, raw_message
from tests.sync_helpers import wait_until
from tests.test_query_count import counting

EMAIL = """
subscription {
  emailReceived {
    email { id subject snippet bodyText from { email contact { name } } mailbox { emailAddress } }
    contacts { name }
  }
}
"""

# `Thread.subject` depends on the viewer's access to the thread's other mail, not only to
# the event's email: such a document is resolved once per user and role.
EMAIL_WITH_THREAD = "subscription { emailReceived { email { subject thread { subject } } } }"

WAIT = 60.0


@asynccontextmanager
async def subscribers(
    server: LiveServer, members: list[Member], query: str, workspace_id: object
) -> AsyncIterator[list[Subscription]]:
    """One websocket subscription per member (repeat a member for several), all registered."""
    hub = server.app.state.runtime.hub
    before = hub.subscribers_of(str(workspace_id))
    async with AsyncExitStack() as stack:
        subs: list[Subscription] = []
        for batch in range(0, len(members), 50):

            async def one(member: Member) -> Subscription:
                ws, protocol = await stack.enter_async_context(
                    ws_connect(server.ws_url, member.token)
                )
                return await start(ws, protocol, "1", query)

            subs += await asyncio.gather(*(one(m) for m in members[batch : batch + 50]))

        async def registered() -> bool:
            return bool(hub.subscribers_of(str(workspace_id)) == before + len(members))

        await wait_until(registered, WAIT)
        yield subs


async def _set_visibility(runtime: Runtime, mailbox: Mailbox, visibility: EmailVisibility) -> None:
    async with runtime.db.transaction() as session:
        await session.execute(
            update(Mailbox).where(Mailbox.id == mailbox.id).values(visibility=visibility)  # type: ignore[arg-type]
        )


async def test_r17_200_subscribers_share_one_execution_per_class_and_no_sql_per_subscriber(
    api: LiveServer, factory: Factory, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    colleague = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "zoe@client.test", "Zoe")
    await _set_visibility(runtime, mailbox, EmailVisibility.SUBJECT_ONLY)
    executions: list[object] = []
    execute = fanout.WorkspaceFanout._execute

    async def counted(self: Any, group: Any, root: object, viewer: Any) -> str:
        executions.append(viewer)
        return await execute(self, group, root, viewer)

    monkeypatch.setattr(fanout.WorkspaceFanout, "_execute", counted)

    async def deliver(subs: list[Subscription], subject: str) -> tuple[list[Any], int]:
        executions.clear()
        with counting(api) as statements:
            await factory.email(
                owner, mailbox, raw_message("zoe@client.test", [owner.email], subject, "Secret")
            )
            events = [(await s.next(WAIT))["data"]["emailReceived"] for s in subs]
        return events, len(statements)

    async with subscribers(api, [owner], EMAIL, owner.workspace.id) as one:
        # The first event of a workspace also fills the process's own-address cache.
        await deliver(one, "Warms the caches")
        _, alone = await deliver(one, "One reader")
    assert len(executions) == 1

    many = [owner] * 100 + [colleague] * 100
    async with subscribers(api, many, EMAIL, owner.workspace.id) as subs:
        events, crowd = await deliver(subs, "Two hundred readers")

    # The same statements for 200 subscribers as for one: the event's rows, loaded once.
    assert crowd == alone, (crowd, alone)
    # One execution for the owner's class, one for the colleagues'.
    assert len(executions) == 2
    mine, theirs = events[0], events[-1]
    assert all(e == mine for e in events[:100]) and all(e == theirs for e in events[100:])
    assert mine["email"]["subject"] == theirs["email"]["subject"] == "Two hundred readers"
    assert mine["email"]["bodyText"] == "Secret\n" and mine["email"]["snippet"] == "Secret"
    assert theirs["email"]["bodyText"] is None and theirs["email"]["snippet"] is None
    assert mine["email"]["mailbox"] == {"emailAddress": mailbox.email_address}
    assert theirs["email"]["mailbox"] is None  # a colleague does not manage the mailbox
    assert mine["contacts"] == theirs["contacts"] == [{"name": "Zoe"}]


async def test_r17_metadata_only_and_documents_that_depend_on_the_viewer(
    api: LiveServer, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    admin = await factory.member(owner, role=owner.user.role)
    colleague = await factory.member(owner)
    stranger = await factory.workspace()
    mailbox = await factory.mailbox(colleague)
    await factory.contact(owner, "yan@client.test", "Yan")
    await factory.contact(stranger, "yan@client.test", "Yan")
    await _set_visibility(runtime, mailbox, EmailVisibility.METADATA_ONLY)
    async with (
        subscribers(api, [colleague, admin, owner], EMAIL, owner.workspace.id) as plain,
        subscribers(api, [colleague, owner], EMAIL_WITH_THREAD, owner.workspace.id) as threaded,
        subscribers(api, [stranger], EMAIL, stranger.workspace.id) as others,
    ):
        await factory.email(
            colleague, mailbox, raw_message("yan@client.test", [colleague.email], "Plans", "Body")
        )
        mine, admins, owners = [(await s.next(WAIT))["data"]["emailReceived"] for s in plain]
        my_thread, their_thread = [
            (await s.next(WAIT))["data"]["emailReceived"]["email"] for s in threaded
        ]
        await others[0].nothing_within(1.0)
    assert mine["email"]["subject"] == "Plans" and mine["email"]["bodyText"] == "Body\n"
    for seen in (admins, owners):  # the workspace's owner and an admin are colleagues too
        assert seen["email"]["subject"] is None and seen["email"]["bodyText"] is None
        assert seen["email"]["from"] == mine["email"]["from"]
        assert seen["email"]["mailbox"] == {"emailAddress": mailbox.email_address}
    assert my_thread == {"subject": "Plans", "thread": {"subject": "Plans"}}
    assert their_thread == {"subject": None, "thread": {"subject": None}}


def test_r17_documents_reading_only_the_event_share_results_across_users() -> None:
    built = build_schema()._schema

    def safe(query: str) -> bool:
        document = parse(query)
        operation = document.definitions[0]
        fragments = {d.name.value: d for d in document.definitions[1:]}  # type: ignore[attr-defined]
        return class_safe(built, operation, fragments)  # type: ignore[arg-type]

    assert safe(EMAIL)
    assert safe(
        "subscription { syncPassCompleted { mailbox { status lastError { code } } filed } }"
    )
    assert safe(
        "subscription { emailReceived { ...E } } fragment E on EmailEvent { email { id } cursor }"
    )
    assert safe("subscription { eventsMissed { detectedAt hint } }")
    assert not safe(EMAIL_WITH_THREAD)
    assert not safe(
        "subscription { emailReceived { ...E } } fragment E on EmailEvent { contacts { timeline { totalCount } } }"
    )
    assert not safe(
        "subscription { mailboxStatusChanged { mailbox { owner { mailboxes { id } } } } }"
    )


async def _slow_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer, so a client that stops reading backs the
    server up soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_slow_client_is_closed_with_a_code_and_the_others_get_every_event(
    settings: Settings, factory: Factory, runtime: Runtime
) -> None:
    server = LiveServer(settings.model_copy(update={"ws_send_queue": 4}))
    await server.start()
    try:
        owner = await factory.workspace()
        mailbox = await factory.mailbox(owner)
        await factory.contact(owner, "big@client.test", "Big")
        body = "\n".join(
            f"line {i} of a long message, long enough to fill buffers" for i in range(5000)
        )
        email = await factory.email(
            owner, mailbox, raw_message("big@client.test", [owner.email], "Large", body)
        )
        query = "subscription { emailReceived { email { subject bodyText } } }"
        hub = server.app.state.runtime.hub
        async with (
            subscribers(server, [owner], query, owner.workspace.id) as (fast,),
            websockets.connect(
                server.ws_url,
                subprotocols=[Subprotocol(TRANSPORT_WS)],
                sock=await _slow_socket(server.port),
                max_queue=1,
                open_timeout=WAIT,
            ) as slow,
        ):
            await slow.send(
                json.dumps(
                    {
                        "type": "connection_init",
                        "payload": {"Authorization": f"Bearer {owner.token}"},
                    }
                )
            )
            assert json.loads(await slow.recv())["type"] == "connection_ack"
            await slow.send(
                json.dumps({"id": "s", "type": "subscribe", "payload": {"query": query}})
            )

            async def registered() -> bool:
                return bool(hub.subscribers_of(str(owner.workspace.id)) == 2)

            await wait_until(registered, WAIT)
            events = 100
            event = email_received_event(email.id, email.thread_id, mailbox.id, [])

            async def read_fast() -> list[str]:
                return [
                    (await fast.next(WAIT))["data"]["emailReceived"]["email"]["subject"]
                    for _ in range(events)
                ]

            # The fast client reads as events come; the slow one reads nothing for now.
            reading = asyncio.create_task(read_fast())
            for _ in range(events):
                await runtime.bus.publish(str(owner.workspace.id), event)
            # The fast client is not held up by the slow one, and misses nothing.
            assert await reading == ["Large"] * events
            # The slow client reads at last: what was written before the overflow, then the close.
            frames = 0
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(WAIT):
                    while True:
                        message = json.loads(await slow.recv())
                        assert message["type"] == "next" and message["id"] == "s"
                        frames += 1
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == SLOW_CLIENT_CLOSE_CODE
        assert frames < events
    finally:
        await server.stop()


def test_per_message_deflate_is_off_by_default_and_a_setting(settings: Settings) -> None:
    assert Settings().ws_per_message_deflate is False
    assert websocket_options(settings)["ws_per_message_deflate"] is False
    on = settings.model_copy(update={"ws_per_message_deflate": True})
    assert websocket_options(on)["ws_per_message_deflate"] is True


async def test_deflate_is_negotiated_only_when_set(settings: Settings, api: LiveServer) -> None:
    async def extensions(server: LiveServer) -> str | None:
        async with websockets.connect(
            server.ws_url, subprotocols=[Subprotocol(TRANSPORT_WS)], open_timeout=WAIT
        ) as ws:  # the client offers permessage-deflate
            assert ws.response is not None
            value: str | None = ws.response.headers.get("Sec-WebSocket-Extensions")
            return value

    assert await extensions(api) is None
    server = LiveServer(settings.model_copy(update={"ws_per_message_deflate": True}))
    await server.start()
    try:
        assert "permessage-deflate" in (await extensions(server) or "")
    finally:
        await server.stop()


async def test_an_unexpected_error_in_a_shared_execution_is_masked_and_the_subscription_lives(
    api: LiveServer, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "err@client.test", "Err")
    query = "subscription { emailReceived { email { subject bodyHtml } } }"

    def broken(html: str) -> str:
        raise RuntimeError("sanitizer exploded")

    monkeypatch.setattr("backend.timeline.types.without_remote_images", broken)
    async with subscribers(api, [owner, owner], query, owner.workspace.id) as subs:
        for subject in ("First", "Second"):
            await factory.email(
                owner,
                mailbox,
                raw_message("err@client.test", [owner.email], subject, html="<p>Hi</p>"),
            )
            for sub in subs:
                payload = await sub.next(WAIT)
                email = payload["data"]["emailReceived"]["email"]
                assert email == {"subject": subject, "bodyHtml": None}
                assert [e["message"] for e in payload["errors"]] == ["Unexpected error."]
                assert "sanitizer" not in json.dumps(payload)

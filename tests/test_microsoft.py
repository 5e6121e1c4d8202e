"""Outlook end to end: GraphQL and websockets on the API, the real msgraph-sdk inside the
worker's provider, and the Microsoft sandbox on a real port playing Graph and its users."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from msgraph.generated.users.item.messages.item.create_reply.create_reply_post_request_body import (
    CreateReplyPostRequestBody,
)

from backend.graphql.relay import parse_global_id, to_global_id
from backend.mail.tables import EmailDirection
from backend.mailboxes.service import read_credentials, write_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import SyncErrorCode
from backend.providers.microsoft.provider import MicrosoftProvider, client_state
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from backend.sync.status import MESSAGES
from tests.client import GQL, subscribe
from tests.conftest import LiveServer
from tests.factories import Factory, Member, raw_message, unique
from tests.sandbox import SandboxServer
from tests.sync_helpers import error_codes, reload_mailbox, wait_until
from tests.test_gmail import DISCONNECT, RECONNECT, SETTINGS, emails_of, follow_consent
from tests.test_gmail import connect as connect_gmail
from tests.test_gmail import deliver as deliver_gmail
from tests.worker import drain, idle, live_worker

CONNECT = """
mutation($input: ConnectMailboxInput!) {
  connectMailbox(input: $input) { authorizationUrl userErrors { code field message } }
}"""
EMAIL_RECEIVED = """
subscription { emailReceived { email { subject direction } contacts { name } } }"""


async def connect(gql: GQL, member: Member, address: str) -> uuid.UUID:
    body = await gql(
        CONNECT, {"input": {"provider": "MICROSOFT", "loginHint": address}}, token=member.token
    )
    payload = body["connectMailbox"]
    assert payload["userErrors"] == []
    assert "/oauth2/v2.0/authorize?" in payload["authorizationUrl"]
    async with httpx.AsyncClient(trust_env=False) as browser:
        consent = await browser.get(payload["authorizationUrl"])
        assert consent.status_code == 302, consent.text
        callback = await browser.get(consent.headers["location"])
        assert callback.status_code == 302, callback.text
    landed = parse_qs(urlsplit(callback.headers["location"]).query)
    assert "error" not in landed, landed
    parsed = parse_global_id(landed["mailboxId"][0])
    assert parsed is not None
    return parsed[1]


async def connected(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> tuple[Member, uuid.UUID, str]:
    """A workspace whose owner connected Outlook and had a first (empty) pass."""
    owner = await factory.workspace()
    address = f"{unique('ol')}@outlook.sandbox.test"
    microsoft.microsoft.ensure_account(address, ["sales@contoso.sandbox.test"])
    mailbox_id = await connect(gql, owner, address)
    await drain(runtime)
    return owner, mailbox_id, address


def subscription_of(microsoft: SandboxServer, address: str) -> Any:
    found = [s for s in microsoft.microsoft.subscriptions.values() if s.account == address]
    assert len(found) == 1, found
    return found[0]


async def settle(microsoft: SandboxServer, runtime: Runtime) -> None:
    await microsoft.microsoft.drain_notifications()
    await drain(runtime)


async def test_oauth_connect_then_the_first_pass_subscribes(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    shown = await gql(
        "query($id: ID!) { mailbox(id: $id) { emailAddress aliases status provider } }",
        {"id": to_global_id("Mailbox", mailbox_id)},
        token=owner.token,
    )
    assert shown["mailbox"] == {
        "emailAddress": address,
        "aliases": ["sales@contoso.sandbox.test"],
        "status": "PENDING",
        "provider": "MICROSOFT",
    }
    row = await reload_mailbox(runtime, mailbox_id)
    credentials = read_credentials(runtime.settings.secret, row)
    assert credentials["refresh_token"] not in (row.credentials_encrypted or "")
    subscription = subscription_of(microsoft, address)
    assert subscription.notification_url.endswith("/webhooks/microsoft")
    assert subscription.client_state == client_state(runtime.settings, str(mailbox_id))
    assert credentials.get("subscription_id") == subscription.id
    assert row.push_renewed_at is not None
    assert set((row.cursor or {}).get("delta", {})) == {"inbox", "sentitems"}


async def test_r14_outlook_mail_is_announced_within_2s_of_the_change_notification(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "ann@client.test", "Ann Client")
    sent = microsoft.microsoft.notifications_sent
    async with (
        live_worker(runtime),
        subscribe(
            api.ws_url, owner.token, EMAIL_RECEIVED, subscribers=api.subscribers(owner.workspace.id)
        ) as sub,
    ):
        delivered = time.monotonic()
        microsoft.microsoft.deliver(
            address, raw_message("Ann <ann@client.test>", [address], "Quote", "Numbers")
        )
        event = (await sub.next())["data"]["emailReceived"]
        elapsed = time.monotonic() - delivered
    assert microsoft.microsoft.notifications_sent > sent
    assert elapsed < 2.0, f"emailReceived {elapsed:.2f}s after the delivery"
    assert event == {
        "email": {"subject": "Quote", "direction": "INCOMING"},
        "contacts": [{"name": "Ann Client"}],
    }
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE


async def test_r9_a_reply_sent_from_outlook_is_filed_outgoing_in_the_same_thread(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "bob@client.test", "Bob")
    received = microsoft.microsoft.deliver(
        address,
        raw_message("bob@client.test", [address], "Pricing", "?", message_id="<p-1@client.test>"),
    )
    await settle(microsoft, runtime)
    graph, http = microsoft.graph(address)
    try:
        draft = await graph.me.messages.by_message_id(received.id).create_reply.post(
            CreateReplyPostRequestBody(comment="Ten.")
        )
        await graph.me.messages.by_message_id(draft.id).send.post()
    finally:
        await http.aclose()
    await settle(microsoft, runtime)
    emails = sorted(await emails_of(runtime, owner.workspace.id), key=lambda e: e.subject or "")
    assert [(e.subject, e.direction) for e in emails] == [
        ("Pricing", EmailDirection.INCOMING),
        ("RE: Pricing", EmailDirection.OUTGOING),
    ]
    assert emails[0].thread_id == emails[1].thread_id


async def test_expired_delta_token_resyncs_since_the_connection_without_duplicates(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "cy@client.test", "Cy")
    for n in range(3):
        microsoft.microsoft.deliver(
            address, raw_message("cy@client.test", [address], f"Before {n}")
        )
    await settle(microsoft, runtime)
    microsoft.microsoft.expire_delta(address)
    microsoft.microsoft.deliver(address, raw_message("cy@client.test", [address], "After"))
    await settle(microsoft, runtime)
    subjects = sorted(e.subject or "" for e in await emails_of(runtime, owner.workspace.id))
    assert subjects == ["After", "Before 0", "Before 1", "Before 2"]
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.ACTIVE
    assert await error_codes(runtime, mailbox_id) == []


async def test_429_with_retry_after_is_honoured_and_the_pass_succeeds(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "di@client.test", "Di")
    microsoft.microsoft.deliver(address, raw_message("di@client.test", [address], "Hello"))
    fault = microsoft.microsoft.faults.add(
        Fault(status=429, retry_after=1, account=address, path="/delta", times=1)
    )
    started = time.monotonic()
    await settle(microsoft, runtime)
    assert fault.hits == 1 and time.monotonic() - started >= 1.0
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Hello"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE
    assert await error_codes(runtime, mailbox_id) == []


async def test_webhook_answers_the_handshake_and_refuses_a_wrong_client_state(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    _, mailbox_id, _ = await connected(gql, factory, microsoft, runtime)
    async with httpx.AsyncClient(base_url=api.url, trust_env=False) as http:
        token = "Validation: Testing client application reachability 1a2b"
        handshake = await http.post("/webhooks/microsoft", params={"validationToken": token})
        assert handshake.status_code == 200 and handshake.text == token
        assert handshake.headers["content-type"].startswith("text/plain")
        forged = {
            "value": [
                {
                    "subscriptionId": "x",
                    "changeType": "created",
                    "clientState": f"{mailbox_id}.{'0' * 64}",
                }
            ]
        }
        refused = await http.post("/webhooks/microsoft", json=forged)
        assert refused.status_code == 403
        assert not await runtime.redis.zcard("arq:queue")
        genuine = {
            "value": [
                {
                    "subscriptionId": "x",
                    "changeType": "created",
                    "clientState": client_state(runtime.settings, str(mailbox_id)),
                }
            ]
        }
        accepted = await http.post("/webhooks/microsoft", json=genuine)
        assert accepted.status_code == 202
        assert await runtime.redis.zcard("arq:queue") == 1


async def test_subscription_removed_is_recreated_and_missed_mail_is_filed(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "eve@client.test", "Eve")
    first = subscription_of(microsoft, address)
    microsoft.microsoft.lifecycle(first.id, "subscriptionRemoved")
    # Mail arriving while no subscription exists: nobody is told.
    microsoft.microsoft.deliver(address, raw_message("eve@client.test", [address], "Missed"))
    await settle(microsoft, runtime)
    second = subscription_of(microsoft, address)
    assert second.id != first.id
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Missed"]
    credentials = read_credentials(
        runtime.settings.secret, await reload_mailbox(runtime, mailbox_id)
    )
    assert credentials["subscription_id"] == second.id


async def test_reauthorization_required_renews_the_same_subscription(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "ida@client.test", "Ida")
    subscription = subscription_of(microsoft, address)
    subscription.expires = datetime.now(UTC) + timedelta(minutes=20)
    microsoft.microsoft.lifecycle(subscription.id, "reauthorizationRequired")
    microsoft.microsoft.deliver(address, raw_message("ida@client.test", [address], "Still here"))
    await settle(microsoft, runtime)
    renewed = subscription_of(microsoft, address)
    assert renewed.id == subscription.id
    assert renewed.expires > datetime.now(UTC) + timedelta(days=1)
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Still here"]


async def test_r13_an_expired_token_is_refreshed_and_a_401_after_refresh_is_access_denied(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "jo@client.test", "Jo")
    microsoft.microsoft.deliver(address, raw_message("jo@client.test", [address], "One"))
    # Graph refuses the access token once: a refresh and the same call again.
    once = microsoft.microsoft.faults.add(
        Fault(status=401, account=address, path="/delta", times=1)
    )
    await settle(microsoft, runtime)
    assert once.hits == 1
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["One"]
    assert await error_codes(runtime, mailbox_id) == []
    # Refused even with a fresh token: consent or the licence is gone.
    microsoft.microsoft.faults.add(Fault(status=401, account=address, path="/delta"))
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    assert await error_codes(runtime, mailbox_id) == ["ACCESS_DENIED"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ERROR


async def test_r13_a_503_is_provider_unavailable_and_a_later_pass_catches_up(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "kai@client.test", "Kai")
    outage = microsoft.microsoft.faults.add(Fault(status=503, account=address, path="/delta"))
    microsoft.microsoft.deliver(address, raw_message("kai@client.test", [address], "During"))
    await settle(microsoft, runtime)
    assert outage.hits >= 1
    assert await error_codes(runtime, mailbox_id) == ["PROVIDER_UNAVAILABLE"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ERROR
    microsoft.microsoft.faults.clear()
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["During"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE


async def test_r8_mail_sent_from_a_proxy_address_is_outgoing(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "lu@client.test", "Lu")
    # `connected` gives the account the proxy address sales@contoso.sandbox.test.
    microsoft.microsoft.deliver(
        address,
        raw_message("sales@contoso.sandbox.test", ["lu@client.test"], "From the alias"),
        folder="sentitems",
    )
    await settle(microsoft, runtime)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [(e.subject, e.direction) for e in emails] == [
        ("From the alias", EmailDirection.OUTGOING)
    ]


async def test_r7_mail_between_gmail_and_outlook_of_one_workspace_is_stored_once(
    gql: GQL,
    factory: Factory,
    microsoft: SandboxServer,
    runtime: Runtime,
    google: SandboxServer,
) -> None:
    owner, _, outlook = await connected(gql, factory, microsoft, runtime)
    colleague = await factory.member(owner, name="Colleague")
    gmail = f"{unique('gm')}@gmail.sandbox.test"
    microsoft.google.ensure_account(gmail)
    await connect_gmail(gql, colleague, gmail)
    await drain(runtime)
    await factory.contact(owner, "fay@client.test", "Fay")
    # A contact writes to both users at once; then the Outlook user answers all.
    raw = raw_message(
        "fay@client.test", [outlook, gmail], "Both of you", "Hi", message_id="<both@client.test>"
    )
    microsoft.microsoft.deliver(outlook, raw)
    await deliver_gmail(google, gmail, raw)
    await settle(microsoft, runtime)
    await google.google.drain_pushes()
    await drain(runtime)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [e.subject for e in emails] == ["Both of you"]


async def test_r13_revoked_grant_is_access_revoked_and_rotated_tokens_are_stored(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    before = read_credentials(runtime.settings.secret, await reload_mailbox(runtime, mailbox_id))
    microsoft.microsoft.expire_access_tokens(address)
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    after = read_credentials(runtime.settings.secret, await reload_mailbox(runtime, mailbox_id))
    assert after["refresh_token"] != before["refresh_token"]  # rotated, and kept
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.PENDING

    microsoft.microsoft.revoke_account(address)
    microsoft.microsoft.expire_access_tokens(address)
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.ERROR
    assert await error_codes(runtime, mailbox_id) == ["ACCESS_REVOKED"]
    assert MESSAGES[SyncErrorCode.ACCESS_REVOKED]


class Killed(BaseException):
    """The worker dies here: nothing after this runs, nothing of the pass commits."""


async def test_a_rotated_refresh_token_is_stored_before_the_pass_dies(
    gql: GQL,
    factory: Factory,
    microsoft: SandboxServer,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Microsoft rotates the refresh token on each refresh and asks clients to replace the
    stored one (the used one is not revoked, but lapses on its own): kept in memory until the
    pass's commit, the new one was lost when the worker died."""
    from backend.sync import service
    from backend.sync.jobs import run_pass

    _, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    secret = runtime.settings.secret
    async with runtime.unit_of_work() as work:
        row = await work.session.get(Mailbox, mailbox_id)
        assert row is not None
        lapsing = read_credentials(secret, row)
        lapsing["expires_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        write_credentials(secret, row, lapsing)
        work.session.add(row)

    async def die(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(service, "renew_push", die)  # after the pass talked to Graph
    with pytest.raises(Killed):
        await run_pass(runtime, mailbox_id)
    stored = read_credentials(secret, await reload_mailbox(runtime, mailbox_id))
    assert stored["refresh_token"] != lapsing["refresh_token"]
    assert stored["expires_at"] > lapsing["expires_at"]

    # The next pass works with what was stored.
    monkeypatch.undo()
    microsoft.microsoft.expire_access_tokens(address)
    result = await run_pass(runtime, mailbox_id)
    assert result is not None and result.error is None
    assert await error_codes(runtime, mailbox_id) == []


async def test_a_mailbox_without_exchange_online_is_mailbox_not_found(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    microsoft.microsoft.account(address).enabled = False  # type: ignore[union-attr]
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    assert await error_codes(runtime, mailbox_id) == ["MAILBOX_NOT_FOUND"]


async def test_provider_replies_in_the_conversation_and_sets_the_crm_category(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    client = "gus@client.test"
    original = microsoft.microsoft.deliver(
        address, raw_message(client, [address], "Offer", "?", message_id="<o-1@c.test>")
    )
    mailbox = await reload_mailbox(runtime, mailbox_id)
    provider = MicrosoftProvider(
        mailbox, read_credentials(runtime.settings.secret, mailbox), runtime.settings
    )
    try:
        sent = await provider.send(
            raw_message(address, [client], "Re: Offer", "Yes", in_reply_to="<o-1@c.test>"),
            original.conversation_id,
        )
        await provider.mark([original.id], "CRM")
        await provider.mark([original.id], "CRM")
        fresh = await provider.send(raw_message(address, [client], "New topic", "Hello"))
    finally:
        await provider.close()
    account = microsoft.microsoft.account(address)
    assert account is not None
    sent_items = [
        m for m in account.messages.values() if m.folder_id == account.folder("sentitems").id
    ]
    reply = next(m for m in sent_items if m.parsed()["Subject"] == "Re: Offer")
    assert reply.conversation_id == original.conversation_id == sent.thread_id
    assert reply.parsed()["In-Reply-To"] == "<o-1@c.test>"
    other = next(m for m in sent_items if m.parsed()["Subject"] == "New topic")
    assert other.conversation_id != original.conversation_id
    # sendMail answers 202 without an id; the provider finds the Sent copy by Message-ID.
    assert fresh.provider_id == other.id
    assert original.categories == ["CRM"]


async def test_synced_outlook_mail_gets_the_crm_category_when_the_workspace_asks_for_it(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "mo@client.test", "Mo")
    changed = await gql(SETTINGS, {"on": True}, token=owner.token)
    assert changed["updateWorkspaceSettings"]["userErrors"] == []
    filed = microsoft.microsoft.deliver(
        address, raw_message("mo@client.test", [address], "Categorised")
    )
    stranger = microsoft.microsoft.deliver(
        address, raw_message("nobody@elsewhere.test", [address], "Not on a timeline")
    )
    await settle(microsoft, runtime)
    assert filed.categories == ["CRM"]
    assert stranger.categories == []
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Categorised"]


async def test_disconnecting_deletes_the_subscription_and_forgets_the_credentials(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    subscription_of(microsoft, address)
    done = await gql(DISCONNECT, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token)
    assert done["disconnectMailbox"] == {"mailbox": {"status": "DISCONNECTED"}, "userErrors": []}
    await drain(runtime)
    assert [s for s in microsoft.microsoft.subscriptions.values() if s.account == address] == []
    assert (await reload_mailbox(runtime, mailbox_id)).credentials_encrypted is None
    # A late notification for it is acknowledged and runs nothing.
    late = {
        "value": [
            {
                "subscriptionId": "gone",
                "changeType": "created",
                "clientState": client_state(runtime.settings, str(mailbox_id)),
            }
        ]
    }
    async with httpx.AsyncClient(base_url=api.url, trust_env=False) as http:
        assert (await http.post("/webhooks/microsoft", json=late)).status_code == 202
    assert not await runtime.redis.zcard("arq:queue")


async def test_reconnecting_while_the_disconnect_is_released_keeps_the_new_credentials(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, microsoft, runtime)
    await factory.contact(owner, "ned@client.test", "Ned")
    mailbox_gid = to_global_id("Mailbox", mailbox_id)
    slow = microsoft.microsoft.faults.add(
        Fault(delay_seconds=1.5, account=address, method="DELETE", path="/subscriptions", times=1)
    )
    async with live_worker(runtime) as worker:
        await gql(DISCONNECT, {"id": mailbox_gid}, token=owner.token)

        async def deleting() -> bool:
            return slow.hits > 0

        await wait_until(deleting, 30)
        # The user reconnects while the worker is still stopping the old subscription.
        url = (await gql(RECONNECT, {"id": mailbox_gid}, token=owner.token))["reconnectMailbox"][
            "authorizationUrl"
        ]
        landed = await follow_consent(url)
        assert landed["status"] == ["PENDING"]

        async def released() -> bool:  # the slow release, and any pass it earned, have ended
            return await idle(runtime, worker)

        await wait_until(released, 30)
    await drain(runtime)
    microsoft.microsoft.deliver(address, raw_message("ned@client.test", [address], "After"))
    await settle(microsoft, runtime)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.credentials_encrypted is not None
    assert mailbox.status == MailboxStatus.ACTIVE
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["After"]
    assert subscription_of(microsoft, address) is not None


async def test_a_failing_mailbox_keeps_its_backoff_but_its_subscription_is_marked_for_renewal(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    _, mailbox_id, _ = await connected(gql, factory, microsoft, runtime)
    async with runtime.db.transaction() as session:
        row = await session.get(Mailbox, mailbox_id)
        assert row is not None and row.push_renewed_at is not None
        row.status = MailboxStatus.ERROR
    removed = {
        "value": [
            {
                "subscriptionId": "x",
                "lifecycleEvent": "subscriptionRemoved",
                "clientState": client_state(runtime.settings, str(mailbox_id)),
            }
        ]
    }
    async with httpx.AsyncClient(base_url=api.url, trust_env=False) as http:
        assert (await http.post("/webhooks/microsoft", json=removed)).status_code == 202
    assert not await runtime.redis.zcard("arq:queue")
    assert (await reload_mailbox(runtime, mailbox_id)).push_renewed_at is None

"""Gmail end to end: GraphQL and websockets on the API, the real Google client inside the
worker's provider, and the Google sandbox on a real port playing Gmail and its users."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlmodel import select

from backend.graphql.relay import to_global_id
from backend.kit import clock
from backend.mail.tables import Email, EmailDirection
from backend.mailboxes.service import read_credentials
from backend.mailboxes.tables import MailboxStatus
from backend.providers.base import SyncErrorCode
from backend.providers.gmail.provider import GmailProvider
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from backend.sync.status import MESSAGES
from tests.client import GQL, subscribe
from tests.conftest import LiveServer
from tests.factories import Factory, Member, raw_message, unique
from tests.sandbox import SandboxServer, call, raw_b64
from tests.sync_helpers import error_codes, reload_mailbox
from tests.worker import drain, live_worker

CONNECT = """
mutation($input: ConnectMailboxInput!) {
  connectMailbox(input: $input) { authorizationUrl userErrors { code field message } }
}"""
DISCONNECT = """
mutation($id: ID!) { disconnectMailbox(input: {id: $id}) { mailbox { status } userErrors { code } } }"""
RECONNECT = """
mutation($id: ID!) { reconnectMailbox(id: $id) { authorizationUrl userErrors { code } } }"""
MAILBOX = """
query($id: ID!) { mailbox(id: $id) { id emailAddress aliases status provider } }"""
EMAIL_RECEIVED = """
subscription { emailReceived { email { subject direction } contacts { name } } }"""


async def follow_consent(url: str) -> dict[str, list[str]]:
    """The user's browser: the consent screen, then mailsync's callback, then the app."""
    async with httpx.AsyncClient(trust_env=False) as browser:
        consent = await browser.get(url)
        assert consent.status_code == 302, consent.text
        callback = await browser.get(consent.headers["location"])
        assert callback.status_code == 302, callback.text
    return parse_qs(urlsplit(callback.headers["location"]).query)


async def connect(gql: GQL, member: Member, address: str) -> uuid.UUID:
    body = await gql(
        CONNECT, {"input": {"provider": "GMAIL", "loginHint": address}}, token=member.token
    )
    payload = body["connectMailbox"]
    assert payload["userErrors"] == []
    landed = await follow_consent(payload["authorizationUrl"])
    assert "error" not in landed, landed
    from backend.graphql.relay import parse_global_id

    parsed = parse_global_id(landed["mailboxId"][0])
    assert parsed is not None
    return parsed[1]


async def connected(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    aliases: list[str] | None = None,
) -> tuple[Member, uuid.UUID, str]:
    """A workspace whose owner connected Gmail and had a first (empty) pass."""
    owner = await factory.workspace()
    address = f"{unique('gm')}@gmail.sandbox.test"
    google.google.ensure_account(address, aliases)
    mailbox_id = await connect(gql, owner, address)
    await drain(runtime)
    return owner, mailbox_id, address


async def deliver(google: SandboxServer, address: str, raw: bytes) -> dict[str, Any]:
    box = google.gmail(address)
    body = {"raw": raw_b64(raw), "labelIds": ["INBOX", "UNREAD"]}
    result: dict[str, Any] = await call(box.users().messages().insert(userId="me", body=body))
    return result


async def settle(google: SandboxServer) -> None:
    """Wait until the sandbox delivered its pending pushes (each enqueues a pass)."""
    await google.google.drain_pushes()


async def emails_of(runtime: Runtime, workspace_id: uuid.UUID) -> list[Email]:
    async with runtime.db.sessionmaker() as session:
        return list(
            await session.scalars(
                select(Email).where(Email.workspace_id == workspace_id).order_by(Email.sent_at)
            )
        )


async def test_oauth_connect_creates_a_pending_mailbox_then_watches(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    address = f"{unique('gm')}@gmail.sandbox.test"
    google.google.ensure_account(address, aliases=["sales@team.sandbox.test"])
    mailbox_id = await connect(gql, owner, address)
    shown = await gql(MAILBOX, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token)
    assert shown["mailbox"] == {
        "id": to_global_id("Mailbox", mailbox_id),
        "emailAddress": address,
        "aliases": ["sales@team.sandbox.test"],
        "status": "PENDING",
        "provider": "GMAIL",
    }
    row = await reload_mailbox(runtime, mailbox_id)
    credentials = read_credentials(runtime.settings.secret, row)
    assert credentials["refresh_token"] and credentials["refresh_token"] not in (
        row.credentials_encrypted or ""
    )
    assert row.cursor and row.cursor["historyId"]
    assert google.google.account(address).watch is None  # type: ignore[union-attr]
    await drain(runtime)
    account = google.google.account(address)
    assert account is not None and account.watch is not None
    assert account.watch.topic == runtime.settings.google_pubsub_topic
    assert set(account.watch.label_ids) == {"INBOX", "SENT"}
    assert (await reload_mailbox(runtime, mailbox_id)).push_renewed_at is not None


async def test_connect_errors_come_back_to_the_app(
    gql: GQL, factory: Factory, google: SandboxServer
) -> None:
    owner = await factory.workspace()
    bad = await gql(
        CONNECT, {"input": {"provider": "GMAIL", "loginHint": "not-an-address"}}, token=owner.token
    )
    assert bad["connectMailbox"]["userErrors"][0]["code"] == "INVALID_EMAIL"
    imap = await gql(CONNECT, {"input": {"provider": "IMAP"}}, token=owner.token)
    assert imap["connectMailbox"]["userErrors"][0]["code"] == "UNSUPPORTED_PROVIDER"
    url = (
        await gql(
            CONNECT,
            {"input": {"provider": "GMAIL", "loginHint": f"{unique('d')}@gmail.sandbox.test"}},
            token=owner.token,
        )
    )["connectMailbox"]["authorizationUrl"]
    denied = await follow_consent(url + "&decision=deny")
    assert denied["error"] == ["ACCESS_DENIED"]
    forged = await follow_consent(url.replace("state=", "state=x"))
    assert forged["error"] == ["INVALID_STATE"]


async def test_r14_contact_mail_is_on_the_timeline_and_announced_within_2s_of_the_push(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    contact = await factory.contact(owner, "ann@client.test", "Ann Client")
    pushes = google.google.pushes_sent
    async with (
        live_worker(runtime),
        subscribe(
            api.ws_url, owner.token, EMAIL_RECEIVED, subscribers=api.subscribers(owner.workspace.id)
        ) as sub,
    ):
        inserted = time.monotonic()
        await deliver(
            google, address, raw_message("Ann <ann@client.test>", [address], "Quote", "Numbers")
        )
        event = (await sub.next())["data"]["emailReceived"]
        elapsed = time.monotonic() - inserted
    assert google.google.pushes_sent > pushes
    assert elapsed < 2.0, f"emailReceived {elapsed:.2f}s after the insert"
    assert event == {
        "email": {"subject": "Quote", "direction": "INCOMING"},
        "contacts": [{"name": "Ann Client"}],
    }
    timeline = await gql(
        "query($id: ID!) { contact(id: $id) { timeline { edges { node { subject } } } } }",
        {"id": to_global_id("Contact", contact.id)},
        token=owner.token,
    )
    assert [e["node"]["subject"] for e in timeline["contact"]["timeline"]["edges"]] == ["Quote"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE


async def test_r9_a_reply_sent_from_gmail_is_filed_outgoing_in_the_same_thread(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "bob@client.test", "Bob")
    got = await deliver(
        google,
        address,
        raw_message(
            "bob@client.test", [address], "Pricing", "How much?", message_id="<q-1@client.test>"
        ),
    )
    await settle(google)
    await drain(runtime)
    reply = raw_message(
        address, ["bob@client.test"], "Re: Pricing", "Ten.", in_reply_to="<q-1@client.test>"
    )
    sent = await call(
        google.gmail(address)
        .users()
        .messages()
        .send(userId="me", body={"raw": raw_b64(reply), "threadId": got["threadId"]})
    )
    assert sent["threadId"] == got["threadId"]
    await settle(google)
    await drain(runtime)
    # Both carry the same Date to the second, so order by subject.
    emails = sorted(await emails_of(runtime, owner.workspace.id), key=lambda e: e.subject or "")
    assert [(e.subject, e.direction) for e in emails] == [
        ("Pricing", EmailDirection.INCOMING),
        ("Re: Pricing", EmailDirection.OUTGOING),
    ]
    assert emails[0].thread_id == emails[1].thread_id


SETTINGS = """
mutation($on: Boolean) {
  updateWorkspaceSettings(input: {labelSyncedMail: $on}) {
    settings { labelSyncedMail } userErrors { code }
  }
}"""


async def test_synced_mail_gets_the_crm_label_when_the_workspace_asks_for_it(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "lu@client.test", "Lu")
    before = await deliver(google, address, raw_message("lu@client.test", [address], "Unlabelled"))
    await settle(google)
    await drain(runtime)
    account = google.google.account(address)
    assert account is not None
    assert not any(label["name"] == "CRM" for label in account.labels.values())

    changed = await gql(SETTINGS, {"on": True}, token=owner.token)
    assert changed["updateWorkspaceSettings"] == {
        "settings": {"labelSyncedMail": True},
        "userErrors": [],
    }
    filed = await deliver(google, address, raw_message("lu@client.test", [address], "Labelled"))
    stranger = await deliver(
        google, address, raw_message("nobody@elsewhere.test", [address], "Not on a timeline")
    )
    await settle(google)
    await drain(runtime)
    crm = next(label["id"] for label in account.labels.values() if label["name"] == "CRM")
    assert crm in account.messages[filed["id"]].label_ids
    assert crm not in account.messages[stranger["id"]].label_ids
    # Only what this pass synced is tagged; mail filed before the setting stays as it was.
    assert crm not in account.messages[before["id"]].label_ids
    assert {e.subject for e in await emails_of(runtime, owner.workspace.id)} == {
        "Unlabelled",
        "Labelled",
    }


async def test_history_records_without_label_ids_are_looked_up_not_dropped(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "liv@client.test", "Liv")
    account = google.google.account(address)
    assert account is not None
    account.history_labels = False
    await deliver(google, address, raw_message("liv@client.test", [address], "Inbox mail"))
    google.google.deliver(
        address, raw_message(address, ["liv@client.test"], "A draft"), labels=["DRAFT"]
    )
    lookups = google.google.faults.add(Fault(account=address, path=r"/messages/[^/]+$"))
    await settle(google)
    await drain(runtime)
    assert lookups.hits >= 2  # each unlabelled message looked up (and the filed one read)
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Inbox mail"]


async def test_the_crm_label_is_applied_once_per_message(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "mo@client.test", "Mo")
    await gql(SETTINGS, {"on": True}, token=owner.token)
    first = await deliver(google, address, raw_message("mo@client.test", [address], "First"))
    await settle(google)
    await drain(runtime)
    account = google.google.account(address)
    assert account is not None
    crm = next(label["id"] for label in account.labels.values() if label["name"] == "CRM")
    assert crm in account.messages[first["id"]].label_ids

    reads = google.google.faults.add(Fault(account=address, path=f"/messages/{first['id']}$"))
    modifies = google.google.faults.add(Fault(account=address, path="/messages/batchModify"))
    second = await deliver(google, address, raw_message("mo@client.test", [address], "Second"))
    await settle(google)
    await drain(runtime)
    await runtime.jobs.enqueue_sync(str(mailbox_id))  # and a pass with nothing new
    await drain(runtime)
    assert crm in account.messages[second["id"]].label_ids
    assert reads.hits == 0  # labelling the first message is no new mail
    assert modifies.hits == 1  # the second message, once
    assert sorted(e.subject or "" for e in await emails_of(runtime, owner.workspace.id)) == [
        "First",
        "Second",
    ]


async def test_history_404_relists_since_the_connection_without_duplicates(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "cy@client.test", "Cy")
    for n in range(3):
        await deliver(google, address, raw_message("cy@client.test", [address], f"Before {n}"))
    await drain(runtime)
    google.google.expire_history(address)
    await deliver(google, address, raw_message("cy@client.test", [address], "After"))
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    subjects = sorted(e.subject or "" for e in await emails_of(runtime, owner.workspace.id))
    assert subjects == ["After", "Before 0", "Before 1", "Before 2"]
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.ACTIVE
    assert int(mailbox.cursor["historyId"]) >= google.google.account(address).history_floor  # type: ignore[index,union-attr]


async def test_429_with_retry_after_is_waited_out_and_the_pass_succeeds(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "di@client.test", "Di")
    await deliver(google, address, raw_message("di@client.test", [address], "Hello"))
    fault = google.google.faults.add(
        Fault(status=429, retry_after=1, account=address, path="/history", times=1)
    )
    started = time.monotonic()
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    assert fault.hits == 1 and time.monotonic() - started >= 1.0
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Hello"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE
    assert await error_codes(runtime, mailbox_id) == []


async def test_a_long_retry_after_defers_the_pass_as_rate_limited(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, google, runtime)
    google.google.faults.add(
        Fault(status=429, retry_after=120, account=address, path="/history", times=1)
    )
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.ERROR
    assert await error_codes(runtime, mailbox_id) == ["RATE_LIMITED"]
    assert mailbox.next_attempt_at is not None
    wait = (mailbox.next_attempt_at - clock.now()).total_seconds()
    assert 100 < wait <= 121


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        # Gmail's error guide: quota answers are 403 with these reasons, or 429.
        (403, "rateLimitExceeded", "RATE_LIMITED"),
        (403, "userRateLimitExceeded", "RATE_LIMITED"),
        (403, "dailyLimitExceeded", "RATE_LIMITED"),
        (429, "rateLimitExceeded", "RATE_LIMITED"),
        # Other 403s are the user's (or their administrator's) to fix.
        (403, "domainPolicy", "ACCESS_DENIED"),
        (403, "insufficientPermissions", "ACCESS_REVOKED"),
        (403, "forbidden", "ACCESS_DENIED"),
    ],
)
async def test_gmail_errors_follow_the_published_catalogue(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    status: int,
    reason: str,
    code: str,
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    rate_limit = code == "RATE_LIMITED"
    google.google.faults.add(
        Fault(
            status=status,
            reason=reason,
            # Long enough to defer the pass rather than wait inside it (no sleeping test).
            retry_after=600 if rate_limit and reason != "dailyLimitExceeded" else None,
            account=address,
            path="/history",
        )
    )
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    google.google.faults.clear()
    shown = await gql(
        "query($id: ID!) { mailbox(id: $id) { status lastError { code } } }",
        {"id": to_global_id("Mailbox", mailbox_id)},
        token=owner.token,
    )
    assert shown["mailbox"] == {"status": "ERROR", "lastError": {"code": code}}
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.next_attempt_at is not None
    wait = (mailbox.next_attempt_at - clock.now()).total_seconds()
    if rate_limit:  # transient: retried when Gmail says, not after the user reconnects
        assert wait >= 590


async def test_r13_revoked_grant_is_access_revoked_then_suspended_after_48_hours(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    google.google.revoke_account(address)
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    shown = await gql(
        "query($id: ID!) { mailbox(id: $id) { status lastError { code message recommendation } } }",
        {"id": to_global_id("Mailbox", mailbox_id)},
        token=owner.token,
    )
    message, recommendation = MESSAGES[SyncErrorCode.ACCESS_REVOKED]
    assert shown["mailbox"] == {
        "status": "ERROR",
        "lastError": {
            "code": "ACCESS_REVOKED",
            "message": message,
            "recommendation": recommendation,
        },
    }
    clock.advance(timedelta(hours=49))
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.SUSPENDED
    clock.reset()  # the owner's API token would have expired in the meantime

    # Reconnecting the same account resumes from its cursor and keeps its history (R6).
    cursor = (await reload_mailbox(runtime, mailbox_id)).cursor
    url = (await gql(RECONNECT, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token))[
        "reconnectMailbox"
    ]["authorizationUrl"]
    landed = await follow_consent(url)
    assert landed["mailboxId"] == [to_global_id("Mailbox", mailbox_id)] and landed["status"] == [
        "PENDING"
    ]
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.cursor == cursor and mailbox.failing_since is None
    await factory.contact(owner, "eve@client.test", "Eve")
    await deliver(google, address, raw_message("eve@client.test", [address], "Back again"))
    await drain(runtime)
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Back again"]


async def test_an_expired_access_token_is_refreshed_and_stored(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, google, runtime)
    before = read_credentials(runtime.settings.secret, await reload_mailbox(runtime, mailbox_id))
    google.google.expire_access_tokens(address)
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    after = read_credentials(runtime.settings.secret, mailbox)
    assert mailbox.status == MailboxStatus.PENDING and await error_codes(runtime, mailbox_id) == []
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] == before["refresh_token"]


def envelope(address: str, history_id: int) -> dict[str, Any]:
    data = base64.urlsafe_b64encode(
        json.dumps({"emailAddress": address, "historyId": history_id}).encode()
    )
    return {
        "message": {"data": data.decode(), "messageId": "1", "publishTime": "2026-11-23T00:00:00Z"},
        "subscription": "projects/mailsync/subscriptions/gmail-push",
    }


async def test_push_webhook_checks_its_secret_and_ignores_unknown_or_stale_notices(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    _, mailbox_id, address = await connected(gql, factory, google, runtime)
    cursor = int((await reload_mailbox(runtime, mailbox_id)).cursor["historyId"])  # type: ignore[index]
    hook = f"{api.url}/webhooks/google"
    token = runtime.settings.push_token
    async with httpx.AsyncClient() as http:
        assert (
            await http.post(hook, params={"token": "wrong"}, json=envelope(address, cursor + 5))
        ).status_code == 403
        assert (
            await http.post(hook, params={"token": token}, content=b"not json")
        ).status_code == 204
        unknown = await http.post(
            hook, params={"token": token}, json=envelope("nobody@gmail.sandbox.test", 99)
        )
        assert unknown.status_code == 204
        stale = await http.post(hook, params={"token": token}, json=envelope(address, cursor))
        assert stale.status_code == 204
        assert await runtime.redis.zcard("arq:queue") == 0
        fresh = await http.post(hook, params={"token": token}, json=envelope(address, cursor + 1))
        assert fresh.status_code == 204
    assert await runtime.redis.zcard("arq:queue") == 1


async def test_disconnecting_stops_the_watch_and_forgets_the_credentials(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    account = google.google.account(address)
    assert account is not None and account.watch is not None
    await gql(DISCONNECT, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token)
    await drain(runtime)
    assert account.watch is None
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.DISCONNECTED
    assert mailbox.credentials_encrypted is None


async def test_provider_sends_raw_mail_in_a_thread(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected(gql, factory, google, runtime)
    client = f"{unique('cl')}@gmail.sandbox.test"
    google.google.ensure_account(client)
    got = await deliver(
        google, address, raw_message(client, [address], "Offer", "?", message_id="<o-1@c.test>")
    )
    mailbox = await reload_mailbox(runtime, mailbox_id)
    provider = GmailProvider(
        mailbox, read_credentials(runtime.settings.secret, mailbox), runtime.settings
    )
    try:
        sent = await provider.send(
            raw_message(address, [client], "Re: Offer", "Yes", in_reply_to="<o-1@c.test>"),
            got["threadId"],
        )
        await provider.mark([sent.provider_id], "CRM")
    finally:
        await provider.close()
    assert sent.thread_id == got["threadId"]
    account = google.google.account(address)
    assert account is not None
    stored = account.messages[sent.provider_id]
    crm = next(label["id"] for label in account.labels.values() if label["name"] == "CRM")
    assert "SENT" in stored.label_ids and crm in stored.label_ids
    theirs = google.google.account(client)
    assert theirs is not None and any(m.subject == "offer" for m in theirs.messages.values())


async def test_live_worker_fixture_stops_cleanly(runtime: Runtime) -> None:
    async with live_worker(runtime) as worker:
        await asyncio.sleep(0.1)
    assert worker is not None

"""R15 at the provider level: GmailProvider and MicrosoftProvider send the product's MIME as it
is, find it again by Message-ID, and name each documented refusal, against the sandbox
through the real google-api-python-client and msgraph-sdk."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import httpx
import pytest

from backend.providers.base import (
    MailboxAccount,
    SendRejected,
    SendRejection,
    SentMessage,
    TransientProviderError,
)
from backend.providers.gmail.provider import GMAIL_SEND_LIMITS, GmailProvider
from backend.providers.microsoft.provider import GRAPH_SEND_LIMITS, MicrosoftProvider
from backend.settings import Settings
from tests.factories import raw_message, unique
from tests.sandbox import SandboxServer

ATTACHMENT = bytes(range(256)) * 40


@pytest.fixture
async def sandbox(google_server: SandboxServer) -> AsyncIterator[SandboxServer]:
    yield google_server
    google_server.google.faults.clear()
    await google_server.microsoft.drain_notifications()


def gmail_address() -> str:
    return f"{unique('gs')}@gmail.sandbox.test"


def outlook_address() -> str:
    return f"{unique('os')}@outlook.sandbox.test"


def gmail(sandbox: SandboxServer, settings: Settings, address: str) -> GmailProvider:
    sandbox.google.ensure_account(address)
    credentials = {
        "access_token": sandbox.google.mint_token(address),
        "refresh_token": None,
        "expiry": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "scopes": ["https://mail.google.com/"],
    }
    return GmailProvider(MailboxAccount(unique("mb"), address), credentials, settings)


def outlook(sandbox: SandboxServer, settings: Settings, address: str) -> MicrosoftProvider:
    sandbox.microsoft.ensure_account(address)
    credentials = {
        "access_token": sandbox.microsoft.mint_token(address),
        "refresh_token": "unused",
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    return MicrosoftProvider(MailboxAccount(unique("mb"), address), credentials, settings)


def crm_mime(
    sender: str,
    to: list[str],
    subject: str = "Proposal",
    *,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    bcc: list[str] | None = None,
    attachment: bytes = ATTACHMENT,
) -> bytes:
    """What the product builds: alternative text/HTML, an attachment, its own Message-ID."""
    msg = EmailMessage()
    msg["From"] = f"Ann Seller <{sender}>"
    msg["To"] = ", ".join(to)
    if bcc:
        msg["Bcc"] = ", ".join(bcc)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(domain="crm.mailsync.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = f"<root@c.test> {in_reply_to}"
    msg["X-Mailsync-Email"] = "email-42"
    msg["Organization"] = "Acme Sales"
    msg.set_content("Please find the proposal attached.")
    msg.add_alternative("<p>Please find the <b>proposal</b> attached.</p>", subtype="html")
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="proposal.pdf")
    return msg.as_bytes()


def assert_intact(raw: bytes, sent: bytes) -> None:
    """The delivered message carries the headers and the attachment the product set."""
    got = email.message_from_bytes(raw, policy=email.policy.default)
    want = email.message_from_bytes(sent, policy=email.policy.default)
    for header in ("Message-ID", "In-Reply-To", "References", "X-Mailsync-Email", "Organization"):
        assert got.get(header) == want.get(header), header
    assert got.get("Bcc") is None
    assert isinstance(got, EmailMessage)
    files = [p for p in got.iter_attachments() if p.get_filename() == "proposal.pdf"]
    assert len(files) == 1 and files[0].get_content() == ATTACHMENT


async def set_fault(sandbox: SandboxServer, **fault: Any) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url, trust_env=False) as http:
        answer = await http.post("/_sandbox/faults", json=fault)
        assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------------- Gmail


async def test_r15_gmail_send_keeps_the_mime_and_find_sent_finds_it(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact, hidden = gmail_address(), gmail_address(), gmail_address()
    elsewhere = outlook_address()
    sandbox.google.ensure_account(contact)
    sandbox.google.ensure_account(hidden)
    sandbox.microsoft.ensure_account(elsewhere)
    raw = crm_mime(me, [contact, elsewhere], bcc=[hidden])
    provider = gmail(sandbox, settings, me)
    try:
        sent = await provider.send(raw)
        message_id = str(email.message_from_bytes(raw)["Message-ID"])
        bare = message_id.strip("<>")
        assert await provider.find_sent(message_id) == sent
        assert await provider.find_sent(bare) == sent
        assert await provider.find_sent("<nothing-like-it@crm.mailsync.test>") is None
    finally:
        await provider.close()
    account = sandbox.google.account(me)
    assert account is not None
    stored = account.messages[sent.provider_id]
    assert stored.raw == raw and "SENT" in stored.label_ids and sent.thread_id
    for address in (contact, hidden):
        theirs = sandbox.google.account(address)
        assert theirs is not None
        (received,) = theirs.messages.values()
        assert_intact(received.raw, raw)
    outside = sandbox.microsoft.account(elsewhere)
    assert outside is not None
    (delivered,) = outside.messages.values()
    assert delivered.internet_message_id == message_id
    assert_intact(delivered.raw, raw)


async def test_r15_gmail_reply_keeps_the_thread(sandbox: SandboxServer, settings: Settings) -> None:
    me, contact = gmail_address(), gmail_address()
    sandbox.google.ensure_account(contact)
    sandbox.google.ensure_account(me)
    original = sandbox.google.deliver(
        me, raw_message(contact, [me], "Proposal", "Send it?", message_id="<ask-1@c.test>")
    )
    raw = crm_mime(me, [contact], "Re: Proposal", in_reply_to="<ask-1@c.test>")
    provider = gmail(sandbox, settings, me)
    try:
        sent = await provider.send(raw, original.thread_id)
    finally:
        await provider.close()
    assert sent.thread_id == original.thread_id
    account = sandbox.google.account(me)
    assert account is not None and account.messages[sent.provider_id].raw == raw
    theirs = sandbox.google.account(contact)
    assert theirs is not None
    assert_intact(next(iter(theirs.messages.values())).raw, raw)


async def test_r15_gmail_limits_are_send_rejected_with_their_reason(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact = gmail_address(), gmail_address()
    sandbox.google.ensure_account(contact)
    provider = gmail(sandbox, settings, me)
    try:
        many = [f"r{n}@elsewhere.test" for n in range(GMAIL_SEND_LIMITS.max_recipients + 1)]
        with pytest.raises(SendRejected) as too_many:
            await provider.send(crm_mime(me, many))
        assert too_many.value.reason == SendRejection.TOO_MANY_RECIPIENTS
        huge = crm_mime(me, [contact], attachment=b"x" * GMAIL_SEND_LIMITS.max_bytes)
        with pytest.raises(SendRejected) as too_large:
            await provider.send(huge)
        assert too_large.value.reason == SendRejection.TOO_LARGE
        async with httpx.AsyncClient(base_url=sandbox.url, trust_env=False) as http:
            limit = await http.post(f"/_sandbox/google/accounts/{me}/send-limit", json={"limit": 1})
            assert limit.status_code == 200
        await provider.send(crm_mime(me, [contact]))
        with pytest.raises(SendRejected) as daily:
            await provider.send(crm_mime(me, [contact]))
        assert daily.value.reason == SendRejection.DAILY_LIMIT
        assert daily.value.code == "SEND_FAILED"
        assert daily.value.retry_after is not None and daily.value.retry_after > 3600
    finally:
        await provider.close()
    theirs = sandbox.google.account(contact)
    assert theirs is not None and len(theirs.messages) == 1


async def test_r15_gmail_a_503_stays_transient_and_is_not_retried_inline(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact = gmail_address(), gmail_address()
    sandbox.google.ensure_account(contact)
    provider = gmail(sandbox, settings, me)
    await set_fault(sandbox, status=503, account=me, path="messages/send", times=2)
    try:
        with pytest.raises(TransientProviderError) as failed:
            await provider.send(crm_mime(me, [contact]))
        assert not isinstance(failed.value, SendRejected)
    finally:
        await provider.close()
    assert [f.hits for f in sandbox.google.faults.faults] == [1]
    theirs = sandbox.google.account(contact)
    assert theirs is not None and not theirs.messages


async def test_r15_gmail_accepted_then_answer_delayed_or_lost(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact = gmail_address(), gmail_address()
    sandbox.google.ensure_account(contact)
    provider = gmail(sandbox, settings, me)
    try:
        await set_fault(sandbox, afterDelaySeconds=0.6, account=me, path="messages/send", times=1)
        started = time.monotonic()
        first = await provider.send(crm_mime(me, [contact]))
        assert time.monotonic() - started >= 0.6
        await set_fault(
            sandbox, status=503, afterDelaySeconds=0, account=me, path="messages/send", times=1
        )
        raw = crm_mime(me, [contact])
        with pytest.raises(TransientProviderError):
            await provider.send(raw)
        found = await provider.find_sent(str(email.message_from_bytes(raw)["Message-ID"]))
    finally:
        await provider.close()
    theirs = sandbox.google.account(contact)
    assert theirs is not None and len(theirs.messages) == 2  # both were delivered
    assert found is not None and found != first


# ---------------------------------------------------------------------------- Outlook


def sent_items(sandbox: SandboxServer, address: str) -> list[Any]:
    account = sandbox.microsoft.account(address)
    assert account is not None
    folder = account.folder("sentitems").id
    return [m for m in account.messages.values() if m.folder_id == folder]


async def test_r15_outlook_send_keeps_the_mime_and_names_the_sent_copy(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact, hidden = outlook_address(), outlook_address(), outlook_address()
    elsewhere = gmail_address()
    sandbox.microsoft.ensure_account(contact)
    sandbox.microsoft.ensure_account(hidden)
    sandbox.google.ensure_account(elsewhere)
    raw = crm_mime(me, [contact, elsewhere], bcc=[hidden])
    message_id = str(email.message_from_bytes(raw)["Message-ID"])
    provider = outlook(sandbox, settings, me)
    try:
        sent = await provider.send(raw)
        assert await provider.find_sent(message_id) == sent
        assert await provider.find_sent(message_id.strip("<>")) == sent
        assert await provider.find_sent("<absent@crm.mailsync.test>") is None
        value = await provider.graph.me.messages.by_message_id(sent.provider_id).content.get()
    finally:
        await provider.close()
    (copy,) = sent_items(sandbox, me)
    assert sent == SentMessage(copy.id, copy.conversation_id)
    assert copy.raw == raw and value == raw  # $value answers the MIME as sent, Bcc kept
    assert copy.internet_message_id == message_id
    for address in (contact, hidden):
        theirs = sandbox.microsoft.account(address)
        assert theirs is not None
        (received,) = theirs.messages.values()
        assert_intact(received.raw, raw)
    gmail_side = sandbox.google.account(elsewhere)
    assert gmail_side is not None
    assert_intact(next(iter(gmail_side.messages.values())).raw, raw)


async def test_r15_outlook_reply_keeps_the_conversation_and_its_immutable_id(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact = outlook_address(), outlook_address()
    sandbox.microsoft.ensure_account(contact)
    sandbox.microsoft.ensure_account(me)
    original = sandbox.microsoft.deliver(
        me, raw_message(contact, [me], "Proposal", "Send it?", message_id="<ask-2@c.test>")
    )
    raw = crm_mime(me, [contact], "Re: Proposal", in_reply_to="<ask-2@c.test>")
    provider = outlook(sandbox, settings, me)
    try:
        sent = await provider.send(raw, original.conversation_id)
        again = await provider.find_sent(str(email.message_from_bytes(raw)["Message-ID"]))
    finally:
        await provider.close()
    (copy,) = sent_items(sandbox, me)
    assert sent == again == SentMessage(copy.id, original.conversation_id)
    assert copy.conversation_id == original.conversation_id
    assert copy.raw == raw
    theirs = sandbox.microsoft.account(contact)
    assert theirs is not None
    assert_intact(next(iter(theirs.messages.values())).raw, raw)


async def test_r15_outlook_limits_and_failures(sandbox: SandboxServer, settings: Settings) -> None:
    me, contact = outlook_address(), outlook_address()
    sandbox.microsoft.ensure_account(contact)
    provider = outlook(sandbox, settings, me)
    try:
        # Over Graph's 4 MB request limit once base64-encoded.
        huge = crm_mime(me, [contact], attachment=b"y" * (GRAPH_SEND_LIMITS.max_bytes + 200_000))
        with pytest.raises(SendRejected) as too_large:
            await provider.send(huge)
        assert too_large.value.reason == SendRejection.TOO_LARGE
        with pytest.raises(SendRejected) as nobody:
            await provider.send(crm_mime(me, []))
        assert nobody.value.reason == SendRejection.RECIPIENT_REJECTED
        await set_fault(sandbox, status=503, account=me, path="sendMail", times=2)
        with pytest.raises(TransientProviderError) as unavailable:
            await provider.send(crm_mime(me, [contact]))
        assert not isinstance(unavailable.value, SendRejected)
        assert [f.hits for f in sandbox.google.faults.faults] == [1]  # not retried inline
    finally:
        await provider.close()
    theirs = sandbox.microsoft.account(contact)
    assert theirs is not None and not theirs.messages


async def test_r15_outlook_accepted_then_answer_delayed_or_lost(
    sandbox: SandboxServer, settings: Settings
) -> None:
    me, contact = outlook_address(), outlook_address()
    sandbox.microsoft.ensure_account(contact)
    provider = outlook(sandbox, settings, me)
    try:
        await set_fault(sandbox, afterDelaySeconds=0.6, account=me, path="sendMail", times=1)
        started = time.monotonic()
        await provider.send(crm_mime(me, [contact]))
        assert time.monotonic() - started >= 0.6
        await set_fault(
            sandbox, status=503, afterDelaySeconds=0, account=me, path="sendMail", times=1
        )
        raw = crm_mime(me, [contact])
        with pytest.raises(TransientProviderError):
            await provider.send(raw)
        found = await provider.find_sent(str(email.message_from_bytes(raw)["Message-ID"]))
    finally:
        await provider.close()
    theirs = sandbox.microsoft.account(contact)
    assert theirs is not None and len(theirs.messages) == 2
    assert found is not None and found.provider_id in {m.id for m in sent_items(sandbox, me)}

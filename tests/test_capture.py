"""R16: the capture address, through the real SMTP receiver (aiosmtpd on a free loopback port,
Python's smtplib as the sending MTA) and through POST /inbound/mime."""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from email.utils import format_datetime

import httpx
import pytest
from sqlmodel import col, select

from backend.auth.tables import Role, Workspace
from backend.capture import inbound
from backend.capture.forwards import parse_forward_date
from backend.capture.smtp import start_receiver
from backend.graphql.relay import to_global_id
from backend.mail.tables import Email, EmailDirection, EmailSource, Participant
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings
from backend.sync.ingest import Outcome
from backend.workspaces.service import capture_address
from tests.client import GQL, error_codes, subscribe
from tests.conftest import LiveServer, free_port
from tests.factories import Factory, Member, raw_message, unique
from tests.sync_helpers import emails_with_message_id, timeline_subjects

Sender = Callable[[str, list[str], bytes], Awaitable[None]]


async def _receiver(runtime: Runtime) -> AsyncIterator[Sender]:
    server = await start_receiver(runtime, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])

    def send(sender: str, recipients: list[str], raw: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(sender, recipients, raw)

    async def send_async(sender: str, recipients: list[str], raw: bytes) -> None:
        await asyncio.to_thread(send, sender, recipients, raw)

    try:
        yield send_async
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def smtp(runtime: Runtime) -> AsyncIterator[Sender]:
    async for sender in _receiver(runtime):
        yield sender


async def _address(runtime: Runtime, member: Member) -> str:
    async with runtime.db.sessionmaker() as session:
        workspace = await session.get(Workspace, member.workspace.id)
        assert workspace is not None
        return capture_address(workspace, runtime.settings.capture_domain)


async def _post(api: LiveServer, settings: Settings, raw: bytes, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        return await client.post(
            "/inbound/mime",
            content=raw,
            params=params,
            headers={
                "Authorization": f"Bearer {settings.inbound_secret}",
                "Content-Type": "message/rfc822",
            },
        )


async def _email(runtime: Runtime, message_id: str) -> tuple[Email, list[Participant]]:
    async with runtime.db.sessionmaker() as session:
        email = (await session.scalars(select(Email).where(Email.message_id == message_id))).one()
        participants = await session.scalars(
            select(Participant)
            .where(Participant.email_id == email.id)
            .order_by(col(Participant.position))
        )
        return email, list(participants)


def _forward_attached(forwarder: str, to: str, original: bytes, subject: str) -> bytes:
    outer = EmailMessage()
    outer["From"] = forwarder
    outer["To"] = to
    outer["Subject"] = f"Fwd: {subject}"
    outer["Message-ID"] = f"<{uuid.uuid4().hex}@crm.test>"
    outer["Date"] = format_datetime(datetime.now(UTC))
    outer.set_content("For the CRM.")
    outer.add_attachment(message_from_bytes(original, policy=default))
    return outer.as_bytes()


def _forward_inline(forwarder: str, to: str, subject: str, block: str) -> bytes:
    outer = EmailMessage()
    outer["From"] = forwarder
    outer["To"] = to
    outer["Subject"] = subject
    outer["Message-ID"] = f"<{uuid.uuid4().hex}@crm.test>"
    outer["Date"] = "Wed, 02 Dec 2026 09:00:00 +0100"
    outer.set_content(block)
    return outer.as_bytes()


async def test_r16_bcc_is_filed_on_its_to_and_cc_contacts_with_the_sender_as_sent_by(
    smtp: Sender, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    ann_email = f"{unique('ann')}@client.test"
    ann = await factory.contact(owner, ann_email, "Ann")
    bob_email = f"{unique('bob')}@client.test"
    bob = await factory.contact(owner, bob_email, "Bob")
    capture = await _address(runtime, owner)
    message_id = f"<{uuid.uuid4().hex}@crm.test>"
    raw = raw_message(
        teammate.email, [ann_email], "Proposal", cc=[bob_email], message_id=message_id
    )
    await smtp(teammate.email, [capture], raw)  # Bcc: the envelope names the capture address
    email, participants = await _email(runtime, message_id)
    assert email.source == EmailSource.CAPTURE
    assert email.direction == EmailDirection.OUTGOING
    assert email.sent_by_id == teammate.user.id
    assert email.mailbox_id is None
    assert [p.address for p in participants] == [teammate.email, ann_email, bob_email]
    assert await timeline_subjects(runtime, ann.id) == ["Proposal"]
    assert await timeline_subjects(runtime, bob.id) == ["Proposal"]


async def test_r16_attached_forward_files_the_original_with_its_participants_and_date(
    smtp: Sender, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    ann_email = f"{unique('ann')}@client.test"
    ann = await factory.contact(owner, ann_email, "Ann")
    capture = await _address(runtime, owner)
    sent = datetime(2026, 11, 30, 15, 4, 5, tzinfo=UTC)
    original_id = f"<{uuid.uuid4().hex}@client.test>"
    original = raw_message(
        f"Ann <{ann_email}>", [owner.email], "Question", message_id=original_id, date=sent
    )
    await smtp(
        owner.email, [capture], _forward_attached(owner.email, capture, original, "Question")
    )
    email, participants = await _email(runtime, original_id)
    assert email.subject == "Question"
    assert email.sent_at == sent
    assert email.direction == EmailDirection.INCOMING
    assert email.sent_by_id == owner.user.id  # the forwarder
    assert [(p.role, p.address) for p in participants] == [
        ("FROM", ann_email),
        ("TO", owner.email),
    ]
    assert await timeline_subjects(runtime, ann.id) == ["Question"]


GMAIL_BLOCK = """Please file this.

---------- Forwarded message ---------
From: Ann Client <{ann}>
Date: Tue, Dec 1, 2026 at 10:15\u202fAM
Subject: Pricing
To: Owner <{owner}>
Cc: <{bob}>


Hello, what are your prices?
"""

OUTLOOK_BLOCK = """FYI

________________________________
From: Ann Client <{ann}>
Sent: Tuesday, December 1, 2026 10:15 AM
To: Owner <{owner}>; Bob <{bob}>
Subject: Pricing

Hello, what are your prices?
"""


@pytest.mark.parametrize(
    ("subject", "block"), [("Fwd: Pricing", GMAIL_BLOCK), ("FW: Pricing", OUTLOOK_BLOCK)]
)
async def test_r16_inline_forward_files_the_original_through_the_http_endpoint(
    api: LiveServer,
    settings: Settings,
    factory: Factory,
    runtime: Runtime,
    subject: str,
    block: str,
) -> None:
    owner = await factory.workspace()
    ann_email = f"{unique('ann')}@client.test"
    await factory.contact(owner, ann_email, "Ann")
    bob = f"{unique('bob')}@client.test"
    capture = await _address(runtime, owner)
    raw = _forward_inline(
        owner.email, capture, subject, block.format(ann=ann_email, owner=owner.email, bob=bob)
    )
    response = await _post(api, settings, raw)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["status"] == "filed"
    async with runtime.db.sessionmaker() as session:
        email = (
            await session.scalars(select(Email).where(Email.workspace_id == owner.workspace.id))
        ).one()
    email, participants = await _email(runtime, email.message_id)
    assert email.subject == "Pricing"
    assert email.body_text == "Hello, what are your prices?"
    assert email.sent_by_id == owner.user.id
    # 10:15 in the forwarder's zone (the outer Date is +0100).
    assert email.sent_at == datetime(2026, 12, 1, 9, 15, tzinfo=UTC)
    assert [(p.role, p.address) for p in participants] == [
        ("FROM", ann_email),
        ("TO", owner.email),
        ("TO" if "Sent:" in block else "CC", bob),
    ]
    # The same forward again is the same email (R7).
    again = await _post(api, settings, raw)
    assert again.json()["results"][0]["status"] == "duplicate"


async def test_r16_unknown_recipient_is_refused_at_rcpt(
    smtp: Sender, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    unknown = f"capture-{uuid.uuid4().hex[:20]}@{runtime.settings.capture_domain}"
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await smtp(owner.email, [unknown], raw_message(owner.email, ["x@client.test"]))
    assert refused.value.recipients[unknown][0] == 550
    with pytest.raises(smtplib.SMTPRecipientsRefused) as relay:
        await smtp(owner.email, ["someone@elsewhere.test"], raw_message(owner.email, ["x@y.test"]))
    assert relay.value.recipients["someone@elsewhere.test"][0] == 550


async def test_r16_a_sender_who_is_not_a_user_is_refused_and_counted(
    smtp: Sender, factory: Factory, runtime: Runtime, api: LiveServer, settings: Settings
) -> None:
    owner = await factory.workspace()
    contact_email = f"{unique('ann')}@client.test"
    await factory.contact(owner, contact_email)
    capture = await _address(runtime, owner)
    message_id = f"<{uuid.uuid4().hex}@spam.test>"
    raw = raw_message("mallory@spam.test", [contact_email], "Injected", message_id=message_id)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await smtp("mallory@spam.test", [capture], raw)
    assert refused.value.smtp_code == 550
    response = await _post(api, settings, raw, recipient=capture)
    assert response.status_code == 403
    assert await emails_with_message_id(runtime, owner.workspace.id, message_id) == []
    assert await inbound.refusals(runtime, owner.workspace.id) == 2


UNASSIGNED = """
query { unassignedEmails(first: 10) { totalCount edges { node { id subject source } } } }
"""
FILE = """
mutation($input: FileEmailInput!) { fileEmail(input: $input) { email { id } userErrors { code } } }
"""
CREATE_CONTACT = """
mutation($input: CreateContactInput!) { createContact(input: $input) { contact { id } userErrors { code } } }
"""
DELETE = "mutation($id: ID!) { deleteEmail(id: $id) { deletedId userErrors { code } } }"
UNASSIGNED_EVENTS = """
subscription { unassignedEmailReceived { email { id subject source } contacts { id } } }
"""


async def test_r16_unassigned_mail_is_listed_until_filed_on_a_new_contact(
    api: LiveServer, gql: GQL, settings: Settings, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    capture = await _address(runtime, owner)
    stranger = f"{unique('new')}@prospect.test"
    raw = raw_message(owner.email, [stranger], "Intro")
    async with subscribe(
        api.ws_url,
        owner.token,
        UNASSIGNED_EVENTS,
        subscribers=api.subscribers(owner.workspace.id),
    ) as events:
        # A Bcc: only the envelope (the service's `recipient`) names the capture address.
        response = await _post(api, settings, raw, recipient=capture)
        assert response.json()["results"][0]["status"] == "unassigned"
        event = (await events.next())["data"]["unassignedEmailReceived"]
    assert event["email"]["subject"] == "Intro"
    assert event["contacts"] == []
    listed = (await gql(UNASSIGNED, token=owner.token))["unassignedEmails"]
    assert listed["totalCount"] == 1
    (edge,) = listed["edges"]
    assert edge["node"] == {"id": event["email"]["id"], "subject": "Intro", "source": "CAPTURE"}
    # A teammate sees the same list (R17: the workspace's).
    teammate = await factory.member(owner)
    assert (await gql(UNASSIGNED, token=teammate.token))["unassignedEmails"]["totalCount"] == 1

    created = await gql(
        CREATE_CONTACT, {"input": {"email": stranger, "name": "New"}}, token=owner.token
    )
    contact_id = created["createContact"]["contact"]["id"]
    filed = await gql(
        FILE, {"input": {"emailId": edge["node"]["id"], "contactId": contact_id}}, token=owner.token
    )
    assert filed["fileEmail"]["userErrors"] == []
    assert (await gql(UNASSIGNED, token=owner.token))["unassignedEmails"]["totalCount"] == 0


async def test_r16_delete_email_discards_an_unassigned_email(
    smtp: Sender, gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    capture = await _address(runtime, owner)
    message_id = f"<{uuid.uuid4().hex}@crm.test>"
    raw = raw_message(owner.email, ["nobody@prospect.test"], "Cold", message_id=message_id)
    await smtp(owner.email, [capture], raw)
    (edge,) = (await gql(UNASSIGNED, token=owner.token))["unassignedEmails"]["edges"]
    deleted = await gql(DELETE, {"id": edge["node"]["id"]}, token=owner.token)
    assert deleted["deleteEmail"]["userErrors"] == []
    assert (await gql(UNASSIGNED, token=owner.token))["unassignedEmails"]["totalCount"] == 0
    # R11: captured again, it stays out.
    await smtp(owner.email, [capture], raw)
    assert await emails_with_message_id(runtime, owner.workspace.id, message_id) == []


async def test_r16_captured_then_synced_from_a_mailbox_is_stored_once(
    smtp: Sender, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    ann_email = f"{unique('ann')}@client.test"
    ann = await factory.contact(owner, ann_email, "Ann")
    capture = await _address(runtime, owner)
    message_id = f"<{uuid.uuid4().hex}@crm.test>"
    raw = raw_message(owner.email, [ann_email], "Once", message_id=message_id)
    await smtp(owner.email, [capture], raw)
    mailbox = await factory.mailbox(owner, connected_at=datetime(2026, 1, 1, tzinfo=UTC))
    result = await factory.ingest(mailbox, raw)
    assert result.outcome == Outcome.DUPLICATE
    assert len(await emails_with_message_id(runtime, owner.workspace.id, message_id)) == 1
    assert await timeline_subjects(runtime, ann.id) == ["Once"]


ROTATE = """
mutation { rotateCaptureAddress { workspace { id captureAddress } userErrors { code } } }
"""


async def test_r16_a_rotated_address_refuses_mail(
    smtp: Sender, gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    ann_email = f"{unique('ann')}@client.test"
    ann = await factory.contact(owner, ann_email, "Ann")
    old = await _address(runtime, owner)
    user = await factory.member(owner, Role.USER)
    assert error_codes(await gql.raw(ROTATE, token=user.token)) == ["FORBIDDEN"]
    rotated = (await gql(ROTATE, token=owner.token))["rotateCaptureAddress"]
    assert rotated["userErrors"] == []
    new = rotated["workspace"]["captureAddress"]
    assert new != old and new == await _address(runtime, owner)
    assert rotated["workspace"]["id"] == to_global_id("Workspace", owner.workspace.id)
    raw = raw_message(owner.email, [ann_email], "After rotation")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await smtp(owner.email, [old], raw)
    assert refused.value.recipients[old][0] == 550
    await smtp(owner.email, [new], raw)
    assert await timeline_subjects(runtime, ann.id) == ["After rotation"]


async def test_r16_a_receiver_that_cannot_reach_the_database_answers_4xx(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, factory: Factory
) -> None:
    owner = await factory.workspace()
    missing = tmp_path_factory.mktemp("gone") / "no-such-dir" / "mailsync.db"
    broken = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{missing}"})
    runtime = await Runtime.create(broken, jobs=JobQueue)
    try:
        async for send in _receiver(runtime):
            address = f"{owner.workspace.capture_key}@{settings.capture_domain}"
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                await send(owner.email, [address], raw_message(owner.email, ["a@client.test"]))
            assert refused.value.recipients[address][0] == 451
    finally:
        await runtime.close()


async def test_r16_the_http_endpoint_answers_503_when_it_cannot_store(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, factory: Factory
) -> None:
    owner = await factory.workspace()
    missing = tmp_path_factory.mktemp("gone") / "no-such-dir" / "mailsync.db"
    broken = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{missing}"})
    server = LiveServer(broken)
    await server.start()
    try:
        address = f"{owner.workspace.capture_key}@{settings.capture_domain}"
        response = await _post(
            server, broken, raw_message(owner.email, ["a@client.test"]), recipient=address
        )
    finally:
        await server.stop()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"


async def test_r16_the_size_limit_is_enforced(settings: Settings, factory: Factory) -> None:
    owner = await factory.workspace()
    small = settings.model_copy(update={"capture_max_bytes": 2048})
    runtime = await Runtime.create(small, jobs=JobQueue)
    try:
        async for send in _receiver(runtime):
            address = f"{owner.workspace.capture_key}@{settings.capture_domain}"
            raw = raw_message(owner.email, ["a@client.test"], body="x" * 10_000)
            with pytest.raises(smtplib.SMTPException) as refused:
                await send(owner.email, [address], raw)
            assert "552" in str(refused.value)
    finally:
        await runtime.close()


async def test_r16_the_http_endpoint_wants_its_shared_secret(
    api: LiveServer, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    capture = await _address(runtime, owner)
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        response = await client.post(
            "/inbound/mime",
            content=raw_message(owner.email, ["a@client.test"]),
            params={"recipient": capture},
            headers={"Authorization": "Bearer wrong"},
        )
    assert response.status_code == 401


def test_r16_forward_dates_of_gmail_and_outlook_parse() -> None:
    assert parse_forward_date("Tue, Dec 1, 2026 at 10:15\u202fAM", None) == datetime(
        2026, 12, 1, 10, 15, tzinfo=UTC
    )
    assert parse_forward_date("Tuesday, December 1, 2026 10:15 PM", None) == datetime(
        2026, 12, 1, 22, 15, tzinfo=UTC
    )
    assert parse_forward_date("Tue, 01 Dec 2026 10:15:00 +0200", None) == datetime(
        2026, 12, 1, 10, 15, tzinfo=UTC
    ).replace(hour=8)
    assert parse_forward_date("not a date", None) is None


@pytest.mark.e2e  # starts `mailsync capture` as a process
async def test_r16_the_capture_command_files_a_bcc(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    ann_email = f"{unique('ann')}@client.test"
    ann = await factory.contact(owner, ann_email, "Ann")
    capture = await _address(runtime, owner)
    port = free_port()
    proc = subprocess.Popen(  # the test session's MAILSYNC_* settings are in the environment
        [sys.executable, "-m", "backend.cli", "capture", "--port", str(port)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60  # start-up imports take seconds
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "capture did not start"
                await asyncio.sleep(0.1)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail(
                    owner.email, [capture], raw_message(owner.email, [ann_email], "By process")
                )

        await asyncio.to_thread(send)
    finally:
        proc.terminate()
        proc.wait(30)
    assert await timeline_subjects(runtime, ann.id) == ["By process"]

"""IMAP/SMTP mailboxes against real servers: Dovecot (IMAP, LMTP, submission) and Postfix,
started by the fixture on free loopback ports (backend/sandbox/mailserver.py). Mail reaches
the mailboxes through SMTP into Postfix and LMTP into Dovecot, or IMAP APPEND."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aioimaplib
import pytest
import sqlalchemy as sa
from sqlmodel import select

from backend.graphql.relay import parse_global_id
from backend.kit.errors import ServiceError
from backend.mail.tables import Email
from backend.mailboxes import connect
from backend.mailboxes.tables import Mailbox
from backend.runtime import Runtime
from backend.sandbox import mailserver
from backend.sandbox.mailserver import MailServer
from backend.settings import Settings
from backend.sync.idle import IdleSupervisor
from tests.client import GQL
from tests.factories import Factory, Member, raw_message, unique
from tests.sandbox import SandboxServer
from tests.test_gmail import connected as gmail_connected
from tests.test_gmail import deliver as gmail_deliver
from tests.test_gmail import settle
from tests.worker import drain, live_worker

# The fixture starts Dovecot and Postfix: these tests run with the e2e ones.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not mailserver.available() and not os.environ.get("CI"),
        reason="Dovecot and Postfix are installed by scripts/test",
    ),
]

T = TypeVar("T")
PASSWORD = "correct horse battery"

CONNECT = """mutation($input: ConnectImapMailboxInput!) {
  connectImapMailbox(input: $input) {
    mailbox { id status provider emailAddress }
    userErrors { field code message }
  }
}"""


@pytest.fixture(scope="module")
def mail(settings: Settings) -> Iterator[MailServer]:
    server = MailServer()
    server.start()
    # The fixture's certificate is a private CA, as a company mail server's would be.
    previous = settings.imap_ca_file
    settings.imap_ca_file = str(server.cert)
    yield server
    settings.imap_ca_file = previous
    if os.environ.get("KEEP_MAIL"):
        server.stop()
    else:
        server.cleanup()


def imap_input(server: MailServer, address: str, **changes: Any) -> dict[str, Any]:
    given = {
        "emailAddress": address,
        "password": PASSWORD,
        "imapHost": "127.0.0.1",
        "imapPort": server.ports.imaps,
        "smtpHost": "127.0.0.1",
        "smtpPort": server.ports.submissions,
        "security": "TLS",
    }
    given.update(changes)
    return given


async def connect_imap(
    gql: GQL, member: Member, server: MailServer, address: str, **changes: Any
) -> dict[str, Any]:
    body = await gql(CONNECT, {"input": imap_input(server, address, **changes)}, token=member.token)
    payload: dict[str, Any] = body["connectImapMailbox"]
    return payload


async def connected_imap(
    gql: GQL, factory: Factory, server: MailServer, owner: Member | None = None
) -> tuple[Member, uuid.UUID, str]:
    owner = owner or await factory.workspace()
    address = f"{unique('imap')}@example.test"
    server.add_user(address, PASSWORD)
    payload = await connect_imap(gql, owner, server, address)
    assert payload["userErrors"] == [], payload
    parsed = parse_global_id(payload["mailbox"]["id"])
    assert parsed is not None
    return owner, parsed[1], address


async def emails_of(runtime: Runtime, workspace_id: uuid.UUID) -> list[Email]:
    async with runtime.db.sessionmaker() as session:
        return list(
            await session.scalars(
                select(Email).where(Email.workspace_id == workspace_id).order_by(Email.sent_at)
            )
        )


async def imap_session(
    server: MailServer, address: str, password: str = PASSWORD
) -> aioimaplib.IMAP4:
    """The user's own mail program."""
    context = ssl.create_default_context(cafile=str(server.cert))
    client = aioimaplib.IMAP4_SSL("127.0.0.1", server.ports.imaps, ssl_context=context)
    await client.wait_hello_from_server()
    assert (await client.login(address, password)).result == "OK"
    return client


@contextlib.asynccontextmanager
async def supervisor(
    runtime: Runtime, lease_key: str | None = None
) -> AsyncIterator[IdleSupervisor]:
    # A lease of the test's own, so supervisors of other tests never stand this one by.
    idle = IdleSupervisor(
        runtime, refresh_seconds=0.5, lease_key=lease_key or f"test-idle:{uuid.uuid4().hex}"
    )
    task = asyncio.create_task(idle.run())
    try:
        yield idle
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(
    fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 60
) -> T:
    """`fetch()` once `ok` holds; a generous deadline, never a timing assertion."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"still {value!r}"
        await asyncio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- connecting ----------------------------------------------------------------------------


async def test_connect_with_good_credentials_over_tls_and_starttls(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _address = await connected_imap(gql, factory, mail)
    async with runtime.db.sessionmaker() as session:
        mailbox = await session.get(Mailbox, mailbox_id)
        assert mailbox is not None
        assert mailbox.provider == "IMAP"
        assert mailbox.status == "PENDING"
    other = f"{unique('starttls')}@example.test"
    mail.add_user(other, PASSWORD)
    payload = await connect_imap(
        gql,
        owner,
        mail,
        other,
        imapPort=mail.ports.imap,
        smtpPort=mail.ports.submission,
        security="STARTTLS",
    )
    assert payload["userErrors"] == []
    assert payload["mailbox"]["emailAddress"] == other


async def test_the_password_is_not_stored_in_plaintext(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    _owner, mailbox_id, _ = await connected_imap(gql, factory, mail)
    async with runtime.db.sessionmaker() as session:
        rows = (
            await session.execute(
                sa.text("SELECT * FROM mailboxes WHERE id = :id"),
                {"id": mailbox_id.hex if runtime.settings.is_sqlite else mailbox_id},
            )
        ).all()
    assert rows
    assert all(PASSWORD not in str(value) for value in rows[0])


async def test_a_wrong_password_is_auth_failed_with_an_app_password_hint(
    gql: GQL, factory: Factory, mail: MailServer
) -> None:
    owner = await factory.workspace()
    address = f"{unique('imap')}@example.test"
    mail.add_user(address, PASSWORD)
    payload = await connect_imap(gql, owner, mail, address, password="wrong")
    assert payload["mailbox"] is None
    assert payload["userErrors"][0]["code"] == "AUTH_FAILED"
    assert "app password" in payload["userErrors"][0]["message"]
    assert connect.app_password_hint("imap.gmail.com").startswith(" Gmail")
    assert "Fastmail" in connect.app_password_hint("imap.fastmail.com")
    assert "iCloud" in connect.app_password_hint("imap.mail.me.com")
    mailboxes = await factory_mailboxes(gql, owner)
    assert mailboxes == []


async def factory_mailboxes(gql: GQL, owner: Member) -> list[Any]:
    body = await gql("{ mailboxes { id } }", token=owner.token)
    result: list[Any] = body["mailboxes"]
    return result


async def test_an_untrusted_certificate_is_tls_failed(
    gql: GQL, factory: Factory, mail: MailServer, settings: Settings
) -> None:
    owner = await factory.workspace()
    address = f"{unique('imap')}@example.test"
    mail.add_user(address, PASSWORD)
    trusted = settings.imap_ca_file
    settings.imap_ca_file = None
    try:
        payload = await connect_imap(gql, owner, mail, address)
    finally:
        settings.imap_ca_file = trusted
    assert payload["userErrors"][0]["code"] == "TLS_FAILED"
    assert payload["userErrors"][0]["field"] == ["input", "imapHost"]
    # TLS spoken to a port that expects plain IMAP (and STARTTLS) fails the same way.
    payload = await connect_imap(gql, owner, mail, address, imapPort=mail.ports.imap)
    assert payload["userErrors"][0]["code"] == "TLS_FAILED"


async def test_an_unreachable_host_and_a_server_that_is_not_imap(
    gql: GQL, factory: Factory, mail: MailServer
) -> None:
    owner = await factory.workspace()
    address = f"{unique('imap')}@example.test"
    mail.add_user(address, PASSWORD)
    payload = await connect_imap(gql, owner, mail, address, imapPort=free_port())
    assert payload["userErrors"][0]["code"] == "HOST_UNREACHABLE"
    payload = await connect_imap(gql, owner, mail, address, imapHost="nowhere.invalid")
    assert payload["userErrors"][0]["code"] == "HOST_UNREACHABLE"
    # Postfix answers at its port, but as an SMTP server.
    payload = await connect_imap(
        gql, owner, mail, address, imapPort=mail.ports.smtp, security="NONE"
    )
    assert payload["userErrors"][0]["code"] == "NOT_IMAP"


async def test_security_none_is_only_for_loopback_and_private_hosts_are_refused_in_production(
    factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    address = f"{unique('imap')}@example.test"
    given = connect.ImapInput(
        email_address=address,
        password=PASSWORD,
        imap_host="127.0.0.1",
        imap_port=mail.ports.imaps,
        smtp_host="127.0.0.1",
        smtp_port=mail.ports.submissions,
    )
    production = runtime.settings.model_copy(update={"env": "production"})
    async with runtime.db.transaction() as session:
        with pytest.raises(ServiceError) as refused:
            await connect.connect_imap(session, _effects(), production, owner.viewer, given)
    assert refused.value.code == "HOST_NOT_ALLOWED"
    allowed = production.model_copy(update={"imap_allow_private_hosts": True})
    mail.add_user(address, PASSWORD)
    async with runtime.db.transaction() as session:
        mailbox = await connect.connect_imap(session, _effects(), allowed, owner.viewer, given)
        assert mailbox.email_address == address
    plain = connect.ImapInput(**{**given.__dict__, "imap_host": "192.0.2.1", "security": "NONE"})
    async with runtime.db.transaction() as session:
        with pytest.raises(ServiceError) as insecure:
            await connect.connect_imap(session, _effects(), runtime.settings, owner.viewer, plain)
    assert insecure.value.field == ["security"]


def _effects() -> Any:
    from backend.kit.effects import AfterCommit

    return AfterCommit()


async def test_connecting_the_same_address_again_takes_the_new_password_and_keeps_history(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "rita@client.test", "Rita")
    await mail.deliver(
        "rita@client.test", [address], raw_message("rita@client.test", [address], "Before")
    )
    await wait_until(lambda: _inbox_count(mail, address), lambda n: n >= 1)
    await drain_passes(runtime, mailbox_id)
    mail.set_password(address, "a new app password")
    payload = await connect_imap(gql, owner, mail, address, password="a new app password")
    assert payload["userErrors"] == []
    parsed = parse_global_id(payload["mailbox"]["id"])
    assert parsed is not None and parsed[1] == mailbox_id
    assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Before"]


async def _inbox_count(server: MailServer, address: str, password: str = PASSWORD) -> int:
    client = await imap_session(server, address, password)
    try:
        response = await client.select("INBOX")
        return next(
            int(bytes(line).split()[0]) for line in response.lines if b"EXISTS" in bytes(line)
        )
    finally:
        await client.logout()


async def drain_passes(runtime: Runtime, mailbox_id: uuid.UUID) -> None:
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)


# --- sync ------------------------------------------------------------------------------


async def test_r14_contact_mail_delivered_through_smtp_is_filed_through_idle(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    """No scheduler runs here: only IDLE's push can start the pass that files the mail."""
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "ivy@client.test", "Ivy")
    async with supervisor(runtime) as idle, live_worker(runtime):
        await wait_until(lambda: _connected(idle, mailbox_id), lambda up: up, timeout=60)
        await mail.deliver(
            "ivy@client.test",
            [address],
            raw_message("ivy@client.test", [address], "Pushed by IDLE"),
        )
        emails = await wait_until(
            lambda: emails_of(runtime, owner.workspace.id),
            lambda found: len(found) == 1,
            timeout=60,
        )
    assert emails[0].subject == "Pushed by IDLE"
    assert emails[0].direction == "INCOMING"
    # BODY.PEEK[]: sync left the message unread.
    client = await imap_session(mail, address)
    try:
        await client.select("INBOX")
        flags = await client.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in b" ".join(bytes(line) for line in flags.lines)
    finally:
        await client.logout()


async def _connected(idle: IdleSupervisor, mailbox_id: uuid.UUID) -> bool:
    watcher = idle.watchers.get(mailbox_id)
    return watcher is not None and watcher.connected.is_set()


async def test_a_connection_dropped_by_the_server_is_resumed(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "jo@client.test", "Jo")
    async with supervisor(runtime) as idle, live_worker(runtime):
        await wait_until(lambda: _connected(idle, mailbox_id), lambda up: up, timeout=60)
        before = idle.connections
        mail.kick(address)
        await wait_until(lambda: _reconnected(idle, mailbox_id, before), lambda up: up, timeout=60)
        await mail.deliver(
            "jo@client.test", [address], raw_message("jo@client.test", [address], "After the drop")
        )
        emails = await wait_until(
            lambda: emails_of(runtime, owner.workspace.id),
            lambda found: len(found) == 1,
            timeout=60,
        )
    assert emails[0].subject == "After the drop"


async def _reconnected(idle: IdleSupervisor, mailbox_id: uuid.UUID, before: int) -> bool:
    return idle.connections > before and await _connected(idle, mailbox_id)


async def test_r8_mail_the_user_sent_is_found_in_sent_and_filed_outgoing(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "kai@client.test", "Kai")
    client = await imap_session(mail, address)
    try:
        # What a mail program does after sending: a copy in the Sent folder.
        response = await client.append(
            raw_message(address, ["kai@client.test"], "From my mail program"),
            mailbox="Sent",
            flags="(\\Seen)",
        )
        assert response.result == "OK"
    finally:
        await client.logout()
    await drain_passes(runtime, mailbox_id)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [(e.subject, e.direction) for e in emails] == [("From my mail program", "OUTGOING")]


async def test_r7_a_uidvalidity_change_relists_without_duplicates(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "lu@client.test", "Lu")
    await mail.deliver("lu@client.test", [address], raw_message("lu@client.test", [address], "One"))
    await wait_until(lambda: _inbox_count(mail, address), lambda n: n >= 1)
    await drain_passes(runtime, mailbox_id)
    async with runtime.db.sessionmaker() as session:
        mailbox = await session.get(Mailbox, mailbox_id)
        assert mailbox is not None and mailbox.cursor is not None
        validity = mailbox.cursor["folders"]["INBOX"]["uidvalidity"]
    mail.set_uidvalidity(address, "INBOX", validity + 1000)
    await mail.deliver("lu@client.test", [address], raw_message("lu@client.test", [address], "Two"))
    await wait_until(lambda: _inbox_count(mail, address), lambda n: n >= 2)
    await drain_passes(runtime, mailbox_id)
    emails = await emails_of(runtime, owner.workspace.id)
    assert sorted(e.subject or "" for e in emails) == ["One", "Two"]
    async with runtime.db.sessionmaker() as session:
        mailbox = await session.get(Mailbox, mailbox_id)
        assert mailbox is not None and mailbox.cursor is not None
        assert mailbox.cursor["folders"]["INBOX"]["uidvalidity"] == validity + 1000


async def test_r7_imap_and_gmail_copies_of_one_message_are_stored_once(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime, google: SandboxServer
) -> None:
    owner, gmail_id, gmail_address = await gmail_connected(gql, factory, google, runtime)
    _, imap_id, imap_address = await connected_imap(gql, factory, mail, owner)
    await factory.contact(owner, "max@client.test", "Max")
    raw = raw_message(
        "max@client.test",
        [gmail_address, imap_address],
        "To both mailboxes",
        message_id=f"<{uuid.uuid4().hex}@client.test>",
    )
    await gmail_deliver(google, gmail_address, raw)
    await mail.deliver("max@client.test", [imap_address], raw)
    await wait_until(lambda: _inbox_count(mail, imap_address), lambda n: n >= 1)
    await settle(google)
    await drain_passes(runtime, imap_id)
    await drain_passes(runtime, gmail_id)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [e.subject for e in emails] == ["To both mailboxes"]


async def test_r12_synced_mail_gets_the_crm_keyword(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "nia@client.test", "Nia")
    await gql(
        "mutation { updateWorkspaceSettings(input: {labelSyncedMail: true}) { userErrors { code } } }",
        token=owner.token,
    )
    await mail.deliver("nia@client.test", [address], raw_message("nia@client.test", [address]))
    await wait_until(lambda: _inbox_count(mail, address), lambda n: n >= 1)
    await drain_passes(runtime, mailbox_id)
    client = await imap_session(mail, address)
    try:
        await client.select("INBOX")
        flags = await client.fetch("1", "(FLAGS)")
        assert b"CRM" in b" ".join(bytes(line) for line in flags.lines)
    finally:
        await client.logout()


# --- sending -------------------------------------------------------------------------------

SEND = """mutation($input: SendEmailInput!) {
  sendEmail(input: $input) {
    email { id deliveryStatus deliveryError direction }
    userErrors { field code message }
  }
}"""


async def _folder_messages(server: MailServer, address: str, folder: str) -> list[bytes]:
    client = await imap_session(server, address)
    try:
        response = await client.select(folder)
        assert response.result == "OK"
        if not any(
            b" EXISTS" in bytes(line) and not bytes(line).startswith(b"0 ")
            for line in response.lines
        ):
            return []
        fetched = await client.fetch("1:*", "(BODY.PEEK[])")
        return [bytes(line) for line in fetched.lines if isinstance(line, bytearray)]
    finally:
        await client.logout()


async def test_r15_crm_mail_is_sent_through_smtp_and_appended_to_sent_once(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    contact = f"{unique('pat')}@client.test"
    mail.add_user(contact, PASSWORD)  # every address has a mailbox there; this one can log in
    await factory.contact(owner, contact, "Pat")
    from backend.graphql.relay import to_global_id

    sent = await gql(
        SEND,
        {
            "input": {
                "mailboxId": to_global_id("Mailbox", mailbox_id),
                "to": [contact],
                "bcc": ["audit@client.test"],
                "subject": "Sent through SMTP",
                "bodyText": "Hello Pat",
            }
        },
        token=owner.token,
    )
    assert sent["sendEmail"]["userErrors"] == [], sent
    await drain(runtime)
    email_id = parse_global_id(sent["sendEmail"]["email"]["id"])
    assert email_id is not None
    async with runtime.db.sessionmaker() as session:
        row = await session.get(Email, email_id[1])
        assert row is not None
        assert row.delivery_status == "SENT"
    # Delivered by Postfix to the contact's mailbox, without the Bcc header; the Sent copy
    # keeps it.
    received = await wait_until(
        lambda: _folder_messages(mail, contact, "INBOX"), lambda found: len(found) == 1
    )
    assert b"Sent through SMTP" in received[0]
    assert b"audit@client.test" not in received[0]
    copies = await _folder_messages(mail, address, "Sent")
    assert len(copies) == 1 and b"audit@client.test" in copies[0]
    # The Sent copy that sync brings back is the same email (R7).
    await drain_passes(runtime, mailbox_id)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [(e.subject, e.direction) for e in emails] == [("Sent through SMTP", "OUTGOING")]


RECONNECT = """mutation($id: ID!, $imap: ConnectImapMailboxInput) {
  reconnectMailbox(id: $id, imap: $imap) { authorizationUrl userErrors { field code } }
}"""


async def test_r6_reconnect_mailbox_takes_new_imap_settings_and_keeps_history(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    await factory.contact(owner, "ula@client.test", "Ula")
    await mail.deliver(
        "ula@client.test", [address], raw_message("ula@client.test", [address], "Kept")
    )
    await wait_until(lambda: _inbox_count(mail, address), lambda n: n >= 1)
    await drain_passes(runtime, mailbox_id)
    from backend.graphql.relay import to_global_id

    global_id = to_global_id("Mailbox", mailbox_id)
    mail.set_password(address, "rotated app password")
    wrong = await gql(
        RECONNECT,
        {"id": global_id, "imap": imap_input(mail, address, password="old one")},
        token=owner.token,
    )
    assert wrong["reconnectMailbox"]["userErrors"][0]["code"] == "AUTH_FAILED"
    done = await gql(
        RECONNECT,
        {
            "id": global_id,
            "imap": imap_input(
                mail,
                address,
                password="rotated app password",
                imapPort=mail.ports.imap,
                smtpPort=mail.ports.submission,
                security="STARTTLS",
            ),
        },
        token=owner.token,
    )
    assert done["reconnectMailbox"] == {"authorizationUrl": None, "userErrors": []}
    async with runtime.db.sessionmaker() as session:
        mailbox = await session.get(Mailbox, mailbox_id)
        assert mailbox is not None and mailbox.cursor is not None
    await mail.deliver(
        "ula@client.test", [address], raw_message("ula@client.test", [address], "New")
    )
    await wait_until(lambda: _inbox_count(mail, address, "rotated app password"), lambda n: n >= 2)
    await drain_passes(runtime, mailbox_id)
    emails = await emails_of(runtime, owner.workspace.id)
    assert sorted(e.subject or "" for e in emails) == ["Kept", "New"]


# --- the logins take no write lock; identities ---------------------------------------------


def _write_lock_free(runtime: Runtime) -> bool:
    """Whether another process could write now: a BEGIN IMMEDIATE that does not wait."""
    import sqlite3

    path = sa.engine.make_url(runtime.db.url).database
    assert path
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


@pytest.mark.skipif(
    not os.environ.get("MAILSYNC_TEST_DB", "sqlite").startswith("sqlite"),
    reason="SQLite's database-wide write lock",
)
async def test_the_imap_and_smtp_logins_hold_no_write_lock(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    real_probe = connect.probe_imap
    free_during_login: list[bool] = []

    async def probe(config: Any, settings: Settings) -> None:
        free_during_login.append(_write_lock_free(runtime))
        await real_probe(config, settings)

    monkeypatch.setattr(connect, "probe_imap", probe)
    from backend.graphql.relay import to_global_id

    done = await gql(
        RECONNECT,
        {"id": to_global_id("Mailbox", mailbox_id), "imap": imap_input(mail, address)},
        token=owner.token,
    )
    assert done["reconnectMailbox"] == {"authorizationUrl": None, "userErrors": []}
    other = f"{unique('imap')}@example.test"
    mail.add_user(other, PASSWORD)
    payload = await connect_imap(gql, owner, mail, other)
    assert payload["userErrors"] == []
    assert free_during_login == [True, True]


async def test_r1_identities_are_own_addresses_and_a_reconnect_keeps_them(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    from backend.graphql.relay import to_global_id
    from backend.mailboxes.queries import own_addresses

    owner = await factory.workspace()
    address = f"{unique('imap')}@example.test"
    mail.add_user(address, PASSWORD)
    bad = await connect_imap(gql, owner, mail, address, identities=["not an address"])
    assert bad["userErrors"][0]["field"] == ["input", "identities", "0"]
    payload = await connect_imap(
        gql, owner, mail, address, identities=["Sales@Alias.test", address.upper()]
    )
    assert payload["userErrors"] == [], payload
    parsed = parse_global_id(payload["mailbox"]["id"])
    assert parsed is not None
    mailbox_id = parsed[1]

    async def state() -> tuple[list[str], dict[str, uuid.UUID]]:
        async with runtime.db.sessionmaker() as session:
            mailbox = await session.get(Mailbox, mailbox_id)
            assert mailbox is not None
            return list(mailbox.aliases), await own_addresses(session, owner.workspace.id)

    aliases, owners = await state()
    assert aliases == ["sales@alias.test"]
    assert owners["sales@alias.test"] == owner.user.id
    global_id = to_global_id("Mailbox", mailbox_id)
    kept = await gql(
        RECONNECT, {"id": global_id, "imap": imap_input(mail, address)}, token=owner.token
    )
    assert kept["reconnectMailbox"]["userErrors"] == []
    assert (await state())[0] == ["sales@alias.test"]
    cleared = await gql(
        RECONNECT,
        {"id": global_id, "imap": imap_input(mail, address, identities=[])},
        token=owner.token,
    )
    assert cleared["reconnectMailbox"]["userErrors"] == []
    aliases, owners = await state()
    assert aliases == [] and "sales@alias.test" not in owners


# --- IDLE: one holder of the connections; a refused password is not retried ---------------


async def test_r14_one_worker_holds_the_idle_connections_and_another_takes_over(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    _owner, mailbox_id, _address = await connected_imap(gql, factory, mail)
    key = f"test-idle:{uuid.uuid4().hex}"
    first = IdleSupervisor(runtime, refresh_seconds=0.5, lease_key=key)
    first_run = asyncio.create_task(first.run())
    try:
        await wait_until(lambda: _connected(first, mailbox_id), lambda up: up)
        async with supervisor(runtime, key) as second:
            # Rounds, not seconds: the second has asked for the lease a few times.
            rounds = second.rounds
            await wait_until(_value(lambda: second.rounds), lambda n: n >= rounds + 3)
            assert first.leading and not second.leading
            assert second.watchers == {} and second.connections == 0
            # What a worker's shutdown does.
            first_run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first_run
            assert first.watchers == {}
            await wait_until(lambda: _connected(second, mailbox_id), lambda up: up)
            assert second.leading
    finally:
        first_run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first_run


async def test_a_refused_password_is_not_retried_until_the_credentials_change(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime
) -> None:
    from backend.graphql.relay import to_global_id

    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    mail.set_password(address, "changed in the mail program")
    async with supervisor(runtime) as idle:
        await wait_until(_value(lambda: idle.login_refusals), lambda n: n == 1)
        rounds = idle.rounds
        await wait_until(_value(lambda: idle.rounds), lambda n: n >= rounds + 5)
        assert idle.login_refusals == 1 and mailbox_id not in idle.watchers
        done = await gql(
            RECONNECT,
            {
                "id": to_global_id("Mailbox", mailbox_id),
                "imap": imap_input(mail, address, password="changed in the mail program"),
            },
            token=owner.token,
        )
        assert done["reconnectMailbox"]["userErrors"] == []
        await wait_until(lambda: _connected(idle, mailbox_id), lambda up: up)
    assert idle.login_refusals == 1


def _value(read: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def fetch() -> T:
        return read()

    return fetch


class _Crash(BaseException):
    """The worker process dying: nothing in the job catches it."""


async def test_r15_a_crash_between_smtp_and_the_sent_copy_never_sends_twice(
    gql: GQL, factory: Factory, mail: MailServer, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiosmtplib

    from backend.graphql.relay import to_global_id
    from backend.providers.imap.provider import ImapProvider
    from backend.sending.jobs import send_email
    from backend.sending.tables import OutgoingMessage

    owner, mailbox_id, address = await connected_imap(gql, factory, mail)
    contact = f"{unique('kim')}@client.test"
    await factory.contact(owner, contact, "Kim")
    sent = await gql(
        SEND,
        {
            "input": {
                "mailboxId": to_global_id("Mailbox", mailbox_id),
                "to": [contact],
                "subject": "Accepted, then the worker died",
                "bodyText": "Hello Kim",
            }
        },
        token=owner.token,
    )
    assert sent["sendEmail"]["userErrors"] == [], sent
    parsed = parse_global_id(sent["sendEmail"]["email"]["id"])
    assert parsed is not None
    email_id = parsed[1]
    submissions: list[str] = []
    real_send_message = aiosmtplib.SMTP.send_message
    real_file_sent = ImapProvider._file_sent

    async def counted(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        submissions.append("sent")
        return await real_send_message(self, *args, **kwargs)

    async def crash(self: ImapProvider, raw: bytes) -> Any:
        raise _Crash

    monkeypatch.setattr(aiosmtplib.SMTP, "send_message", counted)
    monkeypatch.setattr(ImapProvider, "_file_sent", crash)
    with pytest.raises(_Crash):
        await send_email(runtime, str(email_id))
    assert submissions == ["sent"]
    monkeypatch.setattr(ImapProvider, "_file_sent", real_file_sent)
    async with runtime.db.transaction() as session:
        outgoing = await session.get(OutgoingMessage, email_id)
        assert outgoing is not None and outgoing.smtp_accepted_at is not None
        # The retry is due (send_confirm_seconds after the attempt).
        outgoing.last_attempt_at = None
        session.add(outgoing)
    assert await send_email(runtime, str(email_id)) == "sent"
    assert submissions == ["sent"]
    async with runtime.db.sessionmaker() as session:
        row = await session.get(Email, email_id)
        assert row is not None and row.delivery_status == "SENT"
    copies = await _folder_messages(mail, address, "Sent")
    assert len(copies) == 1 and b"Accepted, then the worker died" in copies[0]

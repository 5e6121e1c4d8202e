"""Plain factory functions over the service layer: what a test needs, committed for real."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from backend.auth.service import Viewer, issue_token
from backend.auth.tables import Role, User, Workspace
from backend.contacts import service as contacts_service
from backend.contacts.tables import Contact
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mail.tables import Email
from backend.mailboxes import service as mailboxes_service
from backend.mailboxes.tables import Mailbox
from backend.providers.base import FetchedMessage, MessageRef, Provider
from backend.runtime import Runtime
from backend.sync.ingest import IngestResult, filing_context, ingest
from backend.workspaces import service as workspaces_service

_counter = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class Member:
    user: User
    workspace: Workspace
    token: str

    @property
    def viewer(self) -> Viewer:
        return Viewer(user=self.user, workspace=self.workspace)

    @property
    def email(self) -> str:
        return self.user.email


def raw_message(
    sender: str,
    to: list[str],
    subject: str = "Hello",
    body: str = "Hi there",
    *,
    cc: list[str] | None = None,
    bcc: list[str] | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    date: datetime | None = None,
    html: str | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if bcc:
        msg["Bcc"] = ", ".join(bcc)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="mail.test")
    msg["Date"] = format_datetime(date or (now() + timedelta(seconds=1)))
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    if html:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


class Factory:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.db = runtime.db

    async def workspace(self, role_of_first: Role = Role.OWNER) -> Member:
        async with self.db.transaction() as session:
            workspace, owner = await workspaces_service.create_workspace(
                session, unique("Workspace "), f"{unique('owner')}@crm.test", "Owner"
            )
            token = await issue_token(
                session, self.runtime.settings.secret, owner, timedelta(hours=1)
            )
        return Member(owner, workspace, token)

    async def member(self, of: Member, role: Role = Role.USER, name: str = "Teammate") -> Member:
        async with self.db.transaction() as session:
            user = await workspaces_service.add_user(
                session, of.workspace, f"{unique('user')}@crm.test", role, name
            )
            token = await issue_token(
                session, self.runtime.settings.secret, user, timedelta(hours=1)
            )
        return Member(user, of.workspace, token)

    async def contact(
        self,
        of: Member,
        email: str | None = None,
        name: str = "Contact",
        additional: list[str] | None = None,
    ) -> Contact:
        async with self.db.transaction() as session:
            return await contacts_service.create_contact(
                session,
                of.viewer,
                email=email or f"{unique('contact')}@client.test",
                name=name,
                additional_emails=additional or [],
            )

    async def mailbox(
        self,
        owner: Member,
        address: str | None = None,
        provider: Provider = Provider.GMAIL,
        connected_at: datetime | None = None,
    ) -> Mailbox:
        async with self.db.transaction() as session:
            mailbox = await mailboxes_service.connect_mailbox(
                session,
                AfterCommit(),
                self.runtime.settings.secret,
                owner=owner.user,
                provider=provider,
                email_address=address or owner.email,
                credentials={"token": "secret-token"},
            )
            if connected_at is not None:
                mailbox.connected_at = connected_at
                session.add(mailbox)
            return mailbox

    async def ingest(
        self,
        mailbox: Mailbox,
        raw: bytes,
        provider_id: str | None = None,
        thread_id: str | None = None,
    ) -> IngestResult:
        """Put one message through the ingest service, as a sync pass would."""
        effects = AfterCommit()
        async with self.db.transaction() as session:
            box = await session.get(Mailbox, mailbox.id)
            assert box is not None
            workspace = await session.get(Workspace, box.workspace_id)
            assert workspace is not None
            ctx = await filing_context(session, workspace, box)
            fetched = FetchedMessage(
                ref=MessageRef(provider_id or unique("msg-"), thread_id), raw=raw
            )
            result = await ingest(session, effects, workspace, box, ctx, fetched)
        await effects.release(self.runtime, self.runtime)
        return result

    async def email(
        self, owner: Member, mailbox: Mailbox, raw: bytes, provider_id: str | None = None
    ) -> Email:
        """File a message that must be filed, and return the stored email."""
        result = await self.ingest(mailbox, raw, provider_id)
        assert result.email_id is not None, f"not filed: {result.reason}"
        async with self.db.sessionmaker() as session:
            email = await session.get(Email, result.email_id)
        assert email is not None
        return email


def in_minutes(minutes: int) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)

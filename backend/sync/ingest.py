"""Filing one fetched message: parse, decide, store once per workspace (R7), link timelines."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.contacts import queries as contact_queries
from backend.contacts.tables import Contact, ContactAddress
from backend.exclusions.queries import excluded_values
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mail import service as mail_service
from backend.mail.service import NewEmail, ParticipantData, email_received_event
from backend.mail.tables import Email, EmailSource, MailboxMessage, ParticipantRole, Thread
from backend.mailboxes.tables import Mailbox
from backend.providers.base import FetchedMessage
from backend.sync.filing import FilingContext, decide
from backend.sync.parsing import ParsedMessage, parse_message
from backend.workspaces import queries as workspace_queries
from backend.workspaces.tables import ContactMatching, Workspace


class Outcome(enum.Enum):
    FILED = "filed"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"


@dataclass
class IngestResult:
    outcome: Outcome
    email_id: uuid.UUID | None = None
    reason: str | None = None


async def filing_context(
    session: AsyncSession, workspace: Workspace, mailbox: Mailbox
) -> FilingContext:
    excluded = set(await excluded_values(session, workspace.id))
    disabled = await session.scalars(
        select(ContactAddress.address)
        .join(Contact, col(Contact.id) == ContactAddress.contact_id)
        .where(Contact.workspace_id == workspace.id, col(Contact.email_sync_enabled).is_(False))
    )
    excluded.update(disabled)
    return FilingContext(
        own_addresses=await workspace_queries.own_addresses(session, workspace.id),
        excluded=frozenset(excluded),
        auto_creation=workspace.contact_auto_creation,
        sync_mode=mailbox.sync_mode,
    )


def synthetic_message_id(mailbox: Mailbox, provider_id: str) -> str:
    """R7 falls back to the provider id for mail without a Message-ID."""
    return f"<{provider_id}@{mailbox.provider.value.lower()}.{mailbox.id.hex}.mailsync.invalid>"


async def _existing(
    session: AsyncSession, workspace_id: uuid.UUID, message_id: str
) -> Email | None:
    return (
        await session.scalars(
            select(Email).where(Email.workspace_id == workspace_id, Email.message_id == message_id)
        )
    ).first()


async def _thread_for(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    mailbox: Mailbox,
    provider_thread_id: str | None,
    parsed: ParsedMessage,
) -> Thread | None:
    """R9: the mailbox's provider thread first, then In-Reply-To/References; never the subject."""
    if provider_thread_id:
        thread_id = await session.scalar(
            select(Email.thread_id)
            .join(MailboxMessage, col(MailboxMessage.email_id) == Email.id)
            .where(
                MailboxMessage.mailbox_id == mailbox.id,
                MailboxMessage.provider_thread_id == provider_thread_id,
            )
            .limit(1)
        )
        if thread_id is not None:
            return await session.get(Thread, thread_id)
    related = [*([parsed.in_reply_to] if parsed.in_reply_to else []), *reversed(parsed.references)]
    if related:
        thread_id = await session.scalar(
            select(Email.thread_id)
            .where(Email.workspace_id == workspace_id, col(Email.message_id).in_(related))
            .order_by(col(Email.sent_at).desc())
            .limit(1)
        )
        if thread_id is not None:
            return await session.get(Thread, thread_id)
    return None


async def _contacts_for(
    session: AsyncSession, workspace: Workspace, addresses: list[str]
) -> list[Contact]:
    matched = await contact_queries.contacts_for_addresses(
        session,
        workspace.id,
        addresses,
        primary_only=workspace.contact_matching == ContactMatching.PRIMARY_EMAIL_ONLY,
    )
    contacts: list[Contact] = []
    for address in addresses:
        contact = matched.get(address)
        if contact is not None and contact not in contacts:
            contacts.append(contact)
    return contacts


async def _create_contacts(
    session: AsyncSession, workspace: Workspace, parsed_addresses: list[tuple[str, str | None]]
) -> list[Contact]:
    created: list[Contact] = []
    for address, name in parsed_addresses:
        contact = Contact(workspace_id=workspace.id, name=name)
        session.add(contact)
        await session.flush()
        session.add(
            ContactAddress(workspace_id=workspace.id, contact_id=contact.id, address=address)
        )
        created.append(contact)
    await session.flush()
    return created


def _participants(parsed: ParsedMessage) -> list[ParticipantData]:
    out: list[ParticipantData] = []
    if parsed.sender:
        out.append(ParticipantData(ParticipantRole.FROM, parsed.sender.address, parsed.sender.name))
    for role, group in (
        (ParticipantRole.TO, parsed.to),
        (ParticipantRole.CC, parsed.cc),
        (ParticipantRole.BCC, parsed.bcc),
    ):
        out.extend(ParticipantData(role, p.address, p.name) for p in group)
    return out


async def ingest(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    fetched: FetchedMessage,
    parsed: ParsedMessage | None = None,
) -> IngestResult:
    """File one message. Raises only for storage failures; parse failures are the caller's."""
    parsed = parsed or parse_message(fetched.raw)
    message_id = parsed.message_id or synthetic_message_id(mailbox, fetched.ref.provider_id)
    thread_ref = fetched.thread_id or fetched.ref.thread_id
    existing = await _existing(session, workspace.id, message_id)
    if existing is not None:
        # R7: seen before (another mailbox, a replay, a crash before commit): never filed twice.
        await mail_service.record_sighting(
            session, mailbox.id, existing.id, fetched.ref.provider_id, thread_ref
        )
        return IngestResult(Outcome.DUPLICATE, existing.id)
    sent_at: datetime = parsed.date or fetched.internal_date or now()
    if sent_at < mailbox.connected_at:
        return IngestResult(Outcome.SKIPPED, reason="dated before the connection")  # R6
    decision = decide(parsed, ctx)
    if decision.skip_reason is not None:
        return IngestResult(Outcome.SKIPPED, reason=decision.skip_reason)
    contacts = await _contacts_for(session, workspace, decision.candidates)
    if not contacts and decision.creatable:
        contacts = await _create_contacts(
            session, workspace, [(p.address, p.name) for p in decision.creatable]
        )
    if not contacts:
        return IngestResult(Outcome.SKIPPED, reason="no contact")  # R5: not stored at all
    thread = await _thread_for(session, workspace.id, mailbox, thread_ref, parsed)
    if ctx.sync_mode.value == "CRM_THREADS_ONLY":
        started_in_crm = thread is not None and await session.scalar(
            select(sa.func.count())
            .select_from(Email)
            .where(Email.thread_id == thread.id, Email.source == EmailSource.CRM)
        )
        if not started_in_crm:
            return IngestResult(Outcome.SKIPPED, reason="not a CRM thread")  # R12
    try:
        async with session.begin_nested():
            if thread is None:
                thread = Thread(
                    workspace_id=workspace.id, subject=parsed.subject, last_email_at=sent_at
                )
                session.add(thread)
                await session.flush()
            email = await mail_service.store_email(
                session,
                workspace_id=workspace.id,
                thread=thread,
                mailbox_id=mailbox.id,
                data=NewEmail(
                    message_id=message_id,
                    direction=decision.direction,
                    sent_at=sent_at,
                    participants=_participants(parsed),
                    subject=parsed.subject,
                    snippet=parsed.snippet,
                    body_text=parsed.body_text,
                    body_html=parsed.body_html,
                    in_reply_to=parsed.in_reply_to,
                    references=parsed.references,
                    headers=parsed.headers,
                    attachments=parsed.attachments,
                    sent_by_id=mailbox.owner_id,
                ),
                contacts=contacts,
            )
            await mail_service.record_sighting(
                session, mailbox.id, email.id, fetched.ref.provider_id, thread_ref
            )
            await session.flush()
    except IntegrityError:
        # A concurrent pass of another mailbox stored it first (R7): that one files it.
        existing = await _existing(session, workspace.id, message_id)
        if existing is None:
            raise
        await mail_service.record_sighting(
            session, mailbox.id, existing.id, fetched.ref.provider_id, thread_ref
        )
        return IngestResult(Outcome.DUPLICATE, existing.id)
    effects.publish(workspace.id, email_received_event(email, [c.id for c in contacts]))
    return IngestResult(Outcome.FILED, email.id)

"""What users do with filed mail: file it on another timeline, move it, delete it (R2, R11),
and store CRM-sent mail."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from backend.auth.service import Viewer
from backend.contacts.tables import Contact
from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, NotFound, ServiceError
from backend.mail import service as mail_service
from backend.mail.service import NewEmail, email_received_event, refresh_threads
from backend.mail.tables import (
    Email,
    Participant,
    Thread,
    TimelineEntry,
)


async def _get_email(session: AsyncSession, viewer: Viewer, email_id: uuid.UUID | None) -> Email:
    email = await session.get(Email, email_id) if email_id else None
    if email is None or email.workspace_id != viewer.workspace_id:
        raise NotFound("Email", ["emailId"])
    return email


async def _get_contact(
    session: AsyncSession, viewer: Viewer, contact_id: uuid.UUID | None, field: str
) -> Contact:
    contact = await session.get(Contact, contact_id) if contact_id else None
    if contact is None or contact.workspace_id != viewer.workspace_id:
        raise NotFound("Contact", [field])
    return contact


async def _link(session: AsyncSession, email: Email, contact: Contact) -> bool:
    exists = await session.get(TimelineEntry, (email.id, contact.id))
    if exists is not None:
        return False
    session.add(
        TimelineEntry(
            email_id=email.id,
            contact_id=contact.id,
            workspace_id=email.workspace_id,
            sent_at=email.sent_at,
        )
    )
    if contact.last_email_at is None or contact.last_email_at < email.sent_at:
        contact.last_email_at = email.sent_at
        session.add(contact)
    return True


async def file_email(
    session: AsyncSession,
    viewer: Viewer,
    effects: AfterCommit,
    email_id: uuid.UUID | None,
    contact_id: uuid.UUID | None,
) -> Email:
    """Put an email on another contact's timeline by hand (R2), or assign captured mail (R16)."""
    email = await _get_email(session, viewer, email_id)
    contact = await _get_contact(session, viewer, contact_id, "contactId")
    if not await _link(session, email, contact):
        raise ServiceError(
            ErrorCode.ALREADY_FILED,
            "This email is already on that contact's timeline.",
            ["contactId"],
        )
    await session.flush()
    effects.publish(
        email.workspace_id,
        email_received_event(email.id, email.thread_id, email.mailbox_id, [contact.id]),
    )
    return email


async def move_email(
    session: AsyncSession,
    viewer: Viewer,
    effects: AfterCommit,
    email_id: uuid.UUID | None,
    from_contact_id: uuid.UUID | None,
    to_contact_id: uuid.UUID | None,
) -> Email:
    email = await _get_email(session, viewer, email_id)
    source = await _get_contact(session, viewer, from_contact_id, "fromContactId")
    target = await _get_contact(session, viewer, to_contact_id, "toContactId")
    if source.id == target.id:
        raise ServiceError(
            ErrorCode.SAME_CONTACT,
            "Choose a different contact to move the email to.",
            ["toContactId"],
        )
    removed = await session.execute(
        delete(TimelineEntry).where(
            col(TimelineEntry.email_id) == email.id, col(TimelineEntry.contact_id) == source.id
        )
    )
    if not removed.rowcount:  # type: ignore[attr-defined]
        raise ServiceError(
            ErrorCode.NOT_FILED, "This email is not on that contact's timeline.", ["fromContactId"]
        )
    if await _link(session, email, target):
        effects.publish(
            email.workspace_id,
            email_received_event(email.id, email.thread_id, email.mailbox_id, [target.id]),
        )
    await session.flush()
    return email


async def delete_email(
    session: AsyncSession, viewer: Viewer, email_id: uuid.UUID | None
) -> uuid.UUID:
    """R11: removes the email from the CRM only; the mailbox is never touched."""
    email = await _get_email(session, viewer, email_id)
    thread_id = email.thread_id
    # Remembered per workspace, so that no mailbox files it again (R11).
    await mail_service.remember_deleted(session, email.workspace_id, [email.message_id])
    await session.delete(email)
    await session.flush()
    await refresh_threads(session, [thread_id])
    return email.id


async def store_email(
    session: AsyncSession,
    *,
    workspace_id: uuid.UUID,
    thread: Thread,
    mailbox_id: uuid.UUID | None,
    data: NewEmail,
    contacts: Sequence[Contact],
) -> Email:
    """Persist one new email, its participants and its timeline entries; thread counters follow."""
    email = Email(
        workspace_id=workspace_id,
        thread_id=thread.id,
        mailbox_id=mailbox_id,
        message_id=data.message_id,
        in_reply_to=data.in_reply_to,
        references=data.references,
        direction=data.direction,
        source=data.source,
        subject=data.subject,
        snippet=data.snippet,
        body_text=data.body_text,
        body_html=data.body_html,
        headers=data.headers,
        attachments=data.attachments,
        sent_at=data.sent_at,
        sent_by_id=data.sent_by_id,
        delivery_status=data.delivery_status,
        idempotency_key=data.idempotency_key,
    )
    session.add(email)
    session.add_all(
        Participant(email_id=email.id, role=p.role, position=i, address=p.address, name=p.name)
        for i, p in enumerate(data.participants)
    )
    for contact in contacts:
        await _link(session, email, contact)
    thread.email_count += 1
    if thread.subject is None and data.subject:
        thread.subject = data.subject
    if thread.last_email_at < data.sent_at or thread.email_count == 1:
        thread.last_email_at = data.sent_at
    session.add(thread)
    await session.flush()
    return email

"""Stored mail: the rows every domain may need to maintain (thread counters, orphans)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.mail.tables import (
    DeletedMessage,
    DeliveryStatus,
    Email,
    EmailDirection,
    EmailSource,
    MailboxMessage,
    ParticipantRole,
    Thread,
    TimelineEntry,
)


def email_received_event(
    email_id: uuid.UUID,
    thread_id: uuid.UUID,
    mailbox_id: uuid.UUID | None,
    contact_ids: Iterable[uuid.UUID],
) -> dict[str, Any]:
    return {
        "type": "emailReceived",
        "emailId": str(email_id),
        "threadId": str(thread_id),
        "mailboxId": str(mailbox_id) if mailbox_id else None,
        "contactIds": [str(c) for c in contact_ids],
    }


@dataclass
class ParticipantData:
    role: ParticipantRole
    address: str
    name: str | None = None


@dataclass
class NewEmail:
    """An email ready to store: parsed, normalized, its contacts decided."""

    message_id: str
    direction: EmailDirection
    sent_at: datetime
    participants: list[ParticipantData]
    source: EmailSource = EmailSource.SYNC
    subject: str | None = None
    snippet: str | None = None
    body_text: str | None = None
    body_html: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    sent_by_id: uuid.UUID | None = None
    delivery_status: DeliveryStatus | None = None
    idempotency_key: str | None = None


async def email_ids_on_timeline(session: AsyncSession, contact_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await session.scalars(
        select(TimelineEntry.email_id).where(TimelineEntry.contact_id == contact_id)
    )
    return list(rows)


async def refresh_threads(session: AsyncSession, thread_ids: Iterable[uuid.UUID]) -> None:
    """Recompute thread counters after emails left; drop threads left empty."""
    for thread_id in set(thread_ids):
        count, last = (
            await session.execute(
                select(sa.func.count(), sa.func.max(Email.sent_at)).where(
                    Email.thread_id == thread_id
                )
            )
        ).one()
        if not count:
            await session.execute(delete(Thread).where(col(Thread.id) == thread_id))
        else:
            await session.execute(
                update(Thread)
                .where(col(Thread.id) == thread_id)
                .values(email_count=count, last_email_at=last)
            )


async def delete_unfiled(session: AsyncSession, email_ids: Sequence[uuid.UUID]) -> int:
    """Delete synced or CRM mail among `email_ids` that is on no timeline any more (R5)."""
    if not email_ids:
        return 0
    orphans = (
        await session.execute(
            select(Email.id, Email.thread_id).where(
                col(Email.id).in_(email_ids),
                Email.source != EmailSource.CAPTURE,
                ~sa.exists().where(col(TimelineEntry.email_id) == Email.id),
            )
        )
    ).all()
    if orphans:
        await session.execute(delete(Email).where(col(Email.id).in_([o[0] for o in orphans])))
        await refresh_threads(session, [o[1] for o in orphans])
    return len(orphans)


async def erase_mailbox_history(session: AsyncSession, mailbox_id: uuid.UUID) -> int:
    """R11: delete every synced email that only this mailbox brought in."""
    seen_elsewhere = (
        select(MailboxMessage.email_id)
        .where(MailboxMessage.mailbox_id != mailbox_id)
        .scalar_subquery()
    )
    doomed = (
        await session.execute(
            select(Email.id, Email.thread_id).where(
                Email.source == EmailSource.SYNC,
                sa.or_(
                    col(Email.mailbox_id) == mailbox_id,
                    col(Email.id).in_(
                        select(MailboxMessage.email_id).where(
                            MailboxMessage.mailbox_id == mailbox_id
                        )
                    ),
                ),
                col(Email.id).not_in(seen_elsewhere),
            )
        )
    ).all()
    if doomed:
        await session.execute(delete(Email).where(col(Email.id).in_([d[0] for d in doomed])))
        await refresh_threads(session, [d[1] for d in doomed])
    return len(doomed)


async def remember_deleted(
    session: AsyncSession, workspace_id: uuid.UUID, message_ids: Sequence[str]
) -> None:
    """R11: these Message-IDs were deleted from the CRM and are never filed again."""
    known = await deleted_among(session, workspace_id, message_ids)
    for message_id in dict.fromkeys(message_ids):
        if message_id not in known:
            session.add(DeletedMessage(workspace_id=workspace_id, message_id=message_id))
    await session.flush()


async def deleted_among(
    session: AsyncSession, workspace_id: uuid.UUID, message_ids: Sequence[str]
) -> set[str]:
    if not message_ids:
        return set()
    rows = await session.scalars(
        select(DeletedMessage.message_id).where(
            DeletedMessage.workspace_id == workspace_id,
            col(DeletedMessage.message_id).in_(message_ids),
        )
    )
    return set(rows)

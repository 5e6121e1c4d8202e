from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from backend.contacts.tables import Contact
from backend.kit.pagination import Page, PageRequest, encode_cursor, keyset_page
from backend.kit.text import LIKE_ESCAPE, contains_pattern
from backend.mail.tables import Email as EmailRow
from backend.mail.tables import (
    EmailDirection,
    EmailSource,
    Participant,
    ParticipantRole,
    Thread,
    TimelineEntry,
)
from backend.mailboxes.tables import Mailbox
from backend.timeline.access import Access, readable_by


@dataclass(frozen=True)
class EmailQuery:
    contact_id: uuid.UUID | None = None
    mailbox_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    direction: EmailDirection | None = None
    source: EmailSource | None = None
    search: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    unassigned: bool = False
    match_nothing: bool = False
    # Who searches: subject and body match only where they may read them (R17).
    viewer_id: uuid.UUID | None = None


async def emails_by_ids(
    session: AsyncSession, workspace_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, EmailRow]:
    rows = await session.scalars(
        select(EmailRow).where(col(EmailRow.id).in_(ids), EmailRow.workspace_id == workspace_id)
    )
    return {e.id: e for e in rows}


async def threads_by_ids(
    session: AsyncSession, workspace_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Thread]:
    rows = await session.scalars(
        select(Thread).where(col(Thread.id).in_(ids), Thread.workspace_id == workspace_id)
    )
    return {t.id: t for t in rows}


class ParticipantRecord(Protocol):
    """What the API reads of a participant: a Core row (no entity to build) or the entity."""

    email_id: uuid.UUID
    role: ParticipantRole
    address: str
    name: str | None


async def participants_by_email(
    session: AsyncSession, email_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[ParticipantRecord]]:
    # Rows, not entities: a page has five participants an email, and building entities for
    # them cost more than the statement (docs/performance.md).
    rows = await session.execute(
        select(Participant.email_id, Participant.role, Participant.address, Participant.name)
        .where(col(Participant.email_id).in_(email_ids))
        .order_by(col(Participant.email_id), col(Participant.position))
    )
    grouped: dict[uuid.UUID, list[ParticipantRecord]] = defaultdict(list)
    for p in rows:
        grouped[p.email_id].append(cast("ParticipantRecord", p))
    return grouped


async def contact_ids_by_email(
    session: AsyncSession, email_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    rows = await session.execute(
        select(TimelineEntry.email_id, TimelineEntry.contact_id)
        .where(col(TimelineEntry.email_id).in_(email_ids))
        .order_by(col(TimelineEntry.filed_at), col(TimelineEntry.contact_id))
    )
    grouped: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for email_id, contact_id in rows:
        grouped[email_id].append(contact_id)
    return grouped


async def timeline_counts(
    session: AsyncSession, contact_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Each contact's timeline total: the counter the triggers keep (migration 0008), so it
    costs one row however long the timeline. A column read, not the entity, so a contact
    loaded earlier in the transaction cannot answer a stale count."""
    rows = await session.execute(
        select(Contact.id, Contact.timeline_count).where(col(Contact.id).in_(contact_ids))
    )
    return {contact_id: int(total) for contact_id, total in rows}


async def thread_email_ids(
    session: AsyncSession, thread_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    rows = await session.execute(
        select(EmailRow.thread_id, EmailRow.id)
        .where(col(EmailRow.thread_id).in_(thread_ids))
        .order_by(col(EmailRow.sent_at), col(EmailRow.id))
    )
    grouped: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for thread_id, email_id in rows:
        grouped[thread_id].append(email_id)
    return grouped


async def thread_subject_viewers(
    session: AsyncSession, thread_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[str | None, uuid.UUID | None]]]:
    """Per thread, (visibility, owner id) of each email's mailbox: who may see its subject (R17)."""
    rows = await session.execute(
        select(EmailRow.thread_id, Mailbox.visibility, Mailbox.owner_id)
        .outerjoin(Mailbox, col(Mailbox.id) == EmailRow.mailbox_id)
        .where(col(EmailRow.thread_id).in_(thread_ids))
    )
    grouped: dict[uuid.UUID, list[tuple[str | None, uuid.UUID | None]]] = defaultdict(list)
    for thread_id, visibility, owner_id in rows:
        grouped[thread_id].append((visibility, owner_id))
    return grouped


def _filtered(workspace_id: uuid.UUID, query: EmailQuery) -> SelectOfScalar[EmailRow]:
    stmt = select(EmailRow).where(EmailRow.workspace_id == workspace_id)
    if query.match_nothing:
        stmt = stmt.where(sa.false())
    if query.contact_id is not None:
        stmt = stmt.where(
            col(EmailRow.id).in_(
                select(TimelineEntry.email_id).where(TimelineEntry.contact_id == query.contact_id)
            )
        )
    if query.unassigned:
        stmt = stmt.where(
            EmailRow.source == EmailSource.CAPTURE,
            ~sa.exists().where(col(TimelineEntry.email_id) == EmailRow.id),
        )
    if query.mailbox_id is not None:
        stmt = stmt.where(EmailRow.mailbox_id == query.mailbox_id)
    if query.user_id is not None:
        stmt = stmt.where(EmailRow.sent_by_id == query.user_id)
    if query.direction is not None:
        stmt = stmt.where(EmailRow.direction == query.direction)
    if query.source is not None:
        stmt = stmt.where(EmailRow.source == query.source)
    if query.since is not None:
        stmt = stmt.where(col(EmailRow.sent_at) >= query.since)
    if query.until is not None:
        stmt = stmt.where(col(EmailRow.sent_at) < query.until)
    if query.search:
        # Trimmed and lower-cased by `kit.text.clean_search`; `%` and `_` match literally.
        pattern = contains_pattern(query.search)
        by_participant = select(Participant.email_id).where(
            sa.or_(
                col(Participant.address).like(pattern, escape=LIKE_ESCAPE),
                sa.func.lower(Participant.name).like(pattern, escape=LIKE_ESCAPE),
            )
        )
        # R17: the subject and body match only where the viewer may read them.
        stmt = stmt.where(
            sa.or_(
                sa.and_(
                    sa.func.lower(EmailRow.subject).like(pattern, escape=LIKE_ESCAPE),
                    readable_by(query.viewer_id, Access.SUBJECT),
                ),
                sa.and_(
                    sa.func.lower(EmailRow.body_text).like(pattern, escape=LIKE_ESCAPE),
                    readable_by(query.viewer_id, Access.ALL),
                ),
                col(EmailRow.id).in_(by_participant),
            )
        )
    return stmt


def timeline_key(email: EmailRow) -> tuple[datetime, uuid.UUID]:
    """An email's place in timeline order (newest first): the keyset of the email connections."""
    return (email.sent_at, email.id)


def timeline_cursor(email: EmailRow) -> str:
    """The email's cursor, as an edge of `emails` or a contact's `timeline` would carry it."""
    return encode_cursor(timeline_key(email))


async def emails_page(
    session: AsyncSession, workspace_id: uuid.UUID, query: EmailQuery, request: PageRequest
) -> tuple[Page[EmailRow], SelectOfScalar[EmailRow]]:
    """Newest first."""
    stmt = _filtered(workspace_id, query)
    page = await keyset_page(
        session,
        stmt,
        [col(EmailRow.sent_at), col(EmailRow.id)],
        timeline_key,
        request,
        descending=True,
    )
    return page, stmt


async def timeline_page(
    session: AsyncSession, contact_id: uuid.UUID, request: PageRequest
) -> tuple[Page[EmailRow], SelectOfScalar[EmailRow]]:
    """A contact's timeline, newest first, walking the (contact, sent_at, email) index."""
    stmt = (
        select(EmailRow)
        .join(TimelineEntry, col(TimelineEntry.email_id) == EmailRow.id)
        .where(TimelineEntry.contact_id == contact_id)
    )
    page = await keyset_page(
        session,
        stmt,
        [col(TimelineEntry.sent_at), col(TimelineEntry.email_id)],
        timeline_key,
        request,
        descending=True,
    )
    return page, stmt


async def thread_emails_page(
    session: AsyncSession, thread_id: uuid.UUID, request: PageRequest
) -> tuple[Page[EmailRow], SelectOfScalar[EmailRow]]:
    """Oldest first, as a conversation reads."""
    stmt = select(EmailRow).where(EmailRow.thread_id == thread_id)
    page = await keyset_page(
        session,
        stmt,
        [col(EmailRow.sent_at), col(EmailRow.id)],
        lambda e: (e.sent_at, e.id),
        request,
        descending=False,
    )
    return page, stmt


async def threads_page(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    contact_id: uuid.UUID | None,
    request: PageRequest,
) -> tuple[Page[Thread], SelectOfScalar[Thread]]:
    stmt = select(Thread).where(Thread.workspace_id == workspace_id)
    if contact_id is not None:
        stmt = stmt.where(
            col(Thread.id).in_(
                select(EmailRow.thread_id)
                .join(TimelineEntry, col(TimelineEntry.email_id) == EmailRow.id)
                .where(TimelineEntry.contact_id == contact_id)
            )
        )
    page = await keyset_page(
        session,
        stmt,
        [col(Thread.last_email_at), col(Thread.id)],
        lambda t: (t.last_email_at, t.id),
        request,
        descending=True,
    )
    return page, stmt

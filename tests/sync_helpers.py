"""Reading back what the engine stored, for the rule tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlmodel import col, select

from backend.contacts.tables import Contact, ContactAddress
from backend.mail.tables import Email, MailboxMessage, TimelineEntry
from backend.mailboxes.tables import Mailbox, SyncErrorEntry
from backend.runtime import Runtime


async def emails_with_message_id(
    runtime: Runtime, workspace_id: uuid.UUID, message_id: str
) -> list[Email]:
    async with runtime.db.sessionmaker() as session:
        rows = await session.scalars(
            select(Email).where(Email.workspace_id == workspace_id, Email.message_id == message_id)
        )
        return list(rows)


async def timeline_subjects(runtime: Runtime, contact_id: uuid.UUID) -> list[str | None]:
    async with runtime.db.sessionmaker() as session:
        rows = await session.scalars(
            select(Email.subject)
            .join(TimelineEntry, col(TimelineEntry.email_id) == Email.id)
            .where(TimelineEntry.contact_id == contact_id)
            .order_by(col(Email.sent_at))
        )
        return list(rows)


async def email_count(runtime: Runtime, workspace_id: uuid.UUID) -> int:
    async with runtime.db.sessionmaker() as session:
        total = await session.scalar(
            select(sa.func.count()).select_from(Email).where(Email.workspace_id == workspace_id)
        )
        return int(total or 0)


async def contacts_named(runtime: Runtime, workspace_id: uuid.UUID) -> dict[str, str | None]:
    async with runtime.db.sessionmaker() as session:
        rows = await session.execute(
            select(ContactAddress.address, Contact.name)
            .join(Contact, col(Contact.id) == ContactAddress.contact_id)
            .where(Contact.workspace_id == workspace_id)
        )
        return {address: name for address, name in rows}


async def reload_mailbox(runtime: Runtime, mailbox_id: uuid.UUID) -> Mailbox:
    async with runtime.db.sessionmaker() as session:
        mailbox = await session.get(Mailbox, mailbox_id)
        assert mailbox is not None
        return mailbox


async def error_codes(runtime: Runtime, mailbox_id: uuid.UUID) -> list[str]:
    async with runtime.db.sessionmaker() as session:
        rows = await session.scalars(
            select(SyncErrorEntry.code)
            .where(SyncErrorEntry.mailbox_id == mailbox_id)
            .order_by(col(SyncErrorEntry.occurred_at))
        )
        return [str(r) for r in rows]


async def sightings(runtime: Runtime, email_id: uuid.UUID) -> int:
    async with runtime.db.sessionmaker() as session:
        total = await session.scalar(
            select(sa.func.count())
            .select_from(MailboxMessage)
            .where(MailboxMessage.email_id == email_id)
        )
        return int(total or 0)


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    for _ in range(int(seconds * 10)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {seconds} s")

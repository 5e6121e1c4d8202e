"""Which mailboxes a provider's push concerns. The provider packages read and verify the
push; this module looks the mailboxes up, and the HTTP routes enqueue their passes."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import Provider
from backend.providers.microsoft.notifications import Notices
from backend.sync.service import SYNCABLE

# Mailboxes in ERROR wait for their backoff; pushes don't cut it short.
PUSHABLE = (MailboxStatus.PENDING, MailboxStatus.ACTIVE)


async def gmail_mailboxes_to_sync(
    session: AsyncSession, address: str, history_id: int
) -> list[uuid.UUID]:
    """The Gmail mailboxes (one per workspace that connected the address) not yet past
    `history_id`: a notification older than the saved cursor brings nothing new."""
    rows = await session.execute(
        select(Mailbox.id, Mailbox.cursor).where(
            Mailbox.provider == Provider.GMAIL,
            Mailbox.email_address == address,
            col(Mailbox.status).in_(PUSHABLE),
        )
    )
    due = []
    for mailbox_id, cursor in rows:
        seen = (cursor or {}).get("historyId")
        if seen is not None and str(seen).isdigit() and int(seen) >= history_id:
            continue
        due.append(mailbox_id)
    return due


async def graph_mailboxes_to_sync(session: AsyncSession, notices: Notices) -> list[uuid.UUID]:
    """The notified Outlook mailboxes that sync now. Those whose subscription needs renewing
    are marked so that their next pass renews or recreates it, failing ones included: their
    pass after the backoff must not wait a day for the renewal."""
    if not notices.mailbox_ids:
        return []
    rows = (
        await session.scalars(
            select(Mailbox).where(
                col(Mailbox.id).in_(notices.mailbox_ids),
                Mailbox.provider == Provider.MICROSOFT,
                col(Mailbox.status).in_(SYNCABLE),
            )
        )
    ).all()
    for mailbox in rows:
        if mailbox.id in notices.resubscribe:
            mailbox.push_renewed_at = None
            session.add(mailbox)
    await session.flush()
    return [m.id for m in rows if m.status in PUSHABLE]

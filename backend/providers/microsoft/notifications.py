"""Graph webhooks: change notifications and lifecycle events, each naming its mailbox
through the signed `clientState` the subscription was created with."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.mailboxes.tables import Mailbox, MailboxStatus, Provider
from backend.providers.microsoft.provider import mailbox_of_client_state
from backend.settings import Settings
from backend.sync.service import SYNCABLE

log = logging.getLogger(__name__)

# Mailboxes in ERROR wait for their backoff; notifications don't cut it short.
PUSHABLE = (MailboxStatus.PENDING, MailboxStatus.ACTIVE)
# The subscription is gone or about to lapse: the next pass renews or recreates it.
RESUBSCRIBE = {"reauthorizationRequired", "subscriptionRemoved"}


@dataclass
class Notices:
    mailbox_ids: set[uuid.UUID]
    resubscribe: set[uuid.UUID]
    rejected: int


def read_notices(settings: Settings, body: Any) -> Notices:
    notices = Notices(set(), set(), 0)
    items = body.get("value") if isinstance(body, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            notices.rejected += 1
            continue
        mailbox_id = mailbox_of_client_state(settings, item.get("clientState"))
        if mailbox_id is None:
            notices.rejected += 1
            continue
        try:
            parsed = uuid.UUID(mailbox_id)
        except ValueError:
            notices.rejected += 1
            continue
        notices.mailbox_ids.add(parsed)
        if item.get("lifecycleEvent") in RESUBSCRIBE:
            notices.resubscribe.add(parsed)
    return notices


async def mailboxes_to_sync(session: AsyncSession, notices: Notices) -> list[uuid.UUID]:
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

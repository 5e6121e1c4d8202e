"""Gmail push: Pub/Sub delivers `{emailAddress, historyId}`; we start a pass for that mailbox."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.kit.addresses import normalize_address
from backend.mailboxes.tables import Mailbox, MailboxStatus, Provider

log = logging.getLogger(__name__)

# Mailboxes in ERROR wait for their backoff; pushes don't cut it short.
PUSHABLE = (MailboxStatus.PENDING, MailboxStatus.ACTIVE)


def parse_envelope(envelope: Any) -> tuple[str, int] | None:
    """(emailAddress, historyId) of a Pub/Sub push, or None when it is not one."""
    try:
        data = base64.urlsafe_b64decode(str(envelope["message"]["data"]) + "==")
        notice = json.loads(data)
        return normalize_address(str(notice["emailAddress"])), int(notice["historyId"])
    except (KeyError, TypeError, ValueError, binascii.Error):
        return None


async def mailboxes_to_sync(
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

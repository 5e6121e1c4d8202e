"""Worker jobs of the sync domain. They take ids, reload rows and are safe to run twice."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from backend.runtime import sync_again_key
from backend.sync.service import PassResult, due_mailboxes, run_pass

if TYPE_CHECKING:
    from backend.runtime import Runtime

log = logging.getLogger(__name__)


async def sync_mailbox(runtime: Runtime, mailbox_id: str) -> PassResult | None:
    try:
        row_id = uuid.UUID(mailbox_id)
    except ValueError:
        log.warning("ignoring a sync job for a malformed mailbox id %r", mailbox_id)
        return None
    return await run_pass(runtime, row_id)


async def after_sync(runtime: Runtime, mailbox_id: str) -> None:
    """A sync requested while this pass ran earns exactly one more pass (R14)."""
    if await runtime.redis.getdel(sync_again_key(mailbox_id)):
        await runtime.enqueue_sync(mailbox_id)


async def schedule_due(runtime: Runtime) -> int:
    async with runtime.db.sessionmaker() as session:
        due = await due_mailboxes(session, runtime.settings.sync_interval_seconds)
    spread = runtime.settings.sync_spread_seconds
    for mailbox_id in due:
        # Spread the minute's passes instead of starting them all at once; the offset is
        # stable per mailbox, so each keeps its own rhythm.
        await runtime.enqueue_sync(
            str(mailbox_id), defer_seconds=mailbox_id.int % spread if spread else 0
        )
    return len(due)
